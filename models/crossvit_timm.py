"""timm's CrossViT (`crossvit_*_240`, the port of IBM's release) <-> Tessera's CrossViT: the key map and the config.

transformers has no CrossViT, so timm's implementation is the reference twin, for the parity tests only (timm is a
test dependency, see ops.compat.import_timm). Key map (k: multi-scale block, b: branch, j: block in the branch):

    timm                                      Tessera
    cls_token_{b} / pos_embed_{b}             cls_token.{b} / pos_embed.{b}        (ParameterLists)
    patch_embed.{b}.proj                      patch_embed.{b}.proj
    blocks.{k}.blocks.{b}.{j}                 blocks.{k}.branches.{b}.{j}          (ViT blocks, same inside)
    blocks.{k}.projs.{b}.0 / .2               blocks.{k}.fusion.{b}.proj.norm / .fc          (f: LN, GELU, Linear)
    blocks.{k}.fusion.{b}.norm1               blocks.{k}.fusion.{b}.norm
    blocks.{k}.fusion.{b}.attn.wq / wk / wv   blocks.{k}.fusion.{b}.attn.q / k / v
    blocks.{k}.fusion.{b}.attn.proj           blocks.{k}.fusion.{b}.attn.proj
    blocks.{k}.revert_projs.{b}.0 / .2        blocks.{k}.fusion.{b}.revert.norm / .fc        (g: LN, GELU, Linear)
    norm.{b} / head.{b}                       norm.{b} / head.{b}

timm's `depth` triples [d0, d1, 0] are Tessera's pairs [d0, d1] (the trailing 0: one cross-attention per branch);
timm's third mlp_ratio entry is unused (its fusion has no MLP). Not mapped: the `_dagger` models (multi_conv
stems), a fusion depth > 0 and crop_scale=True; from_timm refuses them by name.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn as nn

from models.crossvit import CrossViT

# (timm, Tessera) key prefixes; {k}, {b}, {j} stand for integers, the rest of the key follows unchanged
_MAP = [
    ("cls_token_{b}", "cls_token.{b}"),
    ("pos_embed_{b}", "pos_embed.{b}"),
    ("patch_embed.{b}.proj.", "patch_embed.{b}.proj."),
    ("blocks.{k}.blocks.{b}.{j}.", "blocks.{k}.branches.{b}.{j}."),
    ("blocks.{k}.projs.{b}.0.", "blocks.{k}.fusion.{b}.proj.norm."),
    ("blocks.{k}.projs.{b}.2.", "blocks.{k}.fusion.{b}.proj.fc."),
    ("blocks.{k}.fusion.{b}.norm1.", "blocks.{k}.fusion.{b}.norm."),
    ("blocks.{k}.fusion.{b}.attn.wq.", "blocks.{k}.fusion.{b}.attn.q."),
    ("blocks.{k}.fusion.{b}.attn.wk.", "blocks.{k}.fusion.{b}.attn.k."),
    ("blocks.{k}.fusion.{b}.attn.wv.", "blocks.{k}.fusion.{b}.attn.v."),
    ("blocks.{k}.fusion.{b}.attn.proj.", "blocks.{k}.fusion.{b}.attn.proj."),
    ("blocks.{k}.revert_projs.{b}.0.", "blocks.{k}.fusion.{b}.revert.norm."),
    ("blocks.{k}.revert_projs.{b}.2.", "blocks.{k}.fusion.{b}.revert.fc."),
    ("norm.{b}.", "norm.{b}."),
    ("head.{b}.", "head.{b}."),
]


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # text, name, text, name, ..., text
    body = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(f"^{body}(?P<rest>.*)$")


_COMPILED = [(_pattern(t), t, _pattern(o), o) for t, o in _MAP]


def _rename(key: str, reverse: bool) -> str:
    hits = []
    for theirs, theirs_t, ours, ours_t in _COMPILED:
        src, dst = (ours, theirs_t) if reverse else (theirs, ours_t)
        m = src.match(key)
        if m:
            groups = m.groupdict()
            hits.append(dst.format(**groups) + groups["rest"])
    if len(hits) != 1:
        side = "Tessera" if reverse else "timm"
        raise KeyError(f"{side} CrossViT key {key!r} matches {len(hits)} key map entries, expected one")
    return hits[0]


def crossvit_from_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `crossvit_*` state dict -> Tessera CrossViT state dict."""
    return {_rename(k, reverse=False): v for k, v in sd.items()}


def crossvit_to_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tessera CrossViT state dict -> timm `crossvit_*` state dict (the inverse of crossvit_from_timm_state_dict)."""
    return {_rename(k, reverse=True): v for k, v in sd.items()}


def timm_kwargs(model: CrossViT) -> dict:
    """timm CrossVit's constructor arguments for this architecture."""
    h = model.hparams()
    return dict(
        img_size=h["img_size"],
        img_scale=tuple(h["img_scale"]),
        patch_size=tuple(h["patch_size"]),
        in_chans=h["in_chans"],
        num_classes=h["num_classes"],
        embed_dim=tuple(h["embed_dim"]),
        depth=[[*d, 0] for d in h["depth"]],
        num_heads=tuple(h["num_heads"]),
        mlp_ratio=(*h["mlp_ratio"], 1.0),  # the third entry is the fusion's, unused
        qkv_bias=h["qkv_bias"],
        global_pool=h["global_pool"],
        norm_layer=partial(nn.LayerNorm, eps=h["norm_eps"]),
    )


def _timm():
    from ops.compat import import_timm

    return import_timm().models.crossvit


def to_timm(model: CrossViT) -> nn.Module:
    """timm CrossVit holding this model's weights, eval()."""
    twin = _timm().CrossVit(**timm_kwargs(model))
    twin.load_state_dict(crossvit_to_timm_state_dict(model.state_dict()), strict=True)
    return twin.eval()


def _check_layout(twin: nn.Module) -> None:
    """Refuse timm CrossViTs that Tessera's does not build, naming what differs."""
    cv = _timm()
    blocks = list(twin.blocks)
    checks = {
        "two branches": twin.num_branches == 2,
        "multi_conv=False (a `_dagger` stem)": all(isinstance(pe.proj, nn.Conv2d) for pe in twin.patch_embed),
        "crop_scale=False": not twin.crop_scale,
        "fusion depth 0 (depth[-1] == 0: one cross-attention per branch)": all(
            isinstance(f, cv.CrossAttentionBlock) for blk in blocks for f in blk.fusion
        ),
        "every branch depth >= 1": all(len(blk.blocks) == 2 for blk in blocks),
        "square images and patches": twin.img_size[0] == twin.img_size[1]
        and all(pe.patch_size[0] == pe.patch_size[1] for pe in twin.patch_embed),
    }
    wrong = [what for what, ok in checks.items() if not ok]
    if wrong:
        raise ValueError(f"timm CrossViT not supported; needs: {', '.join(wrong)}")


def from_timm(twin: nn.Module, **overrides) -> CrossViT:
    """Tessera CrossViT from a timm `crossvit_*` model (e.g. timm.create_model('crossvit_tiny_240')), eval().
    The architecture is read from the model; `overrides` set what timm does not record (e.g. drop_path_rate)."""
    _check_layout(twin)
    size = twin.img_size[0]
    scales = [s[0] / size for s in twin.img_size_scaled]  # timm keeps the truncated sizes, not the scales
    if [int(s * size) for s in scales] != [s[0] for s in twin.img_size_scaled]:
        raise ValueError(f"cannot recover img_scale from branch sizes {twin.img_size_scaled} at {size}")
    first = twin.blocks[0].blocks  # branch b's first ViT block: blocks[0].blocks[b][0]
    args = dict(
        img_size=size,
        img_scale=scales,
        patch_size=[pe.patch_size[0] for pe in twin.patch_embed],
        in_chans=twin.in_chans,
        embed_dim=list(twin.embed_dim),
        depth=[[len(branch) for branch in blk.blocks] for blk in twin.blocks],
        num_heads=[b[0].attn.num_heads for b in first],
        mlp_ratio=[b[0].mlp.fc1.out_features / b[0].mlp.fc1.in_features for b in first],
        qkv_bias=first[0][0].attn.qkv.bias is not None,
        global_pool=twin.global_pool,
        num_classes=twin.num_classes,
        norm_eps=twin.norm[0].eps,
    )
    model = CrossViT(**{**args, **overrides})
    model.load_state_dict(crossvit_from_timm_state_dict(twin.state_dict()), strict=True)
    return model.eval()
