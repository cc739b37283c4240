"""Hugging Face twin of PoolFormer: the key map and both directions of conversion.

Tessera                               transformers (PoolFormerModel keys; PoolFormerForImageClassification
                                      prefixes them with "poolformer.")
stem.{w,b}                            encoder.patch_embeddings.0.projection.{w,b}
stages.i.downsample.{w,b}  (i >= 1)   encoder.patch_embeddings.i.projection.{w,b}
stages.i.blocks.j.norm1               encoder.block.i.j.before_norm
stages.i.blocks.j.ls1.scale           encoder.block.i.j.layer_scale_1
stages.i.blocks.j.norm2               encoder.block.i.j.after_norm
stages.i.blocks.j.mlp.fc1 / fc2       encoder.block.i.j.output.conv1 / conv2
stages.i.blocks.j.ls2.scale           encoder.block.i.j.layer_scale_2
norm                                  norm        (PoolFormerForImageClassification only, no prefix)
head                                  classifier  (PoolFormerForImageClassification only)
mask_token                            -           (no HF counterpart: dropped on export)

HF keeps the final GroupNorm in the classification model, not in PoolFormerModel, so `to_hf` always writes
PoolFormerForImageClassification (with `num_labels=0`, i.e. an Identity classifier, for a headless backbone):
the exported folder then keeps every trained weight, and `PoolFormerModel.from_pretrained(folder)` still loads
the base model from it. Importing a bare PoolFormerModel folder gives the final norm its init (weight 1, bias 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.hf import HFAdapter, load_strict, register_hf
from models.hf_config import check_drop_path, check_gelu, nominal_size, reject, square_entries
from models.poolformer import PoolFormer
from ops.compat import import_transformers

# (tessera suffix inside a block, hf suffix inside a layer), both with .weight/.bias
BLOCK_KEYS = [
    ("norm1", "before_norm"),
    ("norm2", "after_norm"),
    ("mlp.fc1", "output.conv1"),
    ("mlp.fc2", "output.conv2"),
]
LAYER_SCALE_KEYS = [("ls1.scale", "layer_scale_1"), ("ls2.scale", "layer_scale_2")]
WB = ("weight", "bias")


def _key_pairs(depths: list[int], layer_scale: bool) -> list[tuple[str, str]]:
    """(tessera key, hf base-model key) for every backbone tensor."""
    pairs = [(f"stem.{w}", f"encoder.patch_embeddings.0.projection.{w}") for w in WB]
    for i, depth in enumerate(depths):
        if i > 0:
            pairs += [
                (f"stages.{i}.downsample.{w}", f"encoder.patch_embeddings.{i}.projection.{w}") for w in WB
            ]
        for j in range(depth):
            t, h = f"stages.{i}.blocks.{j}.", f"encoder.block.{i}.{j}."
            pairs += [(f"{t}{a}.{w}", f"{h}{b}.{w}") for a, b in BLOCK_KEYS for w in WB]
            if layer_scale:
                pairs += [(t + a, h + b) for a, b in LAYER_SCALE_KEYS]
    return pairs


def poolformer_config(model: PoolFormer):
    n = len(model.depths)
    n_cls = model.head.out_features if isinstance(model.head, torch.nn.Linear) else 0
    return import_transformers().PoolFormerConfig(
        num_channels=model.in_chans,
        patch_size=7,  # unused by HF's modeling code; the stem's kernel and stride, for the reader
        stride=4,
        pool_size=model.pool_size,
        mlp_ratio=model.mlp_ratio,
        depths=list(model.depths),
        hidden_sizes=list(model.dims),
        patch_sizes=[7] + [3] * (n - 1),
        strides=[4] + [2] * (n - 1),
        padding=[2] + [1] * (n - 1),
        num_encoder_blocks=n,
        drop_path_rate=model.drop_path_rate,
        hidden_act="gelu",
        use_layer_scale=model.use_layer_scale,
        layer_scale_init_value=model.layer_scale_init,
        num_labels=n_cls,
        image_size=model.img_size,  # not a PoolFormerConfig field; kept in config.json for the way back
    )


def poolformer_to_hf(model: PoolFormer):
    """PoolFormerForImageClassification holding every weight (Identity classifier without a head); eval()."""
    if model.norm_eps != 1e-5:
        raise ValueError(
            f"norm_eps {model.norm_eps} has no HF counterpart (PoolFormer's GroupNorms use 1e-5)"
        )
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"poolformer." + h: sd[t] for t, h in _key_pairs(model.depths, model.use_layer_scale)}
    out["norm.weight"], out["norm.bias"] = sd["norm.weight"], sd["norm.bias"]
    if isinstance(model.head, torch.nn.Linear):
        out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    hf = import_transformers().PoolFormerForImageClassification(poolformer_config(model))
    return load_strict(hf, {k: v.contiguous() for k, v in out.items()}, "poolformer_to_hf")


def poolformer_kwargs_from_hf(cfg, classifier: bool) -> dict:
    """PoolFormer arguments of a PoolFormerConfig, reading what transformers' PoolFormer reads; ValueError naming
    the field Tessera's PoolFormer cannot represent.

    transformers builds num_encoder_blocks stages from the first num_encoder_blocks entries of depths,
    hidden_sizes, patch_sizes, strides and padding (longer lists are fine); PoolFormerForImageClassification
    (`classifier`) sizes its final norm and classifier by hidden_sizes[-1]. patch_size and stride (singular)
    are never read; image_size is not a PoolFormerConfig field (Tessera's export keeps its nominal size
    there). drop_path_rate is training only."""
    check_gelu(cfg, "PoolFormer")
    n = cfg.num_encoder_blocks
    if n < 1:
        reject(cfg, "num_encoder_blocks", "needs at least one stage")
    for field in ("depths", "hidden_sizes", "patch_sizes", "strides", "padding"):
        if len(getattr(cfg, field)) < n:
            reject(cfg, field, f"needs an entry for each of num_encoder_blocks={n} stages")
    if classifier and cfg.hidden_sizes[-1] != cfg.hidden_sizes[n - 1]:  # transformers cannot run it either
        reject(
            cfg,
            "hidden_sizes",
            f"the final norm takes hidden_sizes[-1] channels, the last of num_encoder_blocks={n} stages gives "
            f"hidden_sizes[{n - 1}]",
        )
    layout = dict(patch_sizes=[7] + [3] * (n - 1), strides=[4] + [2] * (n - 1), padding=[2] + [1] * (n - 1))
    for field, expected in layout.items():
        if square_entries(cfg, field, n, "PoolFormer") != expected:
            reject(
                cfg,
                field,
                f"Tessera's PoolFormer has the paper's stem k7 s4 p2 and downsampling k3 s2 p1 (for "
                f"num_encoder_blocks={n}: {field} {expected})",
            )
    if not isinstance(cfg.pool_size, int) or cfg.pool_size % 2 == 0:  # transformers cannot run those either
        reject(cfg, "pool_size", "an odd int (an even pooling window changes the map size)")
    size = nominal_size(cfg) if hasattr(cfg, "image_size") else 224
    drop_path_rate = check_drop_path(cfg)
    return dict(
        img_size=int(size),
        in_chans=cfg.num_channels,
        depths=[int(d) for d in cfg.depths[:n]],
        dims=[int(d) for d in cfg.hidden_sizes[:n]],
        mlp_ratio=float(cfg.mlp_ratio),
        pool_size=cfg.pool_size,
        layer_scale_init=float(cfg.layer_scale_init_value),
        use_layer_scale=bool(cfg.use_layer_scale),
        drop_path_rate=drop_path_rate,
    )


def poolformer_from_hf(hf: dict, cfg) -> PoolFormer:
    """A PoolFormer from a PoolFormerModel or PoolFormerForImageClassification state dict and config."""
    prefix = "poolformer." if any(k.startswith("poolformer.") for k in hf) else ""
    kw = poolformer_kwargs_from_hf(
        cfg, classifier=bool(prefix)
    )  # the classification model's keys are prefixed
    head = "classifier.weight" in hf
    model = PoolFormer(**kw, num_classes=hf["classifier.weight"].shape[0] if head else 0)
    sd = {t: hf[prefix + h] for t, h in _key_pairs(model.depths, model.use_layer_scale)}
    if "norm.weight" in hf:  # the classification model's final norm
        sd["norm.weight"], sd["norm.bias"] = hf["norm.weight"], hf["norm.bias"]
    else:
        sd["norm.weight"], sd["norm.bias"] = model.norm.weight.detach(), model.norm.bias.detach()
    if head:
        sd["head.weight"], sd["head.bias"] = hf["classifier.weight"], hf["classifier.bias"]
    return load_strict(model, sd, "poolformer_from_hf")


def poolformer_hf_outputs(hf, x: torch.Tensor) -> dict:
    """A PoolFormerModel / PoolFormerForImageClassification's outputs in Tessera's layouts (see models/hf.py).

    hidden_states[i] is stage i's output (there is no stem entry); last_hidden_state = hidden_states[-1], un-normed.
    A bare PoolFormerModel has no final norm: its "pooled" uses GroupNorm with unit affine (the imported default).
    """
    out = hf(pixel_values=x, output_hidden_states=True)
    last = out.hidden_states[-1]  # (B, C, H/32, W/32), = PoolFormerModel's last_hidden_state
    if hasattr(hf, "poolformer"):
        pooled = hf.norm(last).mean(dim=(-2, -1))  # (B, C), exactly what the classifier sees
    else:
        pooled = F.group_norm(last, 1, eps=1e-5).mean(dim=(-2, -1))
    res = {"features": last, "stages": list(out.hidden_states), "pooled": pooled}
    if hasattr(hf, "poolformer") and hf.config.num_labels > 0:
        res["logits"] = out.logits
    return res


register_hf(
    "poolformer",
    HFAdapter(
        model_cls=PoolFormer,
        archs=("PoolFormerModel", "PoolFormerForImageClassification"),
        hf_config=poolformer_config,
        to_hf=poolformer_to_hf,
        from_hf=poolformer_from_hf,
        hf_outputs=poolformer_hf_outputs,
    ),
)
