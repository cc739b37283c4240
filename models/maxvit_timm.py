"""timm's MaxViT (`maxvit_*_tf_*`, the port of the TF release) <-> Tessera's MaxViT: the key map and the config.

transformers has no MaxViT, so timm's implementation is the reference twin, used by the parity tests and the
benchmark only (timm is a test dependency: scripts/setup.sh installs it outside site-packages, see
ops.compat.import_timm). Key map, per block
`stages.i.blocks.j` (same prefix on both sides):

    timm                                                  Tessera
    stem.conv1 / stem.norm1 / stem.conv2                  stem.conv1 / stem.norm1 / stem.conv2
    conv.shortcut.expand                                  mbconv.shortcut.proj        (1x1 conv after the pool)
    conv.pre_norm / conv.norm1 / conv.norm2               mbconv.pre_norm / mbconv.norm1 / mbconv.norm2
    conv.conv1_1x1 / conv.conv2_kxk / conv.conv3_1x1      mbconv.expand / mbconv.dw / mbconv.project
    conv.se.fc1 / conv.se.fc2                             mbconv.se.fc1 / mbconv.se.fc2
    attn_block.* / attn_grid.*                            block_attn.* / grid_attn.*   (norm1, attn.qkv,
                                                                                      attn.proj, norm2, mlp.fc1/2)
    attn_{block,grid}.attn.rel_pos.relative_position_bias_table   {block,grid}_attn.attn.relative_position_bias_table
        timm: (heads, 2P-1, 2P-1) indexed by key - query offset; Tessera: ((2P-1)^2, heads) indexed by
        query - key (ops.window.relative_position_index, as Swin): ours = theirs.flip(1, 2).flatten(1).T
    head.norm / head.pre_logits.fc / head.fc              norm / pre_logits / head

BatchNorm buffers (running_mean, running_var, num_batches_tracked) follow their module's name.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from models.maxvit import MaxViT

# (timm prefix, Tessera prefix) inside a block (the key after `stages.i.blocks.j.`), first match wins; read
# right-to-left it converts back (the bias tables are spelled out so that no other key matches them)
_TABLE = "relative_position_bias_table"
_BLOCK = [
    ("conv.shortcut.expand.", "mbconv.shortcut.proj."),
    ("conv.pre_norm.", "mbconv.pre_norm."),
    ("conv.conv1_1x1.", "mbconv.expand."),
    ("conv.norm1.", "mbconv.norm1."),
    ("conv.conv2_kxk.", "mbconv.dw."),
    ("conv.norm2.", "mbconv.norm2."),
    ("conv.se.", "mbconv.se."),
    ("conv.conv3_1x1.", "mbconv.project."),
    (f"attn_block.attn.rel_pos.{_TABLE}", f"block_attn.attn.{_TABLE}"),
    (f"attn_grid.attn.rel_pos.{_TABLE}", f"grid_attn.attn.{_TABLE}"),
    ("attn_block.", "block_attn."),
    ("attn_grid.", "grid_attn."),
]
_TOP = [
    ("stem.", "stem."),
    ("head.norm.", "norm."),
    ("head.pre_logits.fc.", "pre_logits."),
    ("head.fc.", "head."),
]


def _rename(key: str, reverse: bool) -> str:
    block = re.match(r"^(stages\.\d+\.blocks\.\d+\.)(.*)$", key)
    prefix, rest = (block.group(1), block.group(2)) if block else ("", key)
    for theirs, ours in _BLOCK if block else _TOP:
        src, dst = (ours, theirs) if reverse else (theirs, ours)
        if rest.startswith(src):
            return prefix + dst + rest[len(src) :]
    raise KeyError(f"no MaxViT key map entry for {key!r}")


def maxvit_from_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `maxvit_*_tf` state dict -> Tessera MaxViT state dict."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_TABLE):  # (heads, 2P-1, 2P-1), key - query -> ((2P-1)^2, heads), query - key
            v = v.flip(1, 2).flatten(1).t().contiguous()
        out[_rename(k, reverse=False)] = v
    return out


def maxvit_to_timm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tessera MaxViT state dict -> timm `maxvit_*_tf` state dict (the inverse of maxvit_from_timm_state_dict)."""
    out = {}
    for k, v in sd.items():
        if k == "mask_token":  # Tessera's masked-pretraining input; timm has none (the forward never uses it)
            continue
        if k.endswith(_TABLE):
            side = int(round(v.shape[0] ** 0.5))  # square windows: (2P-1)^2 offsets
            v = v.t().reshape(-1, side, side).flip(1, 2).contiguous()
        out[_rename(k, reverse=True)] = v
    return out


def _timm():
    from ops.compat import import_timm

    return import_timm().models.maxxvit


def timm_config(model: MaxViT):
    """timm's MaxxVitCfg for this architecture: `maxvit_*_tf` (the TF release) with Tessera's widths and depths."""
    mx = _timm()
    h = model.hparams()
    return mx.MaxxVitCfg(
        embed_dim=tuple(h["dims"]),
        depths=tuple(h["depths"]),
        block_type=("M",) * len(h["dims"]),
        stem_width=h["stem_width"],
        stem_bias=True,
        head_hidden_size=h["dims"][-1],
        conv_cfg=mx.MaxxVitConvCfg(
            expand_ratio=h["expand_ratio"],
            attn_ratio=h["se_ratio"],
            norm_eps=1e-3,
            act_layer="gelu_tanh",
            padding="same",
        ),
        transformer_cfg=mx.MaxxVitTransformerCfg(
            dim_head=h["head_dim"],
            expand_ratio=h["mlp_ratio"],
            window_size=(h["window_size"],) * 2,
            grid_size=(h["grid_size"],) * 2,
            norm_eps=1e-5,
            act_layer="gelu_tanh",
            head_first=False,
            rel_pos_type="bias_tf",
        ),
    )


def to_timm(model: MaxViT) -> nn.Module:
    """timm MaxxVit holding this model's weights (and BatchNorm statistics), eval()."""
    mx = _timm()
    h = model.hparams()
    twin = mx.MaxxVit(
        timm_config(model), img_size=h["img_size"], in_chans=h["in_chans"], num_classes=h["num_classes"]
    )
    twin.load_state_dict(maxvit_to_timm_state_dict(model.state_dict()), strict=True)
    return twin.eval()


def _check_tf_layout(twin: nn.Module) -> None:
    """Refuse timm MaxViTs whose math differs from the TF release (the `_rw` variants: other activations, norms,
    bias tables, no pre-logits MLP) with the timm field that differs."""
    blk = twin.stages[0].blocks[0]
    checks = {
        "model class (MaxxVit with MaxxVitBlock 'M' blocks)": type(blk).__name__ == "MaxxVitBlock",
        "transformer_cfg.rel_pos_type ('bias_tf')": type(blk.attn_block.attn.rel_pos).__name__
        == "RelPosBiasTf",
        "transformer_cfg.head_first (False)": not blk.attn_block.attn.head_first,
        "transformer_cfg.act_layer ('gelu_tanh')": type(blk.attn_block.mlp.act).__name__ == "GELUTanh",
        "transformer_cfg.norm_eps (1e-5)": blk.attn_block.norm1.eps == 1e-5,
        "conv_cfg.act_layer ('gelu_tanh')": type(blk.conv.norm1.act).__name__ == "GELUTanh",
        "conv_cfg.norm_eps (1e-3)": blk.conv.norm1.eps == 1e-3,
        "conv_cfg.pre_norm_act (False)": isinstance(blk.conv.pre_norm.act, nn.Identity),
        "conv_cfg.padding ('same')": type(blk.conv.conv2_kxk).__name__ == "Conv2dSame",
        "conv_cfg.attn_layer ('se', late)": blk.conv.se is not None and blk.conv.se_early is None,
        "head_hidden_size (= embed_dim[-1])": getattr(twin.head, "hidden_size", None) == twin.num_features,
    }
    wrong = [field for field, ok in checks.items() if not ok]
    if wrong:
        raise ValueError(f"timm model is not a maxvit_*_tf layout; differs in: {', '.join(wrong)}")


def from_timm(twin: nn.Module, **overrides) -> MaxViT:
    """Tessera MaxViT from a timm `maxvit_*_tf` model (e.g. timm.create_model('maxvit_tiny_tf_224')), eval().
    The architecture is read from the model; `overrides` set what timm does not record (e.g. drop_path_rate)."""
    _check_tf_layout(twin)
    stages = [s.blocks for s in twin.stages]
    blk = stages[0][0]
    dim = blk.conv.conv3_1x1.out_channels
    args = dict(
        img_size=twin.img_size[0],
        in_chans=twin.in_chans,
        dims=[b[0].conv.conv3_1x1.out_channels for b in stages],
        depths=[len(b) for b in stages],
        stem_width=twin.stem.out_chs,
        head_dim=blk.attn_block.attn.dim_head,
        window_size=blk.attn_block.partition_size[0],
        grid_size=blk.attn_grid.partition_size[0],
        mlp_ratio=blk.attn_block.mlp.fc1.out_features / dim,
        expand_ratio=blk.conv.conv1_1x1.out_channels / dim,
        se_ratio=blk.conv.se.fc1.out_channels / dim,
        num_classes=twin.num_classes,
    )
    model = MaxViT(**{**args, **overrides})
    model.load_state_dict(maxvit_from_timm_state_dict(twin.state_dict()), strict=True)
    return model.eval()
