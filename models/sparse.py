"""Sparse convolution by dense emulation (SparK, Tian et al. 2023; ConvNeXt V2's FCMAE, Woo et al. 2023), and the
two decoders and the loss that pretrain a convnet on the visible part of a masked image.

The encoder is the backbone itself: `sparse_forward(backbone, images, active)` runs a plain ConvNeXt, ConvNeXt V2 or
PoolFormer with its own modules and parameters, so the trained backbone exports unchanged. Masked positions stay
exactly zero at every layer, so a visible output only ever sees visible inputs (submanifold sparse convolution):
  - masked input pixels are zeroed first;
  - every layer that can spread values or write a bias into masked positions (convs, norms, GRN, 1x1 convs and
    linears with bias, pooling) is followed by `torch.where(visible, x, 0)` (`where`, not a product: NaN * 0 = NaN);
  - LayerNorm is per position; GroupNorm(1, C) (PoolFormer) and GRN take their statistics over visible positions
    only; PoolFormer's pooling averages the visible neighbours only (divided by their count), minus x.
GRN: `grn_stats="sample"` (default) takes each sample's L2 norm over its visible positions (the dense GRN's
definition; batch-independent); "batch" takes the norm over the visible positions of the whole batch, as the
official MinkowskiEngine code (ConvNeXt-V2 `utils.py`, MinkowskiGRN) does.
The mask is given at the mask-cell grid (B, h, w), True = visible; a mask cell covers a whole number of
final-stage cells, so every stage's mask is the cell mask repeated (`stage_masks`).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.convnext import ConvNeXt, ConvNeXtBlock
from models.hierarchical import run_block
from models.layers import drop_path
from models.mae import mae_loss, patchify
from models.masking import upsample_mask
from models.poolformer import PoolFormer, Pooling

GRN_STATS = ("sample", "batch")


def supports_sparse(backbone: nn.Module) -> bool:
    """Whether `sparse_forward` can run this backbone (ConvNeXt, ConvNeXt V2, PoolFormer with pooling mixers)."""
    return isinstance(backbone, ConvNeXt | PoolFormer)


def final_reduction(backbone: nn.Module) -> int:
    """Pixels per cell of the last stage's grid (32 for the standard sizes): the smallest mask cell."""
    return int(backbone.feature_info[-1]["reduction"])


def _visible(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x where m (broadcastable, True = visible), exactly 0 elsewhere."""
    return torch.where(m, x, 0.0)


def stage_masks(backbone: nn.Module, active: torch.Tensor, image_hw: tuple[int, int]) -> list[torch.Tensor]:
    """The visible mask of every stage, (B, H_i, W_i) bool, from `active` (B, h, w) at the mask-cell grid of an
    `image_hw` image; ValueError naming the grids when a mask cell is not whole final-stage cells."""
    H, W = image_hw
    if active.ndim != 3 or active.dtype != torch.bool:
        raise ValueError(
            f"active must be a (B, h, w) bool mask (True = visible), got {active.dtype} {tuple(active.shape)}"
        )
    h, w = active.shape[1:]
    cell, last = H // h, final_reduction(backbone)
    if H % h or W % w or W // w != cell or cell % last:
        raise ValueError(
            f"mask grid {h}x{w} on a {H}x{W} image: a mask cell must be square and a whole number of the final "
            f"stage's {last}x{last}-pixel cells ({H // last}x{W // last} grid)"
        )
    return [upsample_mask(active, cell // int(f["reduction"])) for f in backbone.feature_info]


def sparse_forward(
    backbone: nn.Module, images: torch.Tensor, active: torch.Tensor, grn_stats: str = "sample"
) -> list[torch.Tensor]:
    """Every stage's output (B, C_i, H_i, W_i) of `backbone` on the visible part of `images` (B, C, H, W), zeros
    at masked positions; `active` (B, h, w) bool at the mask-cell grid, True = visible. Drop path and the
    backbone's activation checkpointing apply as in its own forward."""
    if grn_stats not in GRN_STATS:
        raise ValueError(f"grn_stats must be one of {GRN_STATS}, got {grn_stats!r}")
    masks = stage_masks(backbone, active, tuple(images.shape[-2:]))
    cell = images.shape[-2] // active.shape[1]
    x = _visible(images, upsample_mask(active, cell).unsqueeze(1))  # (B, C, H, W), masked pixels 0
    if isinstance(backbone, ConvNeXt):
        return _convnext(backbone, x, masks, grn_stats)
    if isinstance(backbone, PoolFormer):
        return _poolformer(backbone, x, masks)
    raise TypeError(
        f"no sparse emulation of {type(backbone).__name__}; it covers ConvNeXt (V2) and PoolFormer"
    )


def _on_grid(x: torch.Tensor, m: torch.Tensor, where: str) -> torch.Tensor:
    """x (B, C, H, W) re-masked by its stage mask m (B, 1, H, W); ValueError naming the layer when the grids
    differ (a stem or downsampling that does not divide the image evenly)."""
    if x.shape[-2:] != m.shape[-2:]:
        raise ValueError(f"{where}: map is {tuple(x.shape[-2:])}, its stage mask {tuple(m.shape[-2:])}")
    return _visible(x, m)


# --- ConvNeXt / ConvNeXt V2 ------------------------------------------------------------------------------------


def _convnext(
    net: ConvNeXt, x: torch.Tensor, masks: list[torch.Tensor], grn_stats: str
) -> list[torch.Tensor]:
    m = masks[0].unsqueeze(1)  # (B, 1, H0, W0)
    x = _on_grid(net.stem[0](x), m, "stem")  # 4x4 s4 conv: its window stays inside a mask cell
    x = _visible(net.stem[1](x), m)  # LayerNorm2d: per position
    outs = []
    for i, stage in enumerate(net.stages):
        m = masks[i].unsqueeze(1)  # (B, 1, H_i, W_i)
        if i > 0:  # LayerNorm2d at the previous grid, then the 2x2 s2 conv (windows all visible or masked)
            x = _visible(stage.downsample[0](x), masks[i - 1].unsqueeze(1))
            x = _on_grid(stage.downsample[1](x), m, f"stages.{i}.downsample")
        for blk in stage.blocks:
            x = run_block(net, partial(_convnext_block, blk, grn_stats=grn_stats), x, m)
        outs.append(x)
    return outs


def _convnext_block(blk: ConvNeXtBlock, x: torch.Tensor, m: torch.Tensor, grn_stats: str) -> torch.Tensor:
    """One block on a map that is zero at masked positions; m (B, 1, H, W) True = visible."""
    ml = m.permute(0, 2, 3, 1)  # (B, H, W, 1): channels-last mask
    y = _visible(blk.dwconv(x), m).permute(0, 2, 3, 1)  # (B, H, W, C)
    y = _visible(blk.norm(y), ml)
    y = _visible(F.gelu(blk.pwconv1(y)), ml)  # (B, H, W, 4C): GELU(bias) != 0 before the re-mask
    if blk.grn is not None:
        y = _visible(sparse_grn(blk.grn, y, grn_stats), ml)  # beta written everywhere: re-mask
    y = _visible(blk.pwconv2(y), ml)  # (B, H, W, C)
    if blk.gamma is not None:
        y = blk.gamma * y
    return x + drop_path(y.permute(0, 3, 1, 2), blk.drop_path, blk.training)


def sparse_grn(grn: nn.Module, x: torch.Tensor, stats: str = "sample") -> torch.Tensor:
    """`grn` (models.convnext.GRN) on a channels-last map (B, H, W, C) that is zero at masked positions, so the
    L2 norms run over visible positions only: per sample ("sample", the dense GRN on that map) or over the whole
    batch ("batch", MinkowskiGRN's `torch.norm(x.F, dim=0)` over every visible point of the batch)."""
    if stats == "sample":
        return grn(x)
    gx = torch.linalg.vector_norm(x, ord=2, dim=(0, 1, 2), keepdim=True)  # (1, 1, 1, C)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)  # (1, 1, 1, C)
    return grn.gamma * (x * nx) + grn.beta + x


# --- PoolFormer ------------------------------------------------------------------------------------------------


def _poolformer(net: PoolFormer, x: torch.Tensor, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    m = masks[0].unsqueeze(1)  # (B, 1, H0, W0)
    x = _on_grid(net.stem(x), m, "stem")  # k7 s4 p2: reads neighbouring cells, whose masked pixels are 0
    outs = []
    for i, stage in enumerate(net.stages):
        m = masks[i].unsqueeze(1)
        if i > 0:
            x = _on_grid(stage.downsample(x), m, f"stages.{i}.downsample")  # k3 s2 p1 conv
        for blk in stage.blocks:
            x = run_block(stage, _metaformer_block, blk, x, m)
        outs.append(x)
    return outs


def _metaformer_block(blk: nn.Module, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if not isinstance(blk.token_mixer, Pooling):
        raise TypeError(f"no sparse emulation of the token mixer {type(blk.token_mixer).__name__}")
    y = sparse_pool(blk.token_mixer, sparse_group_norm(blk.norm1, x, m), m)
    x = x + drop_path(blk.ls1(y), blk.drop_path, blk.training)  # layer scale: no bias, zeros stay zeros
    y = _visible(F.gelu(blk.mlp.fc1(sparse_group_norm(blk.norm2, x, m))), m)
    y = _visible(blk.mlp.fc2(y), m)
    return x + drop_path(blk.ls2(y), blk.drop_path, blk.training)


def sparse_group_norm(norm: nn.GroupNorm, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """GroupNorm(1, C) with each sample's mean and (biased) variance over its visible positions and all channels;
    x (B, C, H, W) zero at masked positions, m (B, 1, H, W) True = visible. Computed in fp32, as autocast does."""
    if norm.num_groups != 1:
        raise ValueError(f"sparse_group_norm covers GroupNorm(1, C), got {norm.num_groups} groups")
    xf = x.float()
    n = m.sum(dim=(1, 2, 3), keepdim=True).clamp(min=1) * x.shape[1]  # (B, 1, 1, 1) visible values
    mean = xf.sum(dim=(1, 2, 3), keepdim=True) / n
    var = _visible((xf - mean) ** 2, m).sum(dim=(1, 2, 3), keepdim=True) / n
    y = (xf - mean) * torch.rsqrt(var + norm.eps)
    if norm.affine:
        y = y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return _visible(y, m)


def sparse_pool(mixer: Pooling, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """PoolFormer's mixer on visible positions: the mean of the visible neighbours in the window (their count,
    not the window's), minus x; x (B, C, H, W) zero at masked positions, m (B, 1, H, W)."""
    p = mixer.pool_size
    total = F.avg_pool2d(x, p, stride=1, padding=p // 2, divisor_override=1)  # window sums; masked add 0
    count = F.avg_pool2d(m.to(x.dtype), p, stride=1, padding=p // 2, divisor_override=1)  # (B, 1, H, W)
    return _visible(total / count.clamp(min=1) - x, m)


# --- decoders and loss -----------------------------------------------------------------------------------------


def _init_conv(module: nn.Module) -> None:
    """Truncated-normal(0.02) conv and linear weights, zero biases (both papers' decoders)."""
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class Densify(nn.Module):
    """SparK's per-stage densifier: LayerNorm over channels at visible positions, a learned mask token at the
    masked ones, then a projection to the decoder's width at that scale (1x1 at the smallest scale, 3x3 elsewhere,
    none when the smallest scale's widths already match)."""

    def __init__(self, in_dim: int, out_dim: int, smallest: bool):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, in_dim, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if smallest and in_dim == out_dim:
            self.proj = nn.Identity()
        else:
            k = 1 if smallest else 3
            self.proj = nn.Conv2d(in_dim, out_dim, k, padding=k // 2)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # (B, C, H, W), m (B, H, W) visible
        x = self.norm(x.permute(0, 2, 3, 1)).permute(
            0, 3, 1, 2
        )  # per position; masked ones are replaced next
        x = torch.where(m.unsqueeze(1), x, self.mask_token.to(x.dtype))
        return self.proj(x)  # (B, out_dim, H, W)


class UNetBlock(nn.Module):
    """x2 upsampling (4x4 stride-2 transposed conv), then 3x3 conv + BN + ReLU6 and 3x3 conv + BN (SparK's)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_dim, in_dim, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv2d(in_dim, in_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_dim),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_dim, out_dim, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, out, 2H, 2W)
        return self.conv(self.up(x))


class SparKDecoder(nn.Module):
    """Densify every stage, then a light UNet from the last stage's grid up to pixels: log2(reduction) blocks,
    each halving the width (from `dim`) and doubling the grid; a densified stage map is added where the grid
    matches its stage; a final 1x1 conv gives `in_chans` channels. `widths`/`reductions`: the backbone's stages."""

    def __init__(self, widths: list[int], reductions: list[int], in_chans: int, dim: int = 768):
        super().__init__()
        top = reductions[-1]
        n = int(math.log2(top))
        if 2**n != top or any(top % r or (top // r) & (top // r - 1) for r in reductions):
            raise ValueError(f"the UNet decoder needs power-of-two stage reductions, got {reductions}")
        if dim >> n < 1:
            raise ValueError(f"decoder width {dim} halves {n} times to nothing; give at least {2**n}")
        self.levels = [int(math.log2(top // r)) for r in reductions]  # stage i joins before block levels[i]
        self.densify = nn.ModuleList(
            Densify(c, dim >> lvl, smallest=lvl == 0) for c, lvl in zip(widths, self.levels)
        )
        self.blocks = nn.ModuleList(UNetBlock(dim >> k, dim >> (k + 1)) for k in range(n))
        self.proj = nn.Conv2d(dim >> n, in_chans, 1)
        _init_conv(self)

    def forward(self, feats: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
        """feats (B, C_i, H_i, W_i) and masks (B, H_i, W_i) (True = visible) per stage -> (B, in_chans, H, W)."""
        dense = [d(f, m) for d, f, m in zip(self.densify, feats, masks)]
        x = 0
        for k in range(len(self.blocks) + 1):
            for lvl, y in zip(self.levels, dense):
                if lvl == k:
                    x = x + y  # (B, dim >> k, H_top * 2**k, ...)
            if k < len(self.blocks):
                x = self.blocks[k](x)
        return self.proj(x)


class FCMAEDecoder(nn.Module):
    """FCMAE's decoder: 1x1 conv from the last stage to `dim`, a learned mask token at masked cells, `depth` dense
    ConvNeXt V2 blocks, a 1x1 conv to the `reduction`**2 * in_chans pixels of each last-stage cell."""

    def __init__(self, in_dim: int, reduction: int, in_chans: int, dim: int = 512, depth: int = 1):
        super().__init__()
        self.reduction, self.in_chans = reduction, in_chans
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.blocks = nn.ModuleList(
            ConvNeXtBlock(dim, layer_scale_init_value=0.0, grn=True) for _ in range(depth)
        )
        self.pred = nn.Conv2d(dim, reduction**2 * in_chans, 1)
        _init_conv(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """x (B, C, h, w) the last stage, m (B, h, w) True = visible -> (B, in_chans, h * r, w * r) pixels."""
        x = self.proj(x)  # (B, dim, h, w)
        x = torch.where(m.unsqueeze(1), x, self.mask_token.to(x.dtype))
        for blk in self.blocks:
            x = blk(x)
        x = self.pred(x)  # (B, r*r*C, h, w), channels ordered (row, col, channel) as MAE's patchify
        B, _, h, w = x.shape
        r, c = self.reduction, self.in_chans
        x = x.reshape(B, r, r, c, h, w).permute(0, 3, 4, 1, 5, 2)  # (B, C, h, r, w, r)
        return x.reshape(B, c, h * r, w * r)


def masked_patch_loss(
    pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """MSE of pred (B, L, p*p*C) against the image's patches (p = H / h, one per mask cell), each target patch
    normalized by its own mean and unbiased variance (+1e-6) when `norm_pix`, averaged over masked patches only;
    mask (B, h, w) bool, True = masked (SparK's and FCMAE's loss)."""
    p = images.shape[-2] // mask.shape[1]
    target = patchify(images.float(), p)  # (B, L, p*p*C), normalized in fp32 even under bf16
    return mae_loss(pred, target, mask.flatten(1).to(target.dtype), norm_pix)
