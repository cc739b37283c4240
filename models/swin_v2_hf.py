"""Hugging Face twin of Swin Transformer V2: the key map and both directions of conversion.

Tessera (SwinTransformerV2)          transformers (Swinv2Model keys; Swinv2ForImageClassification prefixes "swinv2.")
patch_embed.proj                     embeddings.patch_embeddings.projection
patch_embed.norm                     embeddings.norm
mask_token (1, 1, C)                 embeddings.mask_token            (only Swinv2Model(use_mask_token=True))
layers.i.blocks.j.attn.qkv.weight    encoder.layers.i.blocks.j.attention.self.{query,key,value}.weight (split dim 0)
layers.i.blocks.j.attn.q_bias        encoder.layers.i.blocks.j.attention.self.query.bias   (key has no bias)
layers.i.blocks.j.attn.v_bias        encoder.layers.i.blocks.j.attention.self.value.bias
layers.i.blocks.j.attn.logit_scale   encoder.layers.i.blocks.j.attention.self.logit_scale
layers.i.blocks.j.attn.cpb.mlp       encoder.layers.i.blocks.j.attention.self.continuous_position_bias_mlp
layers.i.blocks.j.attn.proj          encoder.layers.i.blocks.j.attention.output.dense
layers.i.blocks.j.norm1              encoder.layers.i.blocks.j.layernorm_before   (post-norm of the attention branch,
layers.i.blocks.j.norm2              encoder.layers.i.blocks.j.layernorm_after     despite the names)
layers.i.blocks.j.mlp.fc1 / fc2      encoder.layers.i.blocks.j.intermediate.dense / output.dense
layers.i.downsample.{reduction,norm} encoder.layers.i.downsample.{reduction,norm}
norm                                 layernorm
head                                 classifier (Swinv2ForImageClassification)
SimMIM decoder 0.{weight,bias}       decoder.0.{weight,bias} (Swinv2ForMaskedImageModeling; encoder under "swinv2.")

Stages: HF's encoder hidden_states[0] is the stem; with output_hidden_states_before_downsampling=True, [i + 1] is
stage i's blocks' output before its merging (= forward_intermediates[i]); Swinv2Model's default hidden_states[i + 1]
are taken after the merging instead. The mask token is exported into Swinv2Model (load it with
`Swinv2Model.from_pretrained(dir, use_mask_token=True)`: the config does not record it); the classification model
has none.
HF quirk: Swinv2SelfAttention adds the shift mask (-100) twice; Tessera adds it once, as the paper's code and timm.
exp(-100) already vanishes next to the unmasked logits, so the outputs agree (to 1e-12 in float64, measured at
temperatures 10 and 100). In float32 the two differ by rounding only (Tessera scales q before the matmul, HF the
logits after): ~1e-6 at the init temperature 10, growing with it (~5e-4 when every head sits at the cap of 100).
"""

from __future__ import annotations

import re

import torch

from models.hf import HFAdapter, backbone_state, load_strict, register_hf, swin_stages
from models.hf_config import check_drop_path, check_gelu, nominal_size, reject, square
from models.simmim import decoder_to_hf, split_mim_state
from models.swin_v2 import NORM_EPS, SwinTransformerV2
from ops.compat import import_transformers

_BLK, _HF_BLK = "layers.{i}.blocks.{j}.", "encoder.layers.{i}.blocks.{j}."
_KEY_MAP = [  # (Tessera prefix, HF prefix); {i}, {j} are stage and block numbers
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("patch_embed.norm.", "embeddings.norm."),
    ("mask_token", "embeddings.mask_token"),
    (_BLK + "attn.q_bias", _HF_BLK + "attention.self.query.bias"),
    (_BLK + "attn.v_bias", _HF_BLK + "attention.self.value.bias"),
    (_BLK + "attn.logit_scale", _HF_BLK + "attention.self.logit_scale"),
    (_BLK + "attn.cpb.mlp.", _HF_BLK + "attention.self.continuous_position_bias_mlp."),
    (_BLK + "attn.proj.", _HF_BLK + "attention.output.dense."),
    (_BLK + "norm1.", _HF_BLK + "layernorm_before."),
    (_BLK + "norm2.", _HF_BLK + "layernorm_after."),
    (_BLK + "mlp.fc1.", _HF_BLK + "intermediate.dense."),
    (_BLK + "mlp.fc2.", _HF_BLK + "output.dense."),
    ("layers.{i}.downsample.", "encoder.layers.{i}.downsample."),
    ("norm.", "layernorm."),
]
_QKV = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.weight$")
_QKV_HF = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.weight$")


def _pattern(template: str) -> re.Pattern:
    return re.compile(
        "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    )


_TO_HF = [(_pattern(t), h) for t, h in _KEY_MAP]
_FROM_HF = [(_pattern(h), t) for t, h in _KEY_MAP]


def _rename(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in table:
        m = pattern.match(key)
        if m:
            return template.format(**m.groupdict()) + key[m.end() :]
    raise KeyError(f"no key-map entry for {key!r}")


def backbone_to_hf(model: SwinTransformerV2, prefix: str = "", mask_token: bool = False) -> dict:
    """Swinv2Model-layout state dict of the backbone, keys prefixed with `prefix` (the mask token if asked)."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().float().cpu()
        if k.startswith("head.") or (k == "mask_token" and not mask_token):
            continue
        m = _QKV.match(k)
        if m:
            for part, w in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{prefix}encoder.layers.{m[1]}.blocks.{m[2]}.attention.self.{part}.weight"] = (
                    w.contiguous()
                )
        else:
            out[prefix + _rename(k, _TO_HF)] = v.contiguous()
    return out


def swinv2_config(model: SwinTransformerV2):
    n_cls = model.head.out_features if isinstance(model.head, torch.nn.Linear) else 0
    kw = dict(
        image_size=model.img_size,
        patch_size=model.patch_size,
        num_channels=model.in_chans,
        embed_dim=model.embed_dim,
        depths=list(model.depths),
        num_heads=list(model.num_heads),
        window_size=model.window_size,
        pretrained_window_sizes=list(model.pretrained_window_sizes),
        mlp_ratio=model.mlp_ratio,
        qkv_bias=model.qkv_bias,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=model.drop_path_rate,
        use_absolute_embeddings=False,
        layer_norm_eps=NORM_EPS,
    )
    if n_cls:
        kw["num_labels"] = n_cls
    return import_transformers().Swinv2Config(**kw)


def swinv2_to_hf(model: SwinTransformerV2):
    """Swinv2Model (with the mask token, if any), or Swinv2ForImageClassification with a head (which has no
    mask token), holding `model`'s weights."""
    tf = import_transformers()
    cfg = swinv2_config(model)
    if isinstance(model.head, torch.nn.Linear):
        hf = tf.Swinv2ForImageClassification(cfg)
        sd = backbone_to_hf(model, "swinv2.")
        sd["classifier.weight"], sd["classifier.bias"] = model.head.weight.detach(), model.head.bias.detach()
    else:  # load with Swinv2Model.from_pretrained(dir, use_mask_token=True) to keep a mask token
        hf = tf.Swinv2Model(cfg, use_mask_token=model.mask_token is not None)
        sd = backbone_to_hf(model, mask_token=True)
    return load_strict(hf, sd, f"swinv2_to_hf (SwinTransformerV2 -> {type(hf).__name__})")


def swinv2_mim_to_hf(model: SwinTransformerV2, decoder: torch.nn.Module, encoder_stride: int):
    """Swinv2ForMaskedImageModeling holding a SimMIM run's backbone and decoder (models/simmim.py), eval().
    image_size = the model's img_size (the training size: transformers' loss reshapes the mask by it);
    a backbone trained without a mask token (zeros at masked positions) exports a zero one, which is the same."""
    tf = import_transformers()
    cfg = swinv2_config(model)
    cfg.encoder_stride = encoder_stride
    sd = backbone_to_hf(model, "swinv2.", mask_token=True)
    if model.mask_token is None:
        sd["swinv2.embeddings.mask_token"] = torch.zeros(1, 1, model.embed_dim)
    sd.update(decoder_to_hf(decoder))
    return load_strict(tf.Swinv2ForMaskedImageModeling(cfg), sd, "swinv2_mim_to_hf")


def swinv2_mim_from_hf(sd: dict[str, torch.Tensor], cfg) -> tuple[SwinTransformerV2, dict[str, torch.Tensor]]:
    """A Swinv2ForMaskedImageModeling state dict -> (SwinTransformerV2 with its mask token, the decoder's
    state dict `0.weight`, `0.bias`)."""
    enc, dec = split_mim_state(sd, "swinv2.", "swinv2_mim_from_hf")
    return swinv2_from_hf(enc, cfg), dec


def _pretrained_window(cfg, p) -> int:
    """One stage's pretrained window as Swinv2SelfAttention reads it: an int p or a pair (ph, pw); ph <= 0 means
    none (the offsets are normalised by the window itself, whatever pw is), so it is 0 here."""
    if isinstance(p, int):
        ph = pw = p
    elif isinstance(p, (list, tuple)) and len(p) == 2:
        ph, pw = p
    else:
        reject(cfg, "pretrained_window_sizes", "each entry is an int or a (height, width) pair")
    if ph <= 0:
        return 0
    if pw != ph:
        reject(cfg, "pretrained_window_sizes", "Tessera's continuous position bias takes square windows")
    if ph == 1:  # transformers divides the offsets by ph - 1 = 0: a NaN bias
        reject(cfg, "pretrained_window_sizes", "a pretrained window of 1 makes transformers' bias NaN")
    return int(ph)


def swinv2_kwargs_from_hf(cfg) -> dict:
    """SwinTransformerV2 arguments of a Swinv2Config, reading what Swinv2Model reads; ValueError naming the field
    Tessera's Swin V2 cannot represent.

    transformers reads num_heads[i] and pretrained_window_sizes[i] for the len(depths) stages only (longer lists
    are fine; pretrained_window_sizes None means none), and each stage's window and shift from the height of
    its map at image_size (Swinv2Layer keeps window_size[0] and shift_size[0]), so a (height, width) image_size
    imports as img_size = height. Dropouts (training only), encoder_stride (masked image modelling) and
    out_features / out_indices (Swinv2Backbone) change no output of the imported model."""
    check_gelu(cfg, "Swin V2")
    if cfg.use_absolute_embeddings:
        reject(cfg, "use_absolute_embeddings", "Swin V2 has only relative (CPB) position information")
    if float(cfg.layer_norm_eps) != NORM_EPS:
        reject(
            cfg, "layer_norm_eps", f"Tessera's Swin V2 uses {NORM_EPS} in every LayerNorm (no eps setting)"
        )
    if not isinstance(cfg.window_size, int):
        reject(cfg, "window_size", "one int (as Swinv2Layer takes it)")
    n = len(cfg.depths)
    if not n:
        reject(cfg, "depths", "needs at least one stage")
    for field in ("num_heads", "pretrained_window_sizes"):
        v = getattr(cfg, field)
        if v is not None and len(v) < n:
            reject(cfg, field, f"needs an entry for each of the {n} stages of depths {list(cfg.depths)}")
    pws = cfg.pretrained_window_sizes or [0] * n
    size = nominal_size(cfg)
    patch = square(cfg, "patch_size", "Swin V2")
    if (size // patch) >> (n - 1) < 1:  # transformers builds windows of 0 and cannot run it either
        reject(cfg, "image_size", f"too small for {n} stages of patch {patch}")
    drop_path_rate = check_drop_path(cfg)
    return dict(
        img_size=int(size),
        patch_size=patch,
        in_chans=cfg.num_channels,
        embed_dim=cfg.embed_dim,
        depths=tuple(int(d) for d in cfg.depths),
        num_heads=tuple(int(h) for h in cfg.num_heads[:n]),
        window_size=cfg.window_size,
        pretrained_window_sizes=tuple(_pretrained_window(cfg, p) for p in pws[:n]),
        mlp_ratio=float(cfg.mlp_ratio),
        qkv_bias=bool(cfg.qkv_bias),
        drop_path_rate=drop_path_rate,
    )


def swinv2_from_hf(hf: dict[str, torch.Tensor], cfg) -> SwinTransformerV2:
    """A SwinTransformerV2 from a Swinv2Model / Swinv2ForImageClassification state dict and config."""
    kw = swinv2_kwargs_from_hf(cfg)
    base = backbone_state(hf, "swinv2.")
    model = SwinTransformerV2(
        **kw,
        num_classes=hf["classifier.weight"].shape[0] if "classifier.weight" in hf else 0,
        mask_token="embeddings.mask_token" in base,
    )
    sd, qkv = {}, {}
    for k, v in base.items():
        m = _QKV_HF.match(k)
        if m:
            qkv.setdefault(f"layers.{m[1]}.blocks.{m[2]}.attn.qkv.weight", {})[m[3]] = v
        else:
            sd[_rename(k, _FROM_HF)] = v
    for k, parts in qkv.items():
        sd[k] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if "classifier.weight" in hf:
        sd["head.weight"], sd["head.bias"] = hf["classifier.weight"], hf["classifier.bias"]
    return load_strict(model, sd, "swinv2_from_hf (Swinv2Config -> SwinTransformerV2)")


def swinv2_hf_outputs(hf, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> dict:
    """A Swinv2Model / Swinv2ForImageClassification's outputs in Tessera's layouts (see models/hf.py).
    `bool_masked_pos` (B, L) needs a model built with use_mask_token=True."""
    base = getattr(hf, "swinv2", hf)
    out = base(pixel_values=x, bool_masked_pos=bool_masked_pos)
    res = {
        "features": out.last_hidden_state,  # (B, L, C)
        "stages": swin_stages(base, x, bool_masked_pos=bool_masked_pos),
        "pooled": out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1),
    }
    if base is not hf:
        res["logits"] = hf.classifier(res["pooled"])
    return res


register_hf(
    "swinv2",
    HFAdapter(
        model_cls=SwinTransformerV2,
        archs=("Swinv2Model", "Swinv2ForImageClassification"),
        hf_config=swinv2_config,
        to_hf=swinv2_to_hf,
        from_hf=swinv2_from_hf,
        hf_outputs=swinv2_hf_outputs,
    ),
)
