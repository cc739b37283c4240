"""Swin Transformer (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", 2021).

Patch embed (p x p conv, stride p, LayerNorm) gives a (H/4, W/4) token map; four stages of pre-norm blocks follow,
each attending inside non-overlapping M x M windows with a learned relative position bias ((2M-1)^2, heads).
Every second block rolls the map by -M/2 first, so windows straddle the previous partition (the shift mask
keeps tokens that the roll made neighbours from attending to each other). Between stages, patch merging
concatenates each 2 x 2 neighbourhood (4C), LayerNorms it and projects to 2C. Final LayerNorm, mean pool.

Sizes that do not divide are zero-padded at the bottom/right: the image to the patch size, the map to the window
(after norm1; padded tokens take part in attention unmasked) and odd maps before merging, as the reference and
HF's SwinModel do. When a map is no larger than the window (min(H, W) <= M) the window shrinks to min(H, W) and
the block does not shift (HF's SwinLayer.set_shift_and_window_size). A window m < M reads the offsets |d| < m of
the same (2M-1)^2 table, the relative bias's own meaning (HF errors in that case; see models/swin_hf.py).

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> tokens (B, L, C) after the final norm (HF last_hidden_state)
  forward_head(x, pre_logits=True) -> mean over tokens (B, C) (HF pooler_output)
  forward_intermediates(images) -> stage i's output (B, C_i, H_i, W_i), un-normed, before the next merging (HF
      encoder reshaped_hidden_states[i + 1] with output_hidden_states_before_downsampling=True)
  stem_stride = patch_size: `mask` is (B, ceil(H/p), ceil(W/p)), it replaces the normed patch embedding.
Layout: stage i > 0 starts with its patch merging (`stages.i.downsample`), HF's `layers.{i-1}.downsample`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_blocks
from models.layers import Mlp, drop_path, drop_path_rates
from models.registry import register_sizes
from ops.window import (
    pad_to_multiple,
    relative_coords,
    relative_position_index,
    shift_window_mask,
    window_attention,
    window_partition,
    window_reverse,
)


class PatchEmbed(nn.Module):
    """p x p conv with stride p (the image zero-padded to a multiple of p), then LayerNorm; channels-last."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5 as the reference and HF (not config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, H/p, W/p, C)
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, plus a learned bias per head and relative offset (dy, dx)."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, backend: str = "auto"
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.window_size = num_heads, dim // num_heads, window_size
        self.backend = backend
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        index = relative_position_index((window_size, window_size))  # (M*M, M*M), derived: not saved
        self.register_buffer("relative_position_index", index, persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def bias_index(self, m: int) -> torch.Tensor:
        """(m*m, m*m) index into the table for an m x m window, m <= M: its offsets [-(m-1), m-1] among the
        table's [-(M-1), M-1] (for m = M, relative_position_index)."""
        if m == self.window_size:
            return self.relative_position_index
        rel = relative_coords((m, m)) + (self.window_size - m)  # (N, N, 2): offset + (M - 1)
        index = rel[..., 0] * (2 * self.window_size - 1) + rel[..., 1]  # (N, N)
        return index.to(self.relative_position_index.device)

    def forward(self, x: torch.Tensor, window: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        BW, N, C = x.shape  # (B * nW, N, C), N = window * window
        qkv = self.qkv(x).view(BW, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (BW, h, N, hd)
        bias = self.relative_position_bias_table[self.bias_index(window).view(-1)]  # (N * N, h)
        bias = bias.view(N, N, -1).permute(2, 0, 1)  # (h, N, N)
        x = window_attention(q, k, v, bias=bias, mask=mask, backend=self.backend)  # (BW, h, N, hd)
        return self.proj(x.transpose(1, 2).reshape(BW, N, C))


class SwinTransformerBlock(nn.Module):
    """x + drop_path(W-MSA(norm1(x))) (shifted windows when `shift`), then x + drop_path(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        attn_backend: str = "auto",
    ):
        super().__init__()
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # int(), as HF's intermediate size; exact GELU
        self.drop_path = drop_path

    def window_and_shift(self, H: int, W: int) -> tuple[int, int]:
        """A map no larger than the window is one window of min(H, W), unshifted (the reference/HF rule)."""
        if min(H, W) <= self.window_size:
            return min(H, W), 0
        return self.window_size, self.window_size // 2 if self.shift else 0

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        B, H, W, C = x.shape
        m, s = self.window_and_shift(H, W)
        x = pad_to_multiple(x, (m, m))  # (B, Hp, Wp, C), zeros at the bottom/right
        Hp, Wp = x.shape[1:3]
        mask = None
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
            mask = shift_window_mask(Hp, Wp, (m, m), (s, s), x.device)  # (nW, N, N)
        windows = self.attn(window_partition(x, (m, m)), m, mask)  # (B * nW, m * m, C)
        x = window_reverse(windows, (m, m), Hp, Wp)  # (B, Hp, Wp, C)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x[:, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        x = x + drop_path(self.attend(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2 x 2 neighbourhoods concatenated (odd maps zero-padded first), LayerNorm(4C), Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)  # eps 1e-5, as the reference and HF
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)
        x = pad_to_multiple(x, (2, 2))
        B, H, W, C = x.shape
        # channel order of the reference: (row 0, col 0), (1, 0), (0, 1), (1, 1), i.e. the column offset outer
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging (dim / 2 -> dim), then `depth` blocks alternating plain and shifted windows."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        downsample: bool,
        drop_paths: Sequence[float],
        **block_kwargs,
    ):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, shift=i % 2 == 1, drop_path=drop_paths[i], **block_kwargs)
            for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C/2) -> (B, H/2, W/2, C) (or same size)
        return run_blocks(self, self.blocks, self.downsample(x))


class SwinTransformer(HierarchicalBackbone):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        norm_eps: float = 1e-5,
        attn_backend: str = "auto",
    ):
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(
                f"depths {depths} and num_heads {num_heads} must be non-empty and of equal length"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if window_size < 1:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.stem_stride = embed_dim, patch_size
        self.depths, self.num_heads, self.window_size = depths, num_heads, window_size
        self.mlp_ratio, self.qkv_bias, self.norm_eps = mlp_ratio, qkv_bias, norm_eps
        self.drop_path_rate = drop_path_rate
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim)) if mask_token else None
        total = sum(depths)
        dpr = drop_path_rates(drop_path_rate, total)
        self.stages = nn.ModuleList(
            SwinStage(
                dims[i],
                depths[i],
                num_heads[i],
                downsample=i > 0,
                drop_paths=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                attn_backend=attn_backend,
            )
            for i in range(len(depths))
        )
        self.norm = nn.LayerNorm(dims[-1], eps=norm_eps)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The reference init: truncated-normal(0.02) linears and bias tables, zero biases, unit LayerNorms; the
        patch-embed conv keeps PyTorch's default, as in the reference."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # as SimMIM

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then stages/blocks (a stage's
        patch merging joins its first block, as timm), then the final norm and head."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )
        return {"stem": r"^patch_embed|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normed patch embedding (B, H/p, W/p, C); masked positions (True) become the mask token or zeros."""
        x = self.patch_embed(images)  # (B, H', W', C)
        return replace_masked(x, mask, self.mask_token, "channels_last", grid="patch")

    def stage_map(self, i: int, x: torch.Tensor) -> torch.Tensor:  # (B, H_i, W_i, C_i) -> (B, C_i, H_i, W_i)
        return x.permute(0, 3, 1, 2)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.norm(super().forward_features(images, mask).flatten(1, 2))  # (B, L, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (lists, so YAML can hold them)."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            window_size=self.window_size,
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
            norm_eps=self.norm_eps,
        )


# name: (embed_dim, depths, heads, window, img_size); the paper's Table 1 sizes (large: its ImageNet-22k model).
# `swin_test` is CI-sized and stays runnable by transformers' SwinModel, which fails on maps smaller than the
# window (models/swin_hf.py): 3 stages, window 2, so 32 px (maps 8, 4, 2) and 64 px (16, 8, 4) shift in every
# stage that is larger than the window. tests/test_swin.py also runs 4 stages with window 4.
_SIZES = {
    "swin_test": (16, (2, 2, 2), (1, 2, 4), 2, 64),
    "swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224),
    "swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7, 224),
    "swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32), 7, 224),
    "swin_large_patch4_window7_224": (192, (2, 2, 18, 2), (6, 12, 24, 48), 7, 224),
}
_DEFAULTS = {
    name: dict(img_size=img, embed_dim=dim, depths=depths, num_heads=heads, window_size=win)
    for name, (dim, depths, heads, win, img) in _SIZES.items()
}
# CPU-test sizes (see models/__init__.py); 64 px with window 7 pads stage 1 (16 x 16) to 21 x 21 and shifts it
register_sizes(SwinTransformer, {"swin_test": _DEFAULTS.pop("swin_test")}, smoke=dict(img_size=32))
register_sizes(SwinTransformer, _DEFAULTS, smoke=dict(img_size=64, depths=(2, 1, 1, 1)))
