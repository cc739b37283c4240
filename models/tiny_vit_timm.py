"""timm's TinyViT (`tiny_vit_*`, the port of the official microsoft/Cream release) <-> Tessera's TinyViT: the key
map and the config.

transformers has no TinyViT, so timm's implementation is the reference twin, used by the parity tests only (timm
is a test dependency: scripts/setup.sh installs it outside site-packages, see ops.compat.import_timm). Key map:

    timm                                             Tessera
    patch_embed.conv1 / patch_embed.conv2            stem.conv1 / stem.conv2                 ({conv, bn} each)
    stages.0.blocks.j.conv1 / conv2 / conv3          stages.0.blocks.j.expand / dw / project  (MBConv)
    stages.i.downsample.conv1 / conv2 / conv3        stages.i.downsample.pw1 / dw / pw2       (patch merging)
    stages.i.blocks.j.attn / local_conv / mlp        the same                                 (TinyViT blocks)
    head.norm / head.fc                              norm / head

The attention bias tables have the same layout on both sides ((heads, ws * ws), indexed by |dy| * ws + |dx|; the
index buffer is not in either state dict). BatchNorm buffers follow their module's name. timm's `num_heads` and
`window_sizes` carry a first entry for the convolutional stage 0, which it never reads; Tessera lists the attention
stages only.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from models.tiny_vit import TinyViT

# (timm prefix, Tessera prefix), first match wins; read right-to-left it converts back
_MAP = [
    ("patch_embed.", "stem."),
    ("head.norm.", "norm."),
    ("head.fc.", "head."),
]
_MBCONV = [("conv1.", "expand."), ("conv2.", "dw."), ("conv3.", "project.")]
_MERGE = [("conv1.", "pw1."), ("conv2.", "dw."), ("conv3.", "pw2.")]


def _rename(key: str, reverse: bool) -> str:
    """One key, timm -> Tessera (reverse: Tessera -> timm)."""
    if m := re.match(r"^(stages\.0\.blocks\.\d+\.)(.*)$", key):
        prefix, rest, table = m.group(1), m.group(2), _MBCONV
    elif m := re.match(r"^(stages\.\d+\.downsample\.)(.*)$", key):
        prefix, rest, table = m.group(1), m.group(2), _MERGE
    elif re.match(r"^stages\.\d+\.blocks\.\d+\.(attn|local_conv|mlp)\.", key):
        return key
    else:
        prefix, rest, table = "", key, _MAP
    for theirs, ours in table:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if rest.startswith(src):
            return prefix + dst + rest[len(src) :]
    raise KeyError(f"no TinyViT key map entry for {key!r}")


def tiny_vit_from_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `tiny_vit_*` state dict -> Tessera TinyViT state dict."""
    return {_rename(k, reverse=False): v for k, v in sd.items()}


def tiny_vit_to_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tessera TinyViT state dict -> timm `tiny_vit_*` state dict (the inverse of tiny_vit_from_timm_state_dict).
    The mask token (Tessera's masked-pretraining input) has no timm counterpart and is left out."""
    return {_rename(k, reverse=True): v for k, v in sd.items() if k != "mask_token"}


def _timm():
    from ops.compat import import_timm

    return import_timm().models.tiny_vit


def timm_kwargs(model: TinyViT) -> dict:
    """timm TinyVit constructor arguments for this architecture (stage 0's heads / window: unused placeholders)."""
    h = model.hparams()
    return dict(
        in_chans=h["in_chans"],
        num_classes=h["num_classes"],
        embed_dims=tuple(h["dims"]),
        depths=tuple(h["depths"]),
        num_heads=(1, *h["num_heads"]),
        window_sizes=(1, *h["window_sizes"]),
        mlp_ratio=h["mlp_ratio"],
        mbconv_expand_ratio=h["mbconv_expand_ratio"],
        local_conv_size=h["local_conv_size"],
        drop_path_rate=0.0,
    )


def to_timm(model: TinyViT) -> nn.Module:
    """timm TinyVit holding this model's weights (and BatchNorm statistics), eval()."""
    twin = _timm().TinyVit(**timm_kwargs(model))
    twin.load_state_dict(tiny_vit_to_timm_state_dict(model.state_dict()), strict=True)
    return twin.eval()


def _check_layout(twin: nn.Module) -> None:
    """Refuse timm models whose math Tessera's TinyViT does not have, naming what differs."""
    blk = twin.stages[1].blocks[0]
    act = twin.stages[0].blocks[0].act1
    checks = {
        "model class (TinyVit)": type(twin).__name__ == "TinyVit",
        "act_layer (nn.GELU, exact)": type(act) is nn.GELU and act.approximate == "none",
        "attention attn_ratio (1)": blk.attn.val_dim == blk.attn.key_dim,
        "attention key_dim (dim / num_heads)": blk.attn.key_dim * blk.attn.num_heads == blk.dim,
        "norm eps (1e-5)": blk.attn.norm.eps == 1e-5 and twin.head.norm.eps == 1e-5,
        "head (no hidden layer)": isinstance(twin.head.pre_logits, nn.Identity),
    }
    wrong = [field for field, ok in checks.items() if not ok]
    if wrong:
        raise ValueError(f"timm model is not a tiny_vit_* layout Tessera has; differs in: {', '.join(wrong)}")


def from_timm(twin: nn.Module, **overrides) -> TinyViT:
    """Tessera TinyViT from a timm `tiny_vit_*` model (e.g. timm.create_model('tiny_vit_5m_224')), eval().
    The architecture is read from the model; `overrides` set what timm does not record (img_size: from the
    model's pretrained config when it has one, else 224; drop_path_rate)."""
    _check_layout(twin)
    attn_stages = [s.blocks for s in twin.stages[1:]]
    mb = twin.stages[0].blocks[0]
    blk = attn_stages[0][0]
    dims = [twin.stages[0].dim] + [s.out_dim for s in twin.stages[1:]]
    cfg = getattr(twin, "pretrained_cfg", None) or {}
    args = dict(
        img_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        in_chans=twin.in_chans,
        dims=dims,
        depths=[len(s.blocks) for s in twin.stages],
        num_heads=[b[0].num_heads for b in attn_stages],
        window_sizes=[b[0].window_size for b in attn_stages],
        mlp_ratio=blk.mlp.fc1.out_features / blk.dim,
        mbconv_expand_ratio=mb.conv1.conv.out_channels / dims[0],
        local_conv_size=blk.local_conv.conv.kernel_size[0],
        num_classes=twin.num_classes,
    )
    model = TinyViT(**{**args, **overrides})
    model.load_state_dict(tiny_vit_from_timm_state_dict(twin.state_dict()), strict=True)
    return model.eval()
