"""DaViT (Ding et al., "DaViT: Dual Attention Vision Transformers", ECCV 2022), the layout of the official release.

Stem: 7x7 conv stride 4 (the input zero-padded at the bottom/right to a multiple of 4 first), LayerNorm -> H/4.
Then 4 stages; stages 1-3 open with a downsampling layer (LayerNorm, 2x2 conv stride 2, the map zero-padded to an
even size first). Every block of a stage is a dual attention block: a spatial block, then a channel block. Each is
    x = x + dwconv3x3(x)                      (conv positional encoding "cpe1", no activation)
    x = x + drop_path(attention(norm1(x)))
    x = x + dwconv3x3(x)                      ("cpe2")
    x = x + drop_path(mlp(norm2(x)))          (Linear, GELU (erf), Linear; 4x)
Spatial attention: multi-head self-attention inside non-overlapping P x P windows (P = 7), scale head_dim^-0.5,
no position bias (the cpe gives position). A map that P does not divide is zero-padded at the bottom/right after
norm1 and the padded tokens take part as keys unmasked, as in the release (timm's port does the same).
Channel attention (the paper's eq. 3): the C channels split into G groups (G = the stage's heads) of Cg = C / G;
per group the channels are the tokens and the spatial positions their features:
    A = softmax_c'(Q^T K / sqrt(Cg))  (Cg, Cg), over all H * W positions;  out = V A^T  (H*W, Cg)
so each output channel mixes the group's channels with weights computed from the whole image (global, linear in
H * W). The release's fused projection emits the paper's V, Q, K in that order (its code names them q, k, v).
Head: global average pool, LayerNorm, classifier.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> last stage map (B, C, ceil(H/32), ceil(W/32)), un-normed (timm's
      forward_features of davit_*; the norm sits in forward_head, as timm's NormMlpClassifierHead)
  forward_head(x, pre_logits=True) -> LayerNorm(mean_hw(x)) (B, C)
  forward_intermediates(images) -> stage i's output (B, C_i, H/2^(i+2), W/2^(i+2)) = timm's
      forward_intermediates(x, intermediates_only=True)[i]
  stem_stride = 4: `mask` is (B, ceil(H/4), ceil(W/4)) and replaces the normed stem output (mask token or zeros).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.convnext import LayerNorm2d
from models.hierarchical import HierarchicalBackbone, replace_masked, run_blocks
from models.layers import Mlp, drop_path, drop_path_rates
from models.registry import register_sizes
from ops.attention import attention
from ops.window import pad_to_multiple, window_partition, window_reverse

LN_EPS = 1e-5  # every LayerNorm (stem, downsampling, blocks, head), as the release


def pad_bottom_right(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom/right so H, W are multiples of `multiple`."""
    ph, pw = (-x.shape[-2]) % multiple, (-x.shape[-1]) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class Stem(nn.Module):
    """(B, C_in, H, W) -> (B, C, ceil(H/4), ceil(W/4)): pad to a multiple of 4, 7x7 conv stride 4 (padding 3),
    LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=3)
        self.norm = LayerNorm2d(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(pad_bottom_right(x, 4)))


class Downsample(nn.Module):
    """(B, C_in, H, W) -> (B, C, ceil(H/2), ceil(W/2)): LayerNorm, pad to even, 2x2 conv stride 2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=LN_EPS)
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_bottom_right(self.norm(x), 2))


class ConvPosEnc(nn.Module):
    """Conv positional encoding: x + dwconv3x3(x) on a channels-first map (B, C, H, W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention among the N = P * P tokens of each window, no position bias."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto"):
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B * nW, N, C) -> (B * nW, N, C)
        BW, N, C = x.shape
        q, k, v = self.qkv(x).view(BW, N, 3, self.num_heads, self.head_dim).unbind(2)  # each (BW, N, h, hd)
        x = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=self.backend)
        return self.proj(x.transpose(1, 2).reshape(BW, N, C))  # attention out: (BW, h, N, hd)


class ChannelAttention(nn.Module):
    """Channel group attention (eq. 3 of the paper): per group of Cg channels, a (Cg, Cg) attention over channels
    whose logits are dot products over all N tokens, scaled by Cg^-0.5."""

    def __init__(self, dim: int, num_groups: int):
        super().__init__()
        self.num_groups, self.group_dim = num_groups, dim // num_groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C)
        B, N, C = x.shape
        # the release's order of the three projections is (V, Q, K) in the paper's names
        v, q, k = self.qkv(x).view(B, N, 3, self.num_groups, self.group_dim).unbind(2)  # each (B, N, G, Cg)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, G, N, Cg)
        # logits[c, c'] = sum_n q[n, c] k[n, c'] / sqrt(Cg); out[n, c] = sum_c' A[c, c'] v[n, c']
        logits = (q * self.group_dim**-0.5).transpose(-2, -1) @ k  # (B, G, Cg, Cg)
        x = v @ logits.softmax(dim=-1).transpose(-2, -1)  # (B, G, N, Cg)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class AttentionBlock(nn.Module):
    """cpe, pre-norm attention with a residual, cpe, pre-norm MLP with a residual, on a channels-first map;
    subclasses define `mix` (the attention, channels-last)."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.cpe1 = ConvPosEnc(dim)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.cpe2 = ConvPosEnc(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def mix(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        x = self.cpe1(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = x + drop_path(self.mix(self.norm1(x)), self.drop_path, self.training)
        x = self.cpe2(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x.permute(0, 3, 1, 2)


class SpatialBlock(AttentionBlock):
    """Window attention (P x P windows; padded at the bottom/right, padding unmasked as in the release)."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, drop_path: float, backend: str
    ):
        super().__init__(dim, mlp_ratio, drop_path)
        self.window_size = (window_size, window_size)
        self.attn = WindowAttention(dim, num_heads, backend)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = pad_to_multiple(x, self.window_size)  # (B, Hp, Wp, C), zeros after the norm
        Hp, Wp = x.shape[1:3]
        x = self.attn(window_partition(x, self.window_size))  # (B * nW, P * P, C)
        return window_reverse(x, self.window_size, Hp, Wp)[:, :H, :W]


class ChannelBlock(AttentionBlock):
    """Channel group attention over the whole map (groups = the stage's heads)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__(dim, mlp_ratio, drop_path)
        self.attn = ChannelAttention(dim, num_heads)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        return self.attn(x.reshape(B, H * W, C)).view(B, H, W, C)


class DualBlock(nn.Module):
    """A spatial block, then a channel block (one stochastic-depth rate for both)."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, drop_path: float, backend: str
    ):
        super().__init__()
        self.spatial = SpatialBlock(dim, num_heads, window_size, mlp_ratio, drop_path, backend)
        self.channel = ChannelBlock(dim, num_heads, mlp_ratio, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.channel(self.spatial(x))


class DaViTStage(nn.Module):
    """Optional downsampling (every stage but the first), then `depth` dual attention blocks."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, drop_paths: Sequence[float], **block_kwargs):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else nn.Identity()
        self.blocks = nn.ModuleList(
            DualBlock(dim, drop_path=drop_paths[j], **block_kwargs) for j in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C, H', W')
        return run_blocks(self, self.blocks, self.downsample(x))


class DaViT(HierarchicalBackbone):
    stem_stride = 4

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (1, 1, 3, 1),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        dims, depths, num_heads = (
            [int(d) for d in dims],
            [int(d) for d in depths],
            [int(h) for h in num_heads],
        )
        if not (len(dims) == len(depths) == len(num_heads)) or not dims or min(depths) < 1:
            raise ValueError(
                f"dims {dims}, depths {depths} and num_heads {num_heads} must be non-empty, of equal length, "
                "depths >= 1"
            )
        bad = [(d, h) for d, h in zip(dims, num_heads) if h < 1 or d % h]
        if bad:
            raise ValueError(f"each width must be divisible by its number of heads, got (dim, heads) {bad}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.dims, self.depths = img_size, in_chans, dims, depths
        self.num_heads, self.window_size, self.mlp_ratio = num_heads, window_size, mlp_ratio
        self.drop_path_rate = drop_path_rate
        self.num_features = dims[-1]
        self.stem = Stem(in_chans, dims[0])
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0], 1, 1)) if mask_token else None
        dpr = drop_path_rates(drop_path_rate, sum(depths))  # linear over all dual blocks
        self.stages = nn.ModuleList(
            DaViTStage(
                dims[i - 1] if i else None,
                dims[i],
                depths[i],
                dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                backend=attn_backend,
            )
            for i in range(len(dims))
        )
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)  # head: pool, norm, classifier
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=2 ** (i + 2), module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The release's init: truncated-normal(0.02) linears with zero biases; convs and norms keep PyTorch's
        defaults."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then stages or dual blocks (a
        stage's downsampling joins its first block, as timm), then the head."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )
        return {"stem": r"^stem|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normed stem output (B, C0, ceil(H/4), ceil(W/4)); masked positions (True) become the mask token or
        zeros."""
        return replace_masked(self.stem(images), mask, self.mask_token, "channels_first")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(-2, -1)))  # (B, C)
        return x if pre_logits else self.head(x)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (lists, so YAML can hold them)."""
        return dict(
            img_size=self.img_size,
            in_chans=self.in_chans,
            dims=list(self.dims),
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            mlp_ratio=self.mlp_ratio,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
        )


# name: (dims, depths, heads, window); the paper's Table 2 sizes (timm's davit_tiny/small/base). `test` is
# CI-sized: 64px with 4 x 4 windows, so the maps are 16, 8, 4 and 2 (the last one padded to a window).
_SIZES = {
    "davit_test": ((32, 64, 96, 128), (1, 1, 2, 1), (1, 2, 3, 4), 4),
    "davit_tiny": ((96, 192, 384, 768), (1, 1, 3, 1), (3, 6, 12, 24), 7),
    "davit_small": ((96, 192, 384, 768), (1, 1, 9, 1), (3, 6, 12, 24), 7),
    "davit_base": ((128, 256, 512, 1024), (1, 1, 9, 1), (4, 8, 16, 32), 7),
}
register_sizes(
    DaViT,
    {
        name: dict(
            img_size=64 if name.endswith("_test") else 224,
            dims=dims,
            depths=depths,
            num_heads=heads,
            window_size=window,
        )
        for name, (dims, depths, heads, window) in _SIZES.items()
    },
    smoke=dict(img_size=32, depths=(1, 1, 1, 1)),  # CPU-test size (see models/__init__.py): maps 8, 4, 2, 1
)
