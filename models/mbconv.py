"""MBConv: the inverted-residual conv block (MobileNetV2) with squeeze-excitation (EfficientNet), pre-norm as in
MaxViT (Tu et al. 2022, section 3.3 and appendix), with TensorFlow's "SAME" padding of the MaxViT release.

    x -> BN -> 1x1 conv (expand 4x) -> BN, GELU -> depthwise 3x3 (stride s) -> BN, GELU -> SE -> 1x1 conv (project)
    out = shortcut(x) + drop_path(branch)

A block with stride 2 (the first of each MaxViT stage) downsamples in the depthwise conv, and its shortcut is
avg-pool 2x2 + a 1x1 conv (the conv only when the width changes). GELU is the tanh approximation, as in the TF
release (and timm's port of its weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import drop_path

BN_EPS = 1e-3  # the TF release's BatchNorm epsilon (Keras default)


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) as TensorFlow's "SAME": the output has ceil(H / stride) rows; when the padding is odd
    the extra row/column goes at the bottom/right (stride 2 on an even size pads only the bottom/right)."""
    H, W = x.shape[-2:]
    ph = max((math.ceil(H / stride) - 1) * stride + kernel - H, 0)
    pw = max((math.ceil(W / stride) - 1) * stride + kernel - W, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF "SAME" padding (odd kernel). Stride 1 pads symmetrically, so it is static there."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = True
    ):
        super().__init__(
            in_chs,
            out_chs,
            kernel,
            stride,
            padding=kernel // 2 if stride == 1 else 0,
            groups=groups,
            bias=bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = same_pad(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


def avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pool, stride 2, output ceil(H / 2): an odd last row/column is averaged with zero padding (the
    padding counts in the mean, as timm's port of the TF model; identical for even sizes, e.g. all of 224)."""
    return F.avg_pool2d(same_pad(x, 2, 2), 2)  # (B, C, ceil(H/2), ceil(W/2))


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a width to the nearest multiple of `divisor`, never more than 10% below `v` (MobileNet's rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class Downsample(nn.Module):
    """The shortcut of a downsampling block: avg-pool 2x2 (stride 2), then a 1x1 conv when the width changes."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/2, W/2)
        return self.proj(avg_pool_same(x))


class SqueezeExcite(nn.Module):
    """Channel gate: x * sigmoid(fc2(silu(fc1(mean_hw(x))))) (Hu et al. 2018; SiLU as in EfficientNet/MaxViT)."""

    def __init__(self, chs: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(chs, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class MBConv(nn.Module):
    """Pre-norm MBConv with squeeze-excitation; the expansion width is taken from the output width (as MaxViT)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"a stride-1 MBConv keeps its width (identity shortcut): {in_chs} != {out_chs}")
        mid = make_divisible(out_chs * expand_ratio)
        self.shortcut = Downsample(in_chs, out_chs) if stride == 2 else nn.Identity()
        self.pre_norm = nn.BatchNorm2d(in_chs, eps=BN_EPS)
        self.expand = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.dw = Conv2dSame(mid, mid, 3, stride, groups=mid, bias=False)  # depthwise
        self.norm2 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.se = SqueezeExcite(mid, int(se_ratio * out_chs))
        self.project = nn.Conv2d(mid, out_chs, 1)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        shortcut = self.shortcut(x)
        x = F.gelu(self.norm1(self.expand(self.pre_norm(x))), approximate="tanh")  # (B, mid, H, W)
        x = F.gelu(self.norm2(self.dw(x)), approximate="tanh")  # (B, mid, H/s, W/s)
        x = self.project(self.se(x))  # (B, C_out, H/s, W/s)
        return shortcut + drop_path(x, self.drop_path, self.training)


def init_conv_weights(module: nn.Module) -> None:
    """EfficientNet's init (timm's for MaxViT convs): normal(0, sqrt(2 / fan_out)), zero bias."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
