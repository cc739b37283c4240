"""PVT v2: Improved Baselines with Pyramid Vision Transformer (Wang et al. 2022).

Four stages at strides 4, 8, 16, 32 (default strides). Each stage is
  an overlapping patch embedding: a conv whose kernel is larger than its stride (k=7 s=4 for the stem, k=3 s=2
      after), padding k // 2, then LayerNorm;
  blocks of spatial-reduction attention (keys/values from the map shrunk sr x by a stride-sr conv + LayerNorm;
      sr = 8, 4, 2, 1 per stage; ops/spatial_reduction.py) and a convolutional feed-forward (a depthwise 3x3
      conv between fc1 and the GELU; with the zero-padded overlapping convs it replaces position embeddings);
  a LayerNorm, whose output feeds the next stage.
The "li" sizes use linear SRA: keys/values average-pooled to 7x7 (+ 1x1 conv, LayerNorm, GELU), and a ReLU
after fc1.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> (B, C_4, h_4, w_4), the last stage's map after its LayerNorm
      (= transformers' PvtV2Model last_hidden_state)
  forward_head(x, pre_logits=True) -> (B, C_4), the mean over positions (what PvtV2ForImageClassification
      feeds its classifier; there is no norm after the pooling)
  forward_intermediates(images) -> stage i's map after its LayerNorm, (B, C_i, h_i, w_i) = PvtV2Model
      hidden_states[i] (one entry per stage, no embedding entry). The stage norm is part of the stage: nothing
      downstream ever reads the un-normed map.
  mask: (B, h_1, w_1) bool at the stem grid (stem_stride = 4): True replaces the stem's normed tokens.
Any input size runs, as in the reference: each conv gives h = floor((H + 2 (k // 2) - k) / s) + 1 (ceil(H / s)
for the default kernels), and the SR conv drops the rows/columns past its last full sr x sr cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_blocks
from models.layers import drop_path, drop_path_rates
from models.registry import register_sizes
from ops.spatial_reduction import reduce_map, sr_attention


def _tokens_to_map(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)  # (B, N, C) -> (B, C, H, W)


class OverlapPatchEmbed(nn.Module):
    """Conv with kernel > stride (neighbouring patches overlap), zero padding k // 2, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, h, w)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw  # (B, h * w, D)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention with keys/values from the map reduced sr x (conv) or pooled to 7x7 (linear)."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, linear: bool, qkv_bias: bool, eps: float, backend: str
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.sr_ratio, self.linear, self.backend = num_heads, sr_ratio, linear, backend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # [keys | values]
        self.proj = nn.Linear(dim, dim)
        self.sr = self.norm = None
        if linear or sr_ratio > 1:
            k = 1 if linear else sr_ratio
            self.sr = nn.Conv2d(dim, dim, kernel_size=k, stride=k)
            self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        kv = x if self.sr is None else self.reduce(x, hw)  # (B, M, C)
        return self.proj(sr_attention(self.q(x), self.kv(kv), self.num_heads, self.backend))

    def reduce(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:  # (B, N, C) -> (B, M, C)
        return reduce_map(x, hw, self.sr, self.norm, self.linear)  # calls the modules (ZeRO-3 gathers them)


class ConvFeedForward(nn.Module):
    """fc1 -> (ReLU, linear SRA only) -> depthwise 3x3 conv -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, linear: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.linear = linear

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        x = self.fc1(x)  # (B, N, hidden)
        if self.linear:
            x = F.relu(x)
        x = self.dwconv(_tokens_to_map(x, hw)).flatten(2).transpose(1, 2)  # (B, N, hidden)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    """Pre-norm block: x + SRA(norm1(x)), then x + ConvFFN(norm2(x)), each with stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        linear: bool,
        qkv_bias: bool,
        drop_path: float,
        eps: float,
        backend: str,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio, linear, qkv_bias, eps, backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ConvFeedForward(dim, int(dim * mlp_ratio), linear)  # int(), as the reference and HF
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        x = x + drop_path(self.attn(self.norm1(x), hw), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x), hw), self.drop_path, self.training)


class PVTStage(nn.Module):
    """[overlapping patch embedding] -> blocks -> LayerNorm. Stage 0's embedding is the model's stem."""

    def __init__(self, in_dim: int, dim: int, depth: int, patch: int, stride: int, dpr: list[float], **blk):
        super().__init__()
        self.downsample = OverlapPatchEmbed(in_dim, dim, patch, stride, blk["eps"]) if in_dim else None
        self.blocks = nn.ModuleList(Block(dim, drop_path=p, **blk) for p in dpr[:depth])
        self.norm = nn.LayerNorm(dim, eps=blk["eps"])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The previous stage's map (B, C_prev, H, W), or stage 0's stem tokens (B, N, C) on grid `hw`
        -> this stage's normed map (B, C, h, w)."""
        if self.downsample is not None:
            x, hw = self.downsample(x)  # (B, h * w, C)
        x = run_blocks(self, self.blocks, x, hw)
        return _tokens_to_map(self.norm(x), hw)  # (B, C, h, w)


def _init_weights(m: nn.Module) -> None:
    """The reference PVT v2 init: truncated-normal linears, fan-out (He) normal convs, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class PyramidVisionTransformerV2(HierarchicalBackbone):
    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dims: Sequence[int] = (32, 64, 160, 256),
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        linear: bool = False,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        mask_token: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        per_stage = dict(
            depths=depths,
            num_heads=num_heads,
            mlp_ratios=mlp_ratios,
            sr_ratios=sr_ratios,
            patch_sizes=patch_sizes,
            strides=strides,
        )
        for name, v in per_stage.items():
            if len(v) != len(embed_dims):
                raise ValueError(f"{name} has {len(v)} entries for {len(embed_dims)} stages (embed_dims)")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.norm_eps, self.linear = img_size, in_chans, norm_eps, linear
        self.qkv_bias, self.drop_path_rate = qkv_bias, drop_path_rate
        self.embed_dims = tuple(embed_dims)
        self.depths, self.num_heads, self.mlp_ratios = tuple(depths), tuple(num_heads), tuple(mlp_ratios)
        self.sr_ratios, self.patch_sizes, self.strides = tuple(sr_ratios), tuple(patch_sizes), tuple(strides)
        self.num_features = self.embed_dims[-1]
        self.stem_stride = self.strides[0]

        dims = self.embed_dims
        self.patch_embed = OverlapPatchEmbed(in_chans, dims[0], patch_sizes[0], strides[0], norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dims[0])) if mask_token else None
        total = sum(self.depths)
        dpr = drop_path_rates(drop_path_rate, total)
        self.stages = nn.ModuleList()
        self.feature_info, reduction = [], 1
        for i, dim in enumerate(self.embed_dims):
            first = sum(self.depths[:i])
            self.stages.append(
                PVTStage(
                    in_dim=self.embed_dims[i - 1] if i else 0,
                    dim=dim,
                    depth=self.depths[i],
                    patch=self.patch_sizes[i],
                    stride=self.strides[i],
                    dpr=dpr[first:],
                    num_heads=self.num_heads[i],
                    mlp_ratio=self.mlp_ratios[i],
                    sr_ratio=self.sr_ratios[i],
                    linear=linear,
                    qkv_bias=qkv_bias,
                    eps=norm_eps,
                    backend=attn_backend,
                )
            )
            reduction *= self.strides[i]
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # --- contract -------------------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()  # PVT v2 has no position tables

    def group_matcher(self, coarse: bool = False) -> dict:
        """Stem, then (coarse) one group per stage or (fine) one per block, a stage's downsample joining its
        first block and its norm its last; the head."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ]
        )
        return {"stem": r"^patch_embed|^mask_token", "blocks": blocks, "head": r"^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None):
        """Stem tokens (B, h * w, C_1) and their grid (h, w); masked positions hold the mask token (or 0)."""
        x, hw = self.patch_embed(images)  # (B, N, C_1)
        if mask is not None:  # on the (B, h, w, C_1) grid of the tokens
            x = replace_masked(x.unflatten(1, hw), mask, self.mask_token, "channels_last").flatten(1, 2)
        return x, hw

    def run_stage(self, i: int, x) -> torch.Tensor:
        """Stage 0 takes `embed`'s (tokens, hw), the others the previous map -> (B, C_i, h_i, w_i), normed."""
        return self.stages[0](*x) if i == 0 else self.stages[i](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, C_4)
        return x if pre_logits else self.head(x)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (for checkpoints and export)."""
        return dict(
            img_size=self.img_size,
            in_chans=self.in_chans,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            embed_dims=list(self.embed_dims),
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            mlp_ratios=list(self.mlp_ratios),
            sr_ratios=list(self.sr_ratios),
            patch_sizes=list(self.patch_sizes),
            strides=list(self.strides),
            linear=self.linear,
            qkv_bias=self.qkv_bias,
            drop_path_rate=self.drop_path_rate,
            norm_eps=self.norm_eps,
            mask_token=self.mask_token is not None,
        )


# name: (embed_dims, depths); heads (1, 2, 5, 8), sr (8, 4, 2, 1), mlp ratios (8, 8, 4, 4) unless given.
# `test` is CI-sized; b0-b5 are the paper's sizes (b2 is its common "base"); `li` = linear SRA.
_B = (64, 128, 320, 512)
_SIZES = {
    "pvt_v2_test": dict(
        embed_dims=(16, 32, 48, 64),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 3, 4),
        mlp_ratios=(4, 4, 4, 4),
        img_size=64,
    ),
    "pvt_v2_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "pvt_v2_b1": dict(embed_dims=_B, depths=(2, 2, 2, 2)),
    "pvt_v2_b2": dict(embed_dims=_B, depths=(3, 4, 6, 3)),
    "pvt_v2_b2_li": dict(embed_dims=_B, depths=(3, 4, 6, 3), linear=True),
    "pvt_v2_b3": dict(embed_dims=_B, depths=(3, 4, 18, 3)),
    "pvt_v2_b4": dict(embed_dims=_B, depths=(3, 8, 27, 3)),
    "pvt_v2_b5": dict(embed_dims=_B, depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4)),
}
register_sizes(
    PyramidVisionTransformerV2,
    {name: {"img_size": 224, "num_heads": (1, 2, 5, 8), **kw} for name, kw in _SIZES.items()},
    smoke=dict(img_size=64, depths=(1, 1, 1, 1)),  # CPU-test size (see models/__init__.py)
)
