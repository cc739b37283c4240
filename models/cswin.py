"""CSWin Transformer (Dong et al., "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped
Windows", CVPR 2022), the layout of the official release (microsoft/CSWin-Transformer, models/cswin.py).

Stem: 7x7 conv stride 4 (padding 2), LayerNorm -> a (H/4, W/4) token map. Four stages of pre-norm blocks; between
stages a 3x3 conv stride 2 (padding 1) + LayerNorm doubles the width and halves the map. Final LayerNorm, mean pool.
Cross-shaped window self-attention (a block's token mixer): one qkv projection; the first half of the channels
(heads) attends inside vertical stripes (sw columns at a time, full height), the second half inside horizontal
stripes (sw rows at a time, full width), as the release's branches idx 0 / idx 1 (the paper's text names the
horizontal half first; the split is symmetric, only the channel order differs); the two outputs are concatenated and
projected. LePE (locally-enhanced positional encoding): a depthwise 3x3 conv on V, applied to each stripe on its
own (zero padding at the stripe's border), added to the attention output. The last stage attends over the whole
map with one branch of all heads and LePE over the whole map (the release's `last_stage`). Stripe widths at 224px:
1, 2, 7 (the last stage's 7 covers its 7x7 map, as the paper's table says).

Sizes that do not divide: the image is zero-padded at the bottom/right to a multiple of 4 (the release needs
multiples of 32); a stripe width larger than the map shrinks to the map (one stripe, the same math); a map whose
side is not a multiple of sw gets a narrower last stripe: q, k, v are zero-padded to a multiple of sw after the
projection, padded keys are masked out and the padded V is zero, so the LePE conv at the border sees exactly the
zero padding of the narrower stripe. A block's structure (two stripe branches, or one full branch in the last
stage) does not depend on the input size; where the release turns a stage whose map equals sw into one full branch
(not at the paper's sizes), the two branches compute the same thing with the parameters laid out in halves.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> tokens (B, L, C) after the final norm (the release pools them right away)
  forward_head(x, pre_logits=True) -> mean over tokens (B, C) (the release's forward_features)
  forward_intermediates(images) -> stage i's output (B, C_i, ceil(H/2^(i+2)), ...), un-normed
  stem_stride = 4: `mask` is (B, ceil(H/4), ceil(W/4)) and replaces the normed stem tokens (mask token or zeros).
Key names vs the release: stage1_conv_embed.{0,2} -> stem.{conv,norm}; stage{i+1}.{j} -> stages.{i}.blocks.{j};
merge{i} -> stages.{i}.downsample; attns.{b}.get_v -> blocks.{j}.attns.{b}.lepe; the rest as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_blocks
from models.layers import Mlp, drop_path, drop_path_rates
from models.registry import register_sizes
from ops.attention import attention
from ops.window import pad_to_multiple, window_partition, window_reverse

AXES = ("vertical", "horizontal", "full")


class Stem(nn.Module):
    """7x7 conv stride 4 (padding 2; the image zero-padded to a multiple of 4 first), LayerNorm; channels-last."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=4, padding=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, ceil(H/4), ceil(W/4), C)
        x = F.pad(x, (0, (-x.shape[-1]) % 4, 0, (-x.shape[-2]) % 4))
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class Merge(nn.Module):
    """3x3 conv stride 2 (padding 1), LayerNorm: (B, H, W, C_in) -> (B, ceil(H/2), ceil(W/2), C); channels-last."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class StripeAttention(nn.Module):
    """One branch: multi-head attention among the tokens of each stripe ("vertical": sw columns x full height,
    "horizontal": sw rows x full width, "full": the whole map), plus LePE (depthwise 3x3 conv on V, per stripe).
    No parameters but the LePE conv: q, k, v come from the block's shared projection."""

    def __init__(self, dim: int, num_heads: int, axis: str, stripe: int, backend: str = "auto"):
        super().__init__()
        if axis not in AXES:
            raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if stripe < 1:
            raise ValueError(f"stripe width must be positive, got {stripe}")
        self.num_heads, self.head_dim, self.axis, self.stripe, self.backend = (
            num_heads,
            dim // num_heads,
            axis,
            stripe,
            backend,
        )
        self.lepe = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def window(self, H: int, W: int) -> tuple[int, int]:
        """(rows, cols) of one stripe on an H x W map (a stripe wider than the map is the map)."""
        if self.axis == "vertical":
            return H, min(self.stripe, W)
        if self.axis == "horizontal":
            return min(self.stripe, H), W
        return H, W

    def key_mask(self, B: int, H: int, W: int, Hp: int, Wp: int, device: torch.device) -> torch.Tensor:
        """(B * stripes, 1, 1, N) bool, True = a real key (the padded stripe's extra tokens are not)."""
        real = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=device)
        real[:, :H, :W] = True
        keys = window_partition(real, self.window(H, W)).squeeze(-1)  # (stripes, N)
        return keys.repeat(B, 1)[:, None, None, :]  # window_partition orders (batch, stripe)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, W, C = q.shape  # q, k, v: (B, H, W, C) -> (B, H, W, C)
        size = self.window(H, W)
        qkv = pad_to_multiple(torch.cat([q, k, v], dim=-1), size)  # (B, Hp, Wp, 3C), zeros past the map
        Hp, Wp = qkv.shape[1:3]
        groups = window_partition(qkv, size)  # (B * S, N, 3C), N = rows * cols of a stripe
        BS, N = groups.shape[:2]
        heads = groups.view(BS, N, 3, self.num_heads, self.head_dim)  # (BS, N, 3, h, hd)
        q, k, v = heads.permute(2, 0, 3, 1, 4)  # each (BS, h, N, hd)
        mask = None if (Hp, Wp) == (H, W) else self.key_mask(B, H, W, Hp, Wp, q.device)
        x = attention(q, k, v, attn_mask=mask, backend=self.backend)  # (BS, h, N, hd)
        v_map = v.transpose(-1, -2).reshape(BS, C, *size)  # (BS, C, rows, cols): channel = head * hd + d
        lepe = self.lepe(v_map).view(BS, self.num_heads, self.head_dim, N).transpose(-1, -2)  # (BS, h, N, hd)
        x = (x + lepe).transpose(1, 2).reshape(BS, N, C)  # (BS, N, C)
        return window_reverse(x, size, Hp, Wp)[:, :H, :W]  # (B, H, W, C)


class CSWinBlock(nn.Module):
    """x + drop_path(proj(cross-shaped attention(norm1(x)))), then x + drop_path(mlp(norm2(x))); channels-last.
    `full`: one branch of all heads over the whole map (the last stage); else half the heads in vertical stripes,
    half in horizontal ones."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        stripe: int,
        full: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_backend: str = "auto",
    ):
        super().__init__()
        if not full and (num_heads % 2 or dim % 2):
            raise ValueError(f"cross-shaped attention splits dim {dim} and num_heads {num_heads} in halves")
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if full:
            branches = [StripeAttention(dim, num_heads, "full", stripe, attn_backend)]
        else:
            branches = [
                StripeAttention(dim // 2, num_heads // 2, axis, stripe, attn_backend)
                for axis in ("vertical", "horizontal")
            ]
        self.attns = nn.ModuleList(branches)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # exact GELU, as the release
        self.drop_path = drop_path

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) normed -> (B, H, W, C)
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, H, W, C)
        c = q.shape[-1] // len(self.attns)  # channels of a branch: its heads' slice of q, k and v
        parts = [a(*(t[..., i * c : (i + 1) * c] for t in (q, k, v))) for i, a in enumerate(self.attns)]
        return self.proj(torch.cat(parts, dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        x = x + drop_path(self.attend(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class CSWinStage(nn.Module):
    """Optional merging (in_dim -> dim, half the map), then `depth` CSWin blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        drop_paths: Sequence[float],
        **block_kwargs,
    ):
        super().__init__()
        self.downsample = Merge(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            CSWinBlock(dim, drop_path=drop_paths[i], **block_kwargs) for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C_in) -> (B, H/2, W/2, C) (or same size)
        return run_blocks(self, self.blocks, self.downsample(x))


class CSWinTransformer(HierarchicalBackbone):
    stem_stride = 4

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 2, 21, 1),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        split_sizes: Sequence[int] = (1, 2, 7, 7),  # stripe width per stage; the last stage attends fully
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        split_sizes = [int(s) for s in split_sizes]
        if not depths or min(depths) < 1 or not len(depths) == len(num_heads) == len(split_sizes):
            raise ValueError(
                f"depths {depths}, num_heads {num_heads} and split_sizes {split_sizes} must be non-empty and of "
                "equal length, depths >= 1"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.embed_dim = img_size, in_chans, embed_dim
        self.depths, self.num_heads, self.split_sizes = depths, num_heads, split_sizes
        self.mlp_ratio, self.qkv_bias, self.drop_path_rate = mlp_ratio, qkv_bias, drop_path_rate
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]
        self.stem = Stem(in_chans, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, embed_dim)) if mask_token else None
        dpr = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList(
            CSWinStage(
                dims[max(i - 1, 0)],
                dims[i],
                depths[i],
                i > 0,
                dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                num_heads=num_heads[i],
                stripe=split_sizes[i],
                full=i == len(depths) - 1,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                attn_backend=attn_backend,
            )
            for i in range(len(depths))
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The release's init: truncated-normal(0.02) linears (head included), zero biases, unit LayerNorms; convs
        keep PyTorch's default."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # as SimMIM

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then stages/blocks (a stage's
        merging joins its first block), then the final norm and head."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )
        return {"stem": r"^stem|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normed stem tokens (B, H/4, W/4, C); masked positions (True) become the mask token or zeros."""
        return replace_masked(self.stem(images), mask, self.mask_token, "channels_last")

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
            in_chans=self.in_chans,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            split_sizes=list(self.split_sizes),
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
        )


# name: (embed_dim, depths, num_heads, split_sizes); the paper's Table 1 (the release's CSWin_64_12211_tiny_224,
# CSWin_64_24322_small_224, CSWin_96_24322_base_224). `test` is CI-sized: 64px, maps 16, 8, 4, 2.
_SIZES = {
    "cswin_test": (16, (1, 1, 1, 1), (2, 2, 4, 4), (1, 2, 2, 2)),
    "cswin_tiny_224": (64, (1, 2, 21, 1), (2, 4, 8, 16), (1, 2, 7, 7)),
    "cswin_small_224": (64, (2, 4, 32, 2), (2, 4, 8, 16), (1, 2, 7, 7)),
    "cswin_base_224": (96, (2, 4, 32, 2), (4, 8, 16, 32), (1, 2, 7, 7)),
}
register_sizes(
    CSWinTransformer,
    {
        name: dict(
            img_size=64 if name.endswith("_test") else 224,
            embed_dim=dim,
            depths=depths,
            num_heads=heads,
            split_sizes=splits,
        )
        for name, (dim, depths, heads, splits) in _SIZES.items()
    },
    smoke=dict(img_size=64, depths=(1, 1, 1, 1)),  # CPU-test size (see models/__init__.py)
)
