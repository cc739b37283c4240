"""HorNet (Rao et al. 2022, "HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions").

The backbone contract is in models/__init__.py. Here (the layout of ConvNeXt, models/convnext.py):
  stem: 4x4 stride-4 conv + LayerNorm -> (B, C0, H/4, W/4)  (`stem_stride` = 4; a `mask` applies here)
  stages.i: downsample (LayerNorm + 2x2 stride-2 conv, none in stage 0), then blocks, at stride 4 * 2**i
  block: x = x + drop_path(gamma1 * gnconv(LN(x)));  x = x + drop_path(gamma2 * pwconv2(gelu(pwconv1(LN(x)))))
  gnconv of order n (recursive gated convolution, paper eq. 3-4), with C_k = C / 2**(n-1-k), k = 0..n-1:
      [p_0 (C_0), q (C_0 + ... + C_{n-1})] = proj_in(x)            1x1 conv, C -> 2C
      [q_0, ..., q_{n-1}] = alpha * dwconv7x7(q)                   alpha = `gnconv_scale` (1/3, official code)
      p_{k+1} = g_k(p_k) * q_k,  g_0 = identity, g_k = pws[k-1]: 1x1 conv C_{k-1} -> C_k
      y = proj_out(p_n)                                            1x1 conv, C -> C
  orders (2, 3, 4, 5) for the four stages; layer scale (gamma1, gamma2) starts at 1e-6.
  forward_features(images, mask=None) -> last stage map (B, C3, H/32, W/32), un-normed (as ConvNeXt)
  forward_head(x, pre_logits=True) -> LayerNorm(mean over H, W) (B, C3)
  forward_intermediates(images) -> stage i's output after its blocks
Only the 7x7 depthwise filter is implemented (the paper's `_7x7` models), not the global-filter (`_gf`) variant.
Parameter names follow the official code's (proj_in, dwconv, pws, proj_out, gamma1, gamma2...). No timm or
transformers twin exists; tests/test_hornet.py checks gnconv and the block against the paper's equations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.convnext import NORM_EPS, ConvNeXtLayout, LayerNorm2d
from models.layers import drop_path, drop_path_rates
from models.registry import register_sizes


def gnconv_widths(dim: int, order: int) -> list[int]:
    """[C_0, ..., C_{n-1}] = [C / 2**(n-1), ..., C / 2, C] for order n; C must divide by 2**(n-1)."""
    if order < 1:
        raise ValueError(f"gnconv order must be >= 1, got {order}")
    if dim % 2 ** (order - 1):
        raise ValueError(f"gnconv of order {order} needs a width divisible by {2 ** (order - 1)}, got {dim}")
    return [dim // 2 ** (order - 1 - k) for k in range(order)]


class GnConv(nn.Module):
    """Recursive gated convolution g^n Conv (paper Sec. 3.1): n gated products, each widening the previous one."""

    def __init__(self, dim: int, order: int, scale: float = 1.0 / 3.0, kernel_size: int = 7):
        super().__init__()
        self.order, self.scale = order, scale
        self.dims = gnconv_widths(dim, order)  # [C_0, ..., C_{n-1}]
        self.proj_in = nn.Conv2d(dim, 2 * dim, kernel_size=1)  # C_0 + sum(C_k) = 2C
        q = sum(self.dims)
        self.dwconv = nn.Conv2d(q, q, kernel_size, padding=(kernel_size - 1) // 2, groups=q)
        self.pws = nn.ModuleList(
            nn.Conv2d(self.dims[k], self.dims[k + 1], kernel_size=1) for k in range(order - 1)
        )
        self.proj_out = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        # p_0 (B, C_0, H, W) and q (B, 2C - C_0, H, W)
        p, q = self.proj_in(x).split((self.dims[0], sum(self.dims)), dim=1)
        qs = (self.dwconv(q) * self.scale).split(self.dims, dim=1)  # q_k: (B, C_k, H, W)
        p = p * qs[0]  # p_1 (B, C_0, H, W)
        for k in range(1, self.order):
            p = self.pws[k - 1](p) * qs[k]  # p_{k+1} (B, C_k, H, W)
        return self.proj_out(p)  # (B, C, H, W)


class HorNetBlock(nn.Module):
    """LayerNorm, g^n Conv (spatial mixing), LayerNorm, inverted MLP (4x, GELU); each branch with layer scale and
    stochastic depth (drawn independently per branch)."""

    def __init__(
        self,
        dim: int,
        order: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        scale: float = 1.0 / 3.0,
        kernel_size: int = 7,
    ):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=NORM_EPS)
        self.gnconv = GnConv(dim, order, scale, kernel_size)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # 1x1 convs as linears on channels-last maps
        self.pwconv2 = nn.Linear(4 * dim, dim)
        ls = layer_scale_init_value
        self.gamma1 = nn.Parameter(torch.full((dim,), ls)) if ls > 0 else None
        self.gamma2 = nn.Parameter(torch.full((dim,), ls)) if ls > 0 else None
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        y = self.gnconv(self.norm1(x))  # (B, C, H, W)
        if self.gamma1 is not None:
            y = self.gamma1[:, None, None] * y
        x = x + drop_path(y, self.drop_path, self.training)
        y = F.gelu(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1))))  # (B, H, W, 4C), exact (erf) GELU
        y = self.pwconv2(y)  # (B, H, W, C)
        if self.gamma2 is not None:
            y = self.gamma2 * y
        return x + drop_path(y.permute(0, 3, 1, 2), self.drop_path, self.training)


class HorNetStage(nn.Module):
    """A downsampling layer (LayerNorm + 2x2 stride-2 conv; none in stage 0) and blocks of one gnconv order."""

    def __init__(
        self,
        in_dim: int | None,
        dim: int,
        depth: int,
        order: int,
        dpr: Sequence[float],
        ls: float,
        scale: float,
        kernel_size: int,
    ):
        super().__init__()
        if in_dim is None:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=NORM_EPS), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
            )
        self.blocks = nn.ModuleList(
            HorNetBlock(dim, order, dpr[j], ls, scale, kernel_size) for j in range(depth)
        )


class HorNet(ConvNeXtLayout):
    """HorNet with 7x7 depthwise filters: stem, then `len(depths)` stages of widths `dims` and gnconv `orders`."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        depths: tuple[int, ...] = (2, 3, 18, 2),
        dims: tuple[int, ...] = (64, 128, 256, 512),
        orders: tuple[int, ...] = (2, 3, 4, 5),
        gnconv_scale: float = 1.0 / 3.0,  # alpha on the depthwise conv's output (official code: s = 1/3)
        kernel_size: int = 7,
        layer_scale_init_value: float = 1e-6,  # 0 disables layer scale
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        head_norm_eps: float = 1e-6,
        mask_token: bool = False,
    ):
        super().__init__()
        depths, dims, orders = tuple(depths), tuple(dims), tuple(orders)
        if not depths or not len(depths) == len(dims) == len(orders):
            raise ValueError(f"depths {depths}, dims {dims}, orders {orders}: need one non-empty length")
        for d, n in zip(dims, orders):
            gnconv_widths(d, n)  # raises on a width the order cannot halve n - 1 times
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-size depthwise conv), got {kernel_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.depths, self.dims, self.orders = depths, dims, orders
        self.gnconv_scale, self.kernel_size = gnconv_scale, kernel_size
        self.layer_scale_init_value, self.drop_path_rate = layer_scale_init_value, drop_path_rate
        self.head_norm_eps = head_norm_eps
        self.stem_stride = patch_size
        self.num_features = dims[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
            LayerNorm2d(dims[0], eps=NORM_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0], 1, 1)) if mask_token else None
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))  # linear over all blocks, 0 for the first
        dpr = [[next(rates) for _ in range(d)] for d in depths]  # per stage
        self.stages = nn.ModuleList(
            HorNetStage(
                dims[i - 1] if i else None,
                dims[i],
                depths[i],
                orders[i],
                dpr[i],
                layer_scale_init_value,
                gnconv_scale,
                kernel_size,
            )
            for i in range(len(depths))
        )
        self.norm = nn.LayerNorm(dims[-1], eps=head_norm_eps)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.grad_checkpointing = False
        self.init_weights()

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (for checkpoints and export)."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            depths=list(self.depths),
            dims=list(self.dims),
            orders=list(self.orders),
            gnconv_scale=self.gnconv_scale,
            kernel_size=self.kernel_size,
            layer_scale_init_value=self.layer_scale_init_value,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            head_norm_eps=self.head_norm_eps,
            mask_token=self.mask_token is not None,
        )


# name: (depths, base width C; stage widths C, 2C, 4C, 8C). `test` is CI-sized; the rest are the paper's 7x7 sizes
# (Table 1; depths and widths as the official code's hornet_{tiny,small,base}_7x7).
_SIZES = {
    "hornet_test": ((1, 1, 1, 1), 16),
    "hornet_tiny_7x7": ((2, 3, 18, 2), 64),
    "hornet_small_7x7": ((2, 3, 18, 2), 96),
    "hornet_base_7x7": ((2, 3, 18, 2), 128),
}
register_sizes(
    HorNet,
    {
        name: dict(
            img_size=64 if name.endswith("_test") else 224,
            depths=depths,
            dims=tuple(c * 2**i for i in range(4)),
            orders=(2, 3, 4, 5),
        )
        for name, (depths, c) in _SIZES.items()
    },
    smoke=dict(img_size=64, depths=(1, 1, 1, 1)),  # CPU-test size: one block per stage
)
