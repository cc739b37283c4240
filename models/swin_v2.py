"""Swin Transformer V2 (Liu et al., "Swin Transformer V2: Scaling Up Capacity and Resolution", CVPR 2022).

Swin V1's hierarchy of shifted-window attention stages, with the three V2 changes of sec. 3:
  res-post-norm:        x = x + drop_path(norm1(attn(x))); x = x + drop_path(norm2(mlp(x)))   (norm on the branch)
  scaled cosine attn:   cos(q, k) * exp(min(logit_scale, log 100)) per head, q and v biased, k not
  log-spaced CPB:       the relative position bias is an MLP of log-spaced offsets (ops/cosine_attention.py)
Patch merging V2 concatenates each 2x2 neighbourhood, then reduces 4C -> 2C and normalises (reduction, then norm).

Layout: patch embedding (conv p x p, stride p, then LayerNorm) -> 4 stages of blocks at strides 4, 8, 16, 32; stages
0..2 end with patch merging. Blocks alternate plain and shifted windows (shift = window // 2). As in transformers'
Swinv2Layer, each stage fixes its window and shift from the map it sees at the native `img_size`
(r = img_size // patch // 2**i): a map no larger than the window is one window (window = r) and is not shifted. Any
input size runs: the image is padded to a multiple of the patch, odd maps are padded before merging, and maps are
padded to whole windows (bottom/right; the pad takes part in attention, as in the reference).

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> tokens (B, L, C) after the final LayerNorm (HF last_hidden_state)
  forward_head(x, pre_logits=True) -> mean over the tokens (B, C) (HF pooler_output)
  forward_intermediates(images) -> stage i's blocks' output (B, C_i, H_i, W_i) before its patch merging, un-normed
      = HF encoder hidden_states[i + 1] with output_hidden_states_before_downsampling=True ([0] is the stem;
      Swinv2Model's own hidden_states are taken after each stage's merging)
  stem_stride = 4 (= patch_size): `mask` (B, ceil(H/4), ceil(W/4)) replaces stem tokens by `mask_token` or zeros.
Init as the paper's code (and timm): truncated-normal(0.02) linears, logit_scale = log 10, and the res-post-norms
zeroed (`post_norm_zero_init`) so every block starts as the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_block
from models.layers import Mlp, drop_path, drop_path_rates
from models.registry import register_sizes
from ops.cosine_attention import ContinuousPositionBias, cosine_window_attention
from ops.window import pad_to_multiple, shift_window_mask, window_partition, window_reverse

NORM_EPS = 1e-5  # every LayerNorm (transformers hard-codes it for the stem and merging norms)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> C channels, then LayerNorm. Sizes that do not divide are padded."""

    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, H/p, W/p, C), ceil
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))  # zeros at the bottom/right
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class WindowAttentionV2(nn.Module):
    """Scaled cosine attention within windows, with the continuous position bias. Input: windows (B * nW, N, C)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        pretrained_window: int = 0,
        qkv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.backend = num_heads, dim // num_heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        # queries and values are biased, keys not (the paper's code; transformers' key Linear has bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))  # log temperature
        self.cpb = ContinuousPositionBias((window, window), num_heads, (pretrained_window, pretrained_window))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        BW, N, C = x.shape  # (B * nW, N, C)
        qkv = self.qkv(x)  # (B * nW, N, 3C); the module is called, so ZeRO-3 gathers its weight
        if self.q_bias is not None:
            qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])  # no key bias
        qkv = qkv.view(BW, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, H, N, hd)
        out = cosine_window_attention(q, k, v, self.logit_scale, self.cpb(), mask, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(BW, N, C))  # (B * nW, N, C)


class SwinV2Block(nn.Module):
    """(Shifted) window attention and an MLP, each normalised on the residual branch (res-post-norm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int,
        shift: int,
        pretrained_window: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        attn_backend: str = "auto",
    ):
        super().__init__()
        self.window, self.shift, self.drop_path = window, shift, drop_path
        self.attn = WindowAttentionV2(dim, num_heads, window, pretrained_window, qkv_bias, attn_backend)
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # int(), as transformers' intermediate size
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)

    def window_attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): pad to whole windows, roll by -shift, attend, undo both."""
        B, H, W, C = x.shape
        w, s = (self.window, self.window), (self.shift, self.shift)
        x = pad_to_multiple(x, w)  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1:3]
        if self.shift:
            x = torch.roll(x, shifts=(-s[0], -s[1]), dims=(1, 2))
        x = self.attn(window_partition(x, w), mask)  # (B * nW, N, C)
        x = window_reverse(x, w, Hp, Wp)  # (B, Hp, Wp, C)
        if self.shift:
            x = torch.roll(x, shifts=s, dims=(1, 2))
        return x[:, :H, :W]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, H, W, C)
        x = x + drop_path(self.norm1(self.window_attention(x, mask)), self.drop_path, self.training)
        return x + drop_path(self.norm2(self.mlp(x)), self.drop_path, self.training)


class PatchMergingV2(nn.Module):
    """2x2 neighbourhoods -> one token: concat (4C) -> Linear(4C, 2C, no bias) -> LayerNorm(2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(2 * dim, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)
        x = pad_to_multiple(x, (2, 2))
        # the order of transformers/the reference: (even row, even col), (odd, even), (even, odd), (odd, odd)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.norm(self.reduction(x))


class SwinV2Stage(nn.Module):
    """`depth` blocks at one resolution, alternately plain and shifted; `downsample` (run by the model after the
    blocks, as the next stage starts) is the patch merging into the next stage, or Identity for the last."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        shift: int,
        downsample: bool,
        drop_paths: Sequence[float],
        **block_kwargs,
    ):
        super().__init__()
        self.window, self.shift = window, shift
        self.blocks = nn.ModuleList(
            SwinV2Block(
                dim, num_heads, window, shift if i % 2 else 0, drop_path=drop_paths[i], **block_kwargs
            )
            for i in range(depth)
        )
        self.downsample = PatchMergingV2(dim) if downsample else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C), blocks only
        mask = None
        if self.shift and len(self.blocks) > 1:  # one shift mask for the stage's shifted blocks
            Hp, Wp = (-(-n // self.window) * self.window for n in x.shape[1:3])
            mask = shift_window_mask(Hp, Wp, (self.window,) * 2, (self.shift,) * 2, x.device)
        for i, blk in enumerate(self.blocks):
            x = run_block(self, blk, x, mask if i % 2 else None)
        return x


def window_and_shift(resolution: int, window: int) -> tuple[int, int]:
    """transformers' rule (Swinv2Layer._compute_window_shift): a map no larger than the window is one window,
    unshifted; otherwise the window as given, shifted by half of it in the shifted blocks."""
    return (resolution, 0) if resolution <= window else (window, window // 2)


class SwinTransformerV2(HierarchicalBackbone):
    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 8,
        pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        post_norm_zero_init: bool = True,
        attn_backend: str = "auto",
    ):
        super().__init__()
        depths, num_heads = [int(d) for d in depths], [int(h) for h in num_heads]
        pretrained_window_sizes = [int(p) for p in pretrained_window_sizes]
        if not depths or not len(depths) == len(num_heads) == len(pretrained_window_sizes):
            raise ValueError(
                f"depths {depths}, num_heads {num_heads} and pretrained_window_sizes {pretrained_window_sizes} "
                "must be non-empty and of equal length"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        grid = img_size // patch_size
        resolutions = [grid // 2**i for i in range(len(depths))]  # floor, as transformers sizes its windows
        if resolutions[-1] < 1:
            raise ValueError(
                f"img_size {img_size} is too small for {len(depths)} stages of patch {patch_size}"
            )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depths, self.num_heads = embed_dim, depths, num_heads
        self.window_size, self.pretrained_window_sizes = window_size, pretrained_window_sizes
        self.mlp_ratio, self.qkv_bias, self.drop_path_rate = mlp_ratio, qkv_bias, drop_path_rate
        self.post_norm_zero_init = post_norm_zero_init
        self.stem_stride = patch_size  # the mask grid: 4 in every registered size
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.num_features = dims[-1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        total = sum(depths)
        dpr = drop_path_rates(drop_path_rate, total)
        self.layers = nn.ModuleList()
        for i, (depth, heads, res) in enumerate(zip(depths, num_heads, resolutions)):
            window, shift = window_and_shift(res, window_size)
            self.layers.append(
                SwinV2Stage(
                    dims[i],
                    depth,
                    heads,
                    window,
                    shift,
                    downsample=i < len(depths) - 1,
                    drop_paths=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                    pretrained_window=pretrained_window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    attn_backend=attn_backend,
                )
            )
        self.norm = nn.LayerNorm(self.num_features, eps=NORM_EPS)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=patch_size * 2**i, module=f"layers.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The paper's code (and timm): truncated-normal(0.02) linears (the CPB MLP too) with zero biases; the
        patch conv keeps PyTorch's default; res-post-norms zeroed when `post_norm_zero_init`."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # as SimMIM
        if self.post_norm_zero_init:
            for layer in self.layers:
                for blk in layer.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """The temperatures and the position-bias MLPs (as the paper's code), and the mask token."""
        return {
            n for n, _ in self.named_parameters() if "logit_scale" in n or ".cpb." in n or n == "mask_token"
        }

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, blocks in order (a stage's patch
        merging after its blocks), then the final norm and head."""
        blocks = (
            r"^layers\.(\d+)"
            if coarse
            else [(r"^layers\.(\d+)\.blocks\.(\d+)", None), (r"^layers\.(\d+)\.downsample", (99999,))]
        )
        return {"stem": r"^patch_embed|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stem tokens (B, H/p, W/p, C) (ceil); masked positions (True) become the mask token or zeros."""
        return replace_masked(self.patch_embed(images), mask, self.mask_token, "channels_last")

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i's blocks' output (B, H_i, W_i, C_i), before its merging; from the previous one's (merged first:
        a stage's patch merging runs at the start of the next) or the stem's."""
        return self.layers[i](self.layers[i - 1].downsample(x) if i else x)

    def stage_map(self, i: int, x: torch.Tensor) -> torch.Tensor:  # (B, H_i, W_i, C_i) -> (B, C_i, H_i, W_i)
        return x.permute(0, 3, 1, 2)

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = super().forward_features(images, mask)  # the last stage has no merging
        return self.norm(x).flatten(1, 2)  # (B, L, C)

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
            pretrained_window_sizes=list(self.pretrained_window_sizes),
            mlp_ratio=self.mlp_ratio,
            qkv_bias=self.qkv_bias,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
            post_norm_zero_init=self.post_norm_zero_init,
        )


# name: (embed_dim, depths, heads, window, img). `test` is CI-sized (64 px: windows 4, 4, 4, 2; stages 0 and 1
# shifted); the rest are the paper's ImageNet-1k sizes (their stochastic depth: 0.2 / 0.3 / 0.5 for T / S / B).
_SIZES = {
    "swinv2_test": (32, (2, 2, 2, 2), (1, 2, 4, 8), 4, 64),
    "swinv2_tiny_window8_256": (96, (2, 2, 6, 2), (3, 6, 12, 24), 8, 256),
    "swinv2_small_window8_256": (96, (2, 2, 18, 2), (3, 6, 12, 24), 8, 256),
    "swinv2_base_window8_256": (128, (2, 2, 18, 2), (4, 8, 16, 32), 8, 256),
    "swinv2_tiny_window16_256": (96, (2, 2, 6, 2), (3, 6, 12, 24), 16, 256),
    "swinv2_small_window16_256": (96, (2, 2, 18, 2), (3, 6, 12, 24), 16, 256),
    "swinv2_base_window16_256": (128, (2, 2, 18, 2), (4, 8, 16, 32), 16, 256),
}
register_sizes(
    SwinTransformerV2,
    {
        name: dict(img_size=img, embed_dim=dim, depths=depths, num_heads=heads, window_size=window)
        for name, (dim, depths, heads, window, img) in _SIZES.items()
    },
    # CPU-test size (see models/__init__.py): the first stage (16 x 16 at 64 px) is larger than the window, so its
    # second block is shifted. The res-post-norms start at their norm's usual 1, not the paper's 0: zeroed, every
    # branch would start cut off and the generic "every parameter gets a gradient" check could not see through it.
    smoke=dict(img_size=64, depths=(2, 1, 1, 1), post_norm_zero_init=False),
)
