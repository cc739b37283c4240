"""TinyViT (Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022).

Stem: two 3x3 conv + BN, stride 2 each, GELU between: (B, C_in, H, W) -> (B, C_0, H/4, W/4).
Stage 0: MBConv blocks (conv1x1 + BN, GELU, depthwise 3x3 + BN, GELU, conv1x1 + BN; residual; GELU after the sum).
Stages 1..: patch merging (conv1x1 + BN, GELU, depthwise 3x3 stride 2 + BN, GELU, conv1x1 + BN), then TinyViT blocks:
    x = x + attn(x)        window attention (LayerNorm inside) with a learned bias per head and |offset| (below)
    x = local_conv(x)      depthwise 3x3 conv + BN between attention and MLP, no residual of its own
    x = x + mlp(x)         LayerNorm, Linear, GELU, Linear
Head: global average pool, LayerNorm, Linear.

Attention bias (LeViT's, as the official release): one learned value per head and per *absolute* 2-D offset
(|dy|, |dx|) between two tokens of a window, so a (heads, ws * ws) table indexed by |dy| * ws + |dx|.
Windows: maps are zero-padded at the bottom/right to a multiple of the window; the padded tokens take part in
attention unmasked (LayerNorm turns them into its bias), as in the official code and timm. With the default
windows at 224 (7, 14, 7 on maps of 28, 14, 7) nothing is padded.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> last stage map (B, C, H/32, W/32), un-normed (timm's forward_features;
      the final norm sits in the head)
  forward_head(x, pre_logits=True) -> LayerNorm(mean_hw(x)) (B, C) = timm's forward_head(x, pre_logits=True)
  forward_intermediates(images) -> stage i's output (B, C_i, H/2^(i+2), W/2^(i+2)) = timm forward_intermediates
  stem_stride = 4: `mask` is (B, ceil(H/4), ceil(W/4)) and replaces the stem output (mask token or zeros).
`num_heads` and `window_sizes` list the attention stages only (stage 0 is convolutional); timm's 4-tuples carry an
unused first entry. models/tiny_vit_timm.py maps timm's `tiny_vit_*` state dicts to and from this layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_block
from models.layers import drop_path, drop_path_rates
from models.registry import register_sizes
from ops.window import pad_to_multiple, window_attention, window_partition, window_reverse

# The paper zeroes the scale of each MBConv's last BatchNorm (the block starts as GELU(x)). Exactly zero leaves the
# block's first two convs without a gradient on the first step; a tiny scale keeps the same function at init
# (relative change ~1e-6) while every parameter learns from step one.
MBCONV_LAST_BN_INIT = 1e-6


class ConvBN(nn.Module):
    """Conv2d (no bias, "same" padding for odd kernels) then BatchNorm2d."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))
        return self.bn(self.conv(x))


class Stem(nn.Module):
    """(B, C_in, H, W) -> (B, C, ceil(H/4), ceil(W/4)): conv3x3/2 + BN (C/2), GELU, conv3x3/2 + BN (C)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = ConvBN(in_chans, dim // 2, 3, stride=2)
        self.conv2 = ConvBN(dim // 2, dim, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.conv1(x)))


class MBConv(nn.Module):
    """TinyViT's MBConv (no SE, no pre-norm, stride 1): GELU(x + drop_path(project(dw(expand(x)))))."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float = 0.0):
        super().__init__()
        mid = int(dim * expand_ratio)
        self.expand = ConvBN(dim, mid)
        self.dw = ConvBN(mid, mid, 3, groups=mid)
        self.project = ConvBN(mid, dim)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        h = F.gelu(self.dw(F.gelu(self.expand(x))))  # (B, mid, H, W)
        return F.gelu(x + drop_path(self.project(h), self.drop_path, self.training))


class PatchMerging(nn.Module):
    """(B, C_in, H, W) -> (B, C, ceil(H/2), ceil(W/2)): conv1x1 + BN, GELU, depthwise 3x3/2 + BN, GELU, conv1x1 + BN."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.pw1 = ConvBN(in_dim, dim)
        self.dw = ConvBN(dim, dim, 3, stride=2, groups=dim)
        self.pw2 = ConvBN(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(F.gelu(self.dw(F.gelu(self.pw1(x)))))


def abs_offset_index(window: int) -> torch.Tensor:
    """(N, N) long, N = window^2: |dy| * window + |dx| for tokens i, j of a window in row-major order."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (N,)
    return (ys[:, None] - ys[None]).abs() * window + (xs[:, None] - xs[None]).abs()


class WindowAttention(nn.Module):
    """LayerNorm, then multi-head self-attention among the N = ws^2 tokens of each window, with a learned bias per
    head and absolute offset. The qkv projection holds each head's q, k, v side by side (the official layout)."""

    def __init__(self, dim: int, num_heads: int, window: int, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", abs_offset_index(window), persistent=False)

    def bias(self) -> torch.Tensor:  # (heads, N, N): bias[h, i, j] = table[h, |dy_ij| * ws + |dx_ij|]
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B * nW, N, C) -> (B * nW, N, C)
        BW, N, C = x.shape
        qkv = self.qkv(self.norm(x)).view(BW, N, self.num_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))  # each (BW, heads, N, hd)
        x = window_attention(q, k, v, bias=self.bias(), backend=self.backend)  # (BW, heads, N, hd)
        return self.proj(x.transpose(1, 2).reshape(BW, N, C))


class Mlp(nn.Module):
    """LayerNorm, Linear, GELU (exact), Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (residual), depthwise conv + BN, MLP (residual); channels-last (B, H, W, C) in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv_size: int,
        drop_path: float,
        backend: str,
    ):
        super().__init__()
        self.window = (window, window)
        self.attn = WindowAttention(dim, num_heads, window, backend)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        H, W = x.shape[1:3]
        p = pad_to_multiple(x, self.window)  # (B, Hp, Wp, C), zeros bottom/right
        Hp, Wp = p.shape[1:3]
        y = window_reverse(self.attn(window_partition(p, self.window)), self.window, Hp, Wp)[:, :H, :W]
        return x + drop_path(y, self.drop_path, self.training)

    def conv(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        return self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def feed(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        return x + drop_path(self.mlp(x), self.drop_path, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed(self.conv(self.attend(x)))


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks at the stem's width and resolution (never checkpointed: recomputing them in train
    mode would update their BatchNorm running statistics a second time)."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, drop_paths: Sequence[float]):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_paths[i]) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        for blk in self.blocks:
            x = blk(x)
        return x


class TinyViTStage(nn.Module):
    """Patch merging (halves the map, changes the width), then `depth` TinyViT blocks. Maps in and out."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: Sequence[float], **block_kwargs):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim)
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, drop_path=drop_paths[i], **block_kwargs) for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C, H/2, W/2)
        x = self.downsample(x).permute(0, 2, 3, 1)  # (B, H/2, W/2, C)
        for blk in self.blocks:
            # the attention and MLP halves are checkpointed, not the BatchNorm conv between them (its running
            # statistics would be updated again by the recomputation)
            x = run_block(self, blk.feed, blk.conv(run_block(self, blk.attend, x)))
        return x.permute(0, 3, 1, 2)


def default_windows(img_size: int, n_stages: int) -> list[int]:
    """The paper's windows per attention stage for 4 stages: (s/32, s/16, s/32): 7, 14, 7 at 224 (12, 24, 12 at
    384; 16, 32, 16 at 512), i.e. the whole map in stage 2 and 3, 4 x 4 windows in stage 1."""
    if n_stages != 4:
        raise ValueError(f"window_sizes has no default for {n_stages} stages: give one per attention stage")
    return [max(img_size // 32, 1), max(img_size // 16, 1), max(img_size // 32, 1)]


class TinyViT(HierarchicalBackbone):
    stem_stride = 4

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (4, 5, 10),  # per attention stage (stages 1..)
        window_sizes: Sequence[int] | None = None,  # per attention stage; None: default_windows(img_size)
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        dims, depths = [int(d) for d in dims], [int(d) for d in depths]
        num_heads = [int(h) for h in num_heads]
        if len(depths) != len(dims) or len(dims) < 2 or min(depths) < 1:
            raise ValueError(f"depths {depths} and dims {dims} must have equal length >= 2, depths >= 1")
        windows = (
            default_windows(img_size, len(dims)) if window_sizes is None else [int(w) for w in window_sizes]
        )
        if len(num_heads) != len(dims) - 1 or len(windows) != len(dims) - 1:
            raise ValueError(
                f"num_heads {num_heads} and window_sizes {windows} need one entry per attention stage "
                f"({len(dims) - 1}: stage 0 is convolutional)"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.dims, self.depths = img_size, in_chans, dims, depths
        self.num_heads, self.window_sizes, self.mlp_ratio = num_heads, windows, mlp_ratio
        self.mbconv_expand_ratio, self.local_conv_size = mbconv_expand_ratio, local_conv_size
        self.drop_path_rate = drop_path_rate
        self.num_features = dims[-1]
        self.stem = Stem(in_chans, dims[0])
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0], 1, 1)) if mask_token else None
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        rates = [dpr[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(len(depths))]
        self.stages = nn.ModuleList([ConvStage(dims[0], depths[0], mbconv_expand_ratio, rates[0])])
        for i in range(1, len(dims)):
            self.stages.append(
                TinyViTStage(
                    dims[i - 1],
                    dims[i],
                    depths[i],
                    rates[i],
                    num_heads=num_heads[i - 1],
                    window=windows[i - 1],
                    mlp_ratio=mlp_ratio,
                    local_conv_size=local_conv_size,
                    backend=attn_backend,
                )
            )
        self.norm = nn.LayerNorm(dims[-1])  # head: pool, norm, classifier
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=2 ** (i + 2), module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The official init: truncated-normal(0.02) linears with zero biases, zero bias tables, unit BatchNorms
        except each MBConv's last (MBCONV_LAST_BN_INIT); convs keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.zeros_(m.attention_biases)
            elif isinstance(m, MBConv):
                nn.init.constant_(m.project.bn.weight, MBCONV_LAST_BN_INIT)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith("attention_biases")}
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then stages or blocks (a stage's
        patch merging joins its first block, as timm), then the final norm and head."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )
        return {"stem": r"^stem|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stem output (B, C_0, ceil(H/4), ceil(W/4)); masked positions (True) become the mask token or zeros."""
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
            window_sizes=list(self.window_sizes),
            mlp_ratio=self.mlp_ratio,
            mbconv_expand_ratio=self.mbconv_expand_ratio,
            local_conv_size=self.local_conv_size,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
        )


# name: (dims, depths, heads per attention stage); the paper's Table 5 sizes (timm's tiny_vit_*_224). `test` is
# CI-sized: 64 px, windows (2, 4, 2) on maps of 8, 4, 2.
_SIZES = {
    "tiny_vit_test": ((32, 64, 96, 128), (1, 1, 2, 1), (2, 3, 4)),
    "tiny_vit_5m_224": ((64, 128, 160, 320), (2, 2, 6, 2), (4, 5, 10)),
    "tiny_vit_11m_224": ((64, 128, 256, 448), (2, 2, 6, 2), (4, 8, 14)),
    "tiny_vit_21m_224": ((96, 192, 384, 576), (2, 2, 6, 2), (6, 12, 18)),
}
register_sizes(
    TinyViT,
    {
        name: dict(img_size=64 if name.endswith("_test") else 224, dims=dims, depths=depths, num_heads=heads)
        for name, (dims, depths, heads) in _SIZES.items()
    },
    smoke=dict(img_size=64, depths=(1, 1, 1, 1)),  # CPU-test size (see models/__init__.py)
)
