"""Hugging Face twin of PVT v2 (PvtV2Model / PvtV2ForImageClassification): the key map and both conversions.

Tessera                              transformers PvtV2Model (PvtV2ForImageClassification prefixes "pvt_v2.")
patch_embed.{proj,norm}              encoder.layers.0.patch_embedding.{proj,layer_norm}
stages.i.downsample.{proj,norm}      encoder.layers.i.patch_embedding.{proj,layer_norm}           (i > 0)
stages.i.blocks.j.norm1 / norm2      encoder.layers.i.blocks.j.layer_norm_1 / layer_norm_2
stages.i.blocks.j.attn.q             encoder.layers.i.blocks.j.attention.query
stages.i.blocks.j.attn.kv (fused)    encoder.layers.i.blocks.j.attention.{key,value}     (split on dim 0)
stages.i.blocks.j.attn.sr / norm     encoder.layers.i.blocks.j.attention.spatial_reduction / layer_norm
stages.i.blocks.j.attn.proj          encoder.layers.i.blocks.j.attention.proj
stages.i.blocks.j.mlp.fc1 / fc2      encoder.layers.i.blocks.j.mlp.dense1 / dense2
stages.i.blocks.j.mlp.dwconv         encoder.layers.i.blocks.j.mlp.dwconv.dwconv
stages.i.norm                        encoder.layers.i.layer_norm
head                                 classifier                                     (num_classes > 0)
mask_token                           (none: a pretraining parameter, not exported)
`KEY_MAP` below is this table as data; both directions walk it over the Tessera model's own state dict.

Outputs: last_hidden_state (B, C, h, w) = forward_features; hidden_states[i] = stage i after its LayerNorm =
forward_intermediates()[i]; PvtV2ForImageClassification classifies the mean over positions of
last_hidden_state. Every LayerNorm (patch embeddings, blocks, SR, stage ends) uses config.layer_norm_eps
(1e-6 by default).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from models.hf import HFAdapter, load_strict, register_hf
from models.hf_config import check_drop_path, check_gelu, nominal_size, reject, square_entries
from models.pvt_v2 import PyramidVisionTransformerV2
from ops.compat import import_transformers

_L = "encoder.layers.{i}"
_B = "encoder.layers.{i}.blocks.{j}"
KEY_MAP = [  # (Tessera module, HF module or (key, value) modules); {i} stage, {j} block
    ("patch_embed.proj", "encoder.layers.0.patch_embedding.proj"),
    ("patch_embed.norm", "encoder.layers.0.patch_embedding.layer_norm"),
    ("stages.{i}.downsample.proj", f"{_L}.patch_embedding.proj"),
    ("stages.{i}.downsample.norm", f"{_L}.patch_embedding.layer_norm"),
    ("stages.{i}.blocks.{j}.norm1", f"{_B}.layer_norm_1"),
    ("stages.{i}.blocks.{j}.attn.q", f"{_B}.attention.query"),
    ("stages.{i}.blocks.{j}.attn.kv", (f"{_B}.attention.key", f"{_B}.attention.value")),
    ("stages.{i}.blocks.{j}.attn.sr", f"{_B}.attention.spatial_reduction"),
    ("stages.{i}.blocks.{j}.attn.norm", f"{_B}.attention.layer_norm"),
    ("stages.{i}.blocks.{j}.attn.proj", f"{_B}.attention.proj"),
    ("stages.{i}.blocks.{j}.norm2", f"{_B}.layer_norm_2"),
    ("stages.{i}.blocks.{j}.mlp.fc1", f"{_B}.mlp.dense1"),
    ("stages.{i}.blocks.{j}.mlp.dwconv", f"{_B}.mlp.dwconv.dwconv"),
    ("stages.{i}.blocks.{j}.mlp.fc2", f"{_B}.mlp.dense2"),
    ("stages.{i}.norm", f"{_L}.layer_norm"),
]


def _pattern(tessera: str) -> re.Pattern:
    """'stages.{i}.norm' -> a regex for 'stages.<i>.norm.<param>' capturing i (and j) and the parameter."""
    rx = re.escape(tessera).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(rx + r"\.(\w+)")


_COMPILED = [(_pattern(t), h) for t, h in KEY_MAP]


def hf_names(key: str) -> list[str]:
    """The PvtV2Model key(s) holding Tessera backbone key `key`: two (key, value) for the fused kv."""
    for rx, h in _COMPILED:
        m = rx.fullmatch(key)
        if m:
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            param = m.groups()[-1]
            return [f"{t.format(**groups)}.{param}" for t in ((h,) if isinstance(h, str) else h)]
    raise KeyError(f"pvt_v2: no HF name for {key!r}")


def backbone_to_hf(model: PyramidVisionTransformerV2, prefix: str = "") -> dict[str, torch.Tensor]:
    """PvtV2Model-layout state dict of the backbone (no head, no mask token), keys under `prefix`."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "mask_token" or k.startswith("head."):
            continue
        names = hf_names(k)
        parts = v.detach().float().cpu().chunk(len(names), dim=0)  # the fused kv: [keys | values]
        out.update({prefix + n: p.contiguous() for n, p in zip(names, parts)})
    return out


def pvt_v2_config(model: PyramidVisionTransformerV2):
    """The PvtV2Config of the same architecture (num_labels = num_classes when the model has a head)."""
    tf = import_transformers()
    n_cls = model.head.out_features if isinstance(model.head, nn.Linear) else 0
    return tf.PvtV2Config(
        image_size=model.img_size,
        num_channels=model.in_chans,
        num_encoder_blocks=len(model.depths),
        depths=list(model.depths),
        sr_ratios=list(model.sr_ratios),
        hidden_sizes=list(model.embed_dims),
        patch_sizes=list(model.patch_sizes),
        strides=list(model.strides),
        num_attention_heads=list(model.num_heads),
        mlp_ratios=list(model.mlp_ratios),
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=model.drop_path_rate,
        layer_norm_eps=model.norm_eps,
        qkv_bias=model.qkv_bias,
        linear_attention=model.linear,
        **({"num_labels": n_cls} if n_cls else {}),
    )


def pvt_v2_to_hf(model: PyramidVisionTransformerV2) -> nn.Module:
    """PvtV2Model, or PvtV2ForImageClassification when the model has a classifier head; eval()."""
    tf = import_transformers()
    cfg = pvt_v2_config(model)
    if isinstance(model.head, nn.Linear):
        sd = backbone_to_hf(model, "pvt_v2.")
        sd["classifier.weight"], sd["classifier.bias"] = model.head.weight.detach(), model.head.bias.detach()
        return load_strict(tf.PvtV2ForImageClassification(cfg), sd, "pvt_v2 to_hf")
    return load_strict(tf.PvtV2Model(cfg), backbone_to_hf(model), "pvt_v2 to_hf")


_PER_STAGE = (
    "depths",
    "sr_ratios",
    "hidden_sizes",
    "patch_sizes",
    "strides",
    "num_attention_heads",
    "mlp_ratios",
)


def _kwargs_from_config(cfg, classifier: bool = False) -> dict:
    """Constructor arguments for a PvtV2Config, reading what transformers' PVT v2 reads; ValueError naming the
    field Tessera cannot represent.

    transformers builds num_encoder_blocks stages from the first num_encoder_blocks entries of each per-stage
    list (longer lists are fine) and PvtV2ForImageClassification (`classifier`) reshapes the last map by
    hidden_sizes[-1] channels. image_size is never read (any (height, width) is accepted; Tessera keeps the
    height as its nominal img_size, every input size runs either way). Dropouts are training only,
    out_features / out_indices (PvtV2Backbone) change no output."""
    check_gelu(cfg, "PVT v2")
    n = cfg.num_encoder_blocks
    if n < 1:
        reject(cfg, "num_encoder_blocks", "needs at least one stage")
    for field in _PER_STAGE:
        if len(getattr(cfg, field)) < n:
            reject(cfg, field, f"needs an entry for each of num_encoder_blocks={n} stages")
    if classifier and cfg.hidden_sizes[-1] != cfg.hidden_sizes[n - 1]:
        # PvtV2ForImageClassification views the last map's channels as hidden_sizes[-1]: it fails, or (when
        # the sizes happen to divide) pools a reshuffled map; neither is a model Tessera can be
        reject(
            cfg,
            "hidden_sizes",
            f"the classifier reads hidden_sizes[-1] channels, the last of num_encoder_blocks={n} stages gives "
            f"hidden_sizes[{n - 1}]",
        )
    size = nominal_size(cfg)
    drop_path_rate = check_drop_path(cfg)
    return dict(
        img_size=int(size),
        in_chans=cfg.num_channels,
        embed_dims=tuple(int(d) for d in cfg.hidden_sizes[:n]),
        depths=tuple(int(d) for d in cfg.depths[:n]),
        num_heads=tuple(int(h) for h in cfg.num_attention_heads[:n]),
        mlp_ratios=tuple(cfg.mlp_ratios[:n]),
        sr_ratios=tuple(int(r) for r in cfg.sr_ratios[:n]),
        patch_sizes=tuple(square_entries(cfg, "patch_sizes", n, "PVT v2")),
        strides=tuple(square_entries(cfg, "strides", n, "PVT v2")),
        linear=bool(cfg.linear_attention),
        qkv_bias=bool(cfg.qkv_bias),
        drop_path_rate=drop_path_rate,
        norm_eps=float(cfg.layer_norm_eps),
    )


def pvt_v2_from_hf(hf: dict[str, torch.Tensor], cfg) -> PyramidVisionTransformerV2:
    """A PyramidVisionTransformerV2 from a PvtV2Model or PvtV2ForImageClassification state dict and config."""
    prefix = "pvt_v2." if any(k.startswith("pvt_v2.") for k in hf) else ""
    head = "classifier.weight" in hf
    num_classes = hf["classifier.weight"].shape[0] if head else 0
    kw = _kwargs_from_config(cfg, classifier=bool(prefix))  # the classification model's keys are prefixed
    model = PyramidVisionTransformerV2(**kw, num_classes=num_classes)
    sd, used = {}, set()
    for k in model.state_dict():
        names = (
            [k.replace("head.", "classifier.")]
            if k.startswith("head.")
            else [prefix + n for n in hf_names(k)]
        )
        missing = [n for n in names if n not in hf]
        if missing:
            raise RuntimeError(f"pvt_v2 from_hf: the state dict lacks {missing} (for {k!r})")
        sd[k] = torch.cat([hf[n] for n in names], dim=0)
        used.update(names)
    extra = sorted(set(hf) - used)
    if extra:
        raise RuntimeError(f"pvt_v2 from_hf: unexpected keys {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    return load_strict(model, sd, "pvt_v2 from_hf")


def pvt_v2_hf_outputs(hf: nn.Module, x: torch.Tensor) -> dict:
    """A PvtV2Model / PvtV2ForImageClassification's outputs in Tessera's layouts (see models/hf.py)."""
    base = getattr(hf, "pvt_v2", hf)
    out = base(pixel_values=x, output_hidden_states=True)
    feats = out.last_hidden_state  # (B, C, h, w)
    # PvtV2ForImageClassification's pooling (not an output of its own): tokens (B, h * w, C), mean over them
    pooled = feats.permute(0, 2, 3, 1).reshape(feats.shape[0], -1, feats.shape[1]).mean(dim=1)
    res = {"features": feats, "stages": list(out.hidden_states), "pooled": pooled}
    if base is not hf:
        res["logits"] = hf(pixel_values=x).logits
    return res


register_hf(
    "pvt_v2",
    HFAdapter(
        model_cls=PyramidVisionTransformerV2,
        archs=("PvtV2Model", "PvtV2ForImageClassification"),
        hf_config=pvt_v2_config,
        to_hf=pvt_v2_to_hf,
        from_hf=pvt_v2_from_hf,
        hf_outputs=pvt_v2_hf_outputs,
    ),
)
