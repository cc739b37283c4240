"""timm's DaViT (`davit_*`, the port of the official release) <-> Tessera's DaViT: the key map and the config.

transformers has no DaViT classifier, so timm's implementation is the reference twin, used by the parity tests only
(timm is a test dependency: scripts/setup.sh installs it outside site-packages, see ops.compat.import_timm).
Key map (the same prefix `stages.i.` on both sides; every tensor keeps its shape and values):

    timm                                          Tessera
    stem.conv / stem.norm                         stem.conv / stem.norm
    stages.i.downsample.norm / .conv              stages.i.downsample.norm / .conv   (stages 1-3)
    stages.i.blocks.j.0.*                         stages.i.blocks.j.spatial.*        (cpe1.proj, norm1, attn.qkv,
    stages.i.blocks.j.1.*                         stages.i.blocks.j.channel.*         attn.proj, cpe2.proj, norm2,
                                                                                      mlp.fc1, mlp.fc2)
    head.norm / head.fc                           norm / head

timm's ChannelAttention keeps the release's projection order (its q, k, v are the paper's V, Q, K), which is the
order models/davit.py reads them in, so the qkv weights need no reordering.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from models.davit import DaViT

# (timm, Tessera) key prefixes; read right-to-left they convert back
_BLOCK = re.compile(r"^(stages\.\d+\.blocks\.\d+\.)(\w+)\.(.*)$")
_KINDS = [("0", "spatial"), ("1", "channel")]
_TOP = [("stem.", "stem."), ("head.norm.", "norm."), ("head.fc.", "head.")]
_STAGE = re.compile(r"^stages\.\d+\.downsample\.(norm|conv)\.")


def _rename(key: str, reverse: bool) -> str:
    block = _BLOCK.match(key)
    if block:
        prefix, kind, rest = block.groups()
        for theirs, ours in _KINDS:
            src, dst = (ours, theirs) if reverse else (theirs, ours)
            if kind == src:
                return f"{prefix}{dst}.{rest}"
    elif _STAGE.match(key):
        return key
    else:
        for theirs, ours in _TOP:
            src, dst = (ours, theirs) if reverse else (theirs, ours)
            if key.startswith(src):
                return dst + key[len(src) :]
    raise KeyError(f"no DaViT key map entry for {key!r}")


def davit_from_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `davit_*` state dict -> Tessera DaViT state dict."""
    return {_rename(k, reverse=False): v for k, v in sd.items()}


def davit_to_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tessera DaViT state dict -> timm `davit_*` state dict (the inverse of davit_from_timm_state_dict). The mask
    token (Tessera's masked-pretraining input) has no timm counterpart and is left out."""
    return {_rename(k, reverse=True): v for k, v in sd.items() if k != "mask_token"}


def _timm():
    from ops.compat import import_timm

    return import_timm().models.davit


def to_timm(model: DaViT) -> nn.Module:
    """timm DaVit holding this model's weights, eval()."""
    h = model.hparams()
    twin = _timm().DaVit(
        in_chans=h["in_chans"],
        depths=tuple(h["depths"]),
        embed_dims=tuple(h["dims"]),
        num_heads=tuple(h["num_heads"]),
        window_size=h["window_size"],
        mlp_ratio=h["mlp_ratio"],
        num_classes=h["num_classes"],
    )
    twin.load_state_dict(davit_to_timm_state_dict(model.state_dict()), strict=True)
    return twin.eval()


def _check_release_layout(twin: nn.Module) -> None:
    """Refuse timm DaViTs whose math differs from the release (the Florence-2 `_fl` variants: 3x3 downsampling,
    ChannelAttentionV2, named blocks; or other constructor options), naming the timm argument that differs."""
    d = _timm()
    stage = twin.stages[1] if len(twin.stages) > 1 else twin.stages[0]
    pair = twin.stages[0].blocks[0]
    spatial, channel = (pair[0], pair[1]) if len(pair) == 2 else (None, None)
    checks = {
        "attn_types (('spatial', 'channel'))": isinstance(spatial, d.SpatialBlock)
        and isinstance(channel, d.ChannelBlock),
        "named_blocks (False)": [k for k, _ in pair.named_children()] == ["0", "1"],
        "channel_attn_v2 (False)": channel is not None and type(channel.attn) is d.ChannelAttention,
        "qkv_bias (True)": spatial is not None and spatial.attn.qkv.bias is not None,
        "ffn (True)": spatial is not None and spatial.mlp is not None and channel.mlp is not None,
        "cpe_act (False)": spatial is not None and isinstance(spatial.cpe1.act, nn.Identity),
        "down_kernel_size (2)": len(twin.stages) < 2 or stage.downsample.conv.kernel_size == (2, 2),
        "norm_eps (1e-5)": twin.stem.norm.eps == 1e-5,
        "head_norm_first (False)": isinstance(twin.norm_pre, nn.Identity)
        and type(twin.head).__name__ == "NormMlpClassifierHead",
    }
    wrong = [field for field, ok in checks.items() if not ok]
    if wrong:
        raise ValueError(f"timm model is not a davit_* release layout; differs in: {', '.join(wrong)}")


def from_timm(twin: nn.Module, **overrides) -> DaViT:
    """Tessera DaViT from a timm `davit_*` model (e.g. timm.create_model('davit_tiny')), eval(). The architecture is
    read from the model; `overrides` set what timm does not record (img_size, drop_path_rate)."""
    _check_release_layout(twin)
    firsts = [s.blocks[0][0] for s in twin.stages]
    dim = firsts[0].dim
    args = dict(
        in_chans=twin.in_chans,
        dims=[b.dim for b in firsts],
        depths=[len(s.blocks) for s in twin.stages],
        num_heads=[b.num_heads for b in firsts],
        window_size=firsts[0].window_size[0],
        mlp_ratio=firsts[0].mlp.fc1.out_features / dim,
        num_classes=twin.num_classes,
    )
    model = DaViT(**{**args, **overrides})
    model.load_state_dict(davit_from_timm_state_dict(twin.state_dict()), strict=True)
    return model.eval()
