"""MaxViT (Tu et al., "MaxViT: Multi-Axis Vision Transformer", ECCV 2022), the layout of the TF release.

Stem: 3x3 conv stride 2, BN, GELU, 3x3 conv (H/2). Then 4 stages; every block of a stage is
    MBConv (models/mbconv.py; the stage's first block downsamples by 2) -> block attention -> grid attention
Block attention: self-attention inside non-overlapping P x P windows (local). Grid attention: inside a G x G grid
of tokens spaced H/G, W/G apart (dilated, global). Each is a pre-norm transformer layer (LayerNorm, attention
with a relative position bias per head and 2-D offset, residual; LayerNorm, MLP, residual). P = G = 7 at 224px.
Head (the TF release): global average pool, LayerNorm, pre-logits Linear(C, C) + tanh, classifier.

Sizes that do not divide: maps are zero-padded at the bottom/right to a multiple of P (or G) before partitioning
and cropped after, and the padded tokens are masked out as keys, so a real token attends only to the real tokens
of its window (grid group); with divisible sizes (e.g. 224) nothing is padded. timm asserts divisibility instead.
Convs and pools use TF "SAME" padding (output ceil(H / 2) for stride 2), so any input size runs.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> last stage map (B, C, H/32, W/32), un-normed (timm's forward_features
      for maxvit_*_tf, whose final norm lives in the head)
  forward_head(x, pre_logits=True) -> tanh(pre_logits(LayerNorm(mean_hw(x)))) (B, C): timm's
      forward_head(x, pre_logits=True) of maxvit_*_tf (its NormMlpClassifierHead keeps the tanh MLP even with
      num_classes=0)
  forward_intermediates(images) -> stage i's output (B, C_i, H/2^(i+2), W/2^(i+2)) = timm
      forward_intermediates(x, intermediates_only=True)[i + 1] (timm's index 0 is the stem)
  stem_stride = 2: `mask` is (B, ceil(H/2), ceil(W/2)) and replaces the stem output (mask token or zeros).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_block
from models.layers import drop_path, drop_path_rates
from models.mbconv import BN_EPS, Conv2dSame, MBConv, init_conv_weights
from models.registry import register_sizes
from ops.window import (
    grid_partition,
    grid_reverse,
    pad_to_multiple,
    relative_position_index,
    window_attention,
    window_partition,
    window_reverse,
)

LN_EPS = 1e-5  # the TF release's LayerNorm epsilon
PARTITIONS = {"block": (window_partition, window_reverse), "grid": (grid_partition, grid_reverse)}


class Stem(nn.Module):
    """3x3 conv stride 2 (TF "SAME"), BN, GELU, 3x3 conv: (B, C_in, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, in_chans: int, width: int):
        super().__init__()
        self.conv1 = Conv2dSame(in_chans, width, 3, stride=2)
        self.norm1 = nn.BatchNorm2d(width, eps=BN_EPS)
        self.conv2 = Conv2dSame(width, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.gelu(self.norm1(self.conv1(x)), approximate="tanh"))


class RelPosAttention(nn.Module):
    """Multi-head self-attention among the N = p * p tokens of each group (window or grid), plus a learned bias per
    head and 2-D offset between the tokens' positions in the group (shared by all groups)."""

    def __init__(self, dim: int, head_dim: int, size: tuple[int, int], backend: str = "auto"):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} is not divisible by head_dim {head_dim}")
        self.num_heads, self.head_dim, self.backend = dim // head_dim, head_dim, backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        n_offsets = (2 * size[0] - 1) * (2 * size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n_offsets, self.num_heads))
        self.register_buffer("relative_position_index", relative_position_index(size), persistent=False)

    def bias(self) -> torch.Tensor:  # (heads, N, N): bias[h, i, j] = table[offset(i - j), h]
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        BW, N, C = x.shape  # (B * groups, N, C); mask: (groups, N, N) additive, or None
        q, k, v = self.qkv(x).view(BW, N, 3, self.num_heads, self.head_dim).unbind(2)  # each (BW, N, H, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (BW, H, N, hd)
        x = window_attention(q, k, v, bias=self.bias(), mask=mask, backend=self.backend)  # (BW, H, N, hd)
        return self.proj(x.transpose(1, 2).reshape(BW, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # tanh GELU, as the TF release


class PartitionAttention(nn.Module):
    """Block ("block": P x P windows) or grid ("grid": G x G dilated grid) attention layer, channels-last:
    x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        partition: str,
        size: int,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {list(PARTITIONS)}, got {partition!r}")
        self.partition, self.size = partition, (size, size)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = RelPosAttention(dim, head_dim, self.size, backend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def padding_mask(self, H: int, W: int, Hp: int, Wp: int, device: torch.device) -> torch.Tensor:
        """(groups, N, N) additive: -inf for keys that are padding (every group holds a real token)."""
        real = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool, device=device)
        real[:, :H, :W] = True
        keys = PARTITIONS[self.partition][0](real, self.size).squeeze(-1)  # (groups, N)
        mask = torch.zeros(keys.shape, device=device).masked_fill(~keys, float("-inf"))  # (groups, N)
        return mask[:, None].expand(-1, keys.shape[1], -1)  # (groups, N, N): the same keys for every query

    def mix(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        B, H, W, C = x.shape
        part, reverse = PARTITIONS[self.partition]
        x = pad_to_multiple(x, self.size)  # (B, Hp, Wp, C)
        Hp, Wp = x.shape[1:3]
        mask = None if (Hp, Wp) == (H, W) else self.padding_mask(H, W, Hp, Wp, x.device)
        x = self.attn(part(x, self.size), mask)  # (B * groups, N, C)
        return reverse(x, self.size, Hp, Wp)[:, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        x = x + drop_path(self.mix(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class MaxViTBlock(nn.Module):
    """MBConv, then block attention, then grid attention (one stochastic-depth rate for all three)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        stride: int,
        window_size: int,
        grid_size: int,
        head_dim: int,
        mlp_ratio: float,
        expand_ratio: float,
        se_ratio: float,
        drop_path: float,
        backend: str,
    ):
        super().__init__()
        self.mbconv = MBConv(in_dim, dim, stride, expand_ratio, se_ratio, drop_path)
        attn = dict(head_dim=head_dim, mlp_ratio=mlp_ratio, drop_path=drop_path, backend=backend)
        self.block_attn = PartitionAttention(dim, "block", window_size, **attn)
        self.grid_attn = PartitionAttention(dim, "grid", grid_size, **attn)

    def attend(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        x = self.grid_attn(self.block_attn(x.permute(0, 2, 3, 1)))  # channels-last (B, H, W, C) inside
        return x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C, H/s, W/s)
        return self.attend(self.mbconv(x))


class MaxViTStage(nn.Module):
    """`depth` MaxViT blocks; the first downsamples by 2 and changes the width."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: Sequence[float], **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(
            MaxViTBlock(
                in_dim if i == 0 else dim, dim, 2 if i == 0 else 1, drop_path=drop_paths[i], **block_kwargs
            )
            for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C, H/2, W/2)
        for blk in self.blocks:
            # only the attention half is checkpointed: recomputing MBConv in train mode would update its
            # BatchNorm running statistics a second time
            x = run_block(self, blk.attend, blk.mbconv(x))
        return x


class MaxViT(HierarchicalBackbone):
    stem_stride = 2

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        dims: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 5, 2),
        stem_width: int = 64,
        head_dim: int = 32,
        window_size: int | None = None,  # None: img_size // 32 (7 at 224, as the paper)
        grid_size: int | None = None,  # None: window_size
        mlp_ratio: float = 4.0,
        expand_ratio: float = 4.0,
        se_ratio: float = 0.25,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        attn_backend: str = "auto",
    ):
        super().__init__()
        depths, dims = [int(d) for d in depths], [int(d) for d in dims]
        if len(depths) != len(dims) or not depths or min(depths) < 1:
            raise ValueError(
                f"depths {depths} and dims {dims} must be non-empty, of equal length, depths >= 1"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        window_size = max(img_size // 32, 1) if window_size is None else window_size
        grid_size = window_size if grid_size is None else grid_size
        self.img_size, self.in_chans, self.depths, self.dims = img_size, in_chans, depths, dims
        self.stem_width, self.head_dim, self.window_size, self.grid_size = (
            stem_width,
            head_dim,
            window_size,
            grid_size,
        )
        self.mlp_ratio, self.expand_ratio, self.se_ratio = mlp_ratio, expand_ratio, se_ratio
        self.drop_path_rate = drop_path_rate
        self.num_features = dims[-1]
        self.stem = Stem(in_chans, stem_width)
        self.mask_token = nn.Parameter(torch.zeros(1, stem_width, 1, 1)) if mask_token else None
        total = sum(depths)
        dpr = drop_path_rates(drop_path_rate, total)
        block_kwargs = dict(
            window_size=window_size,
            grid_size=grid_size,
            head_dim=head_dim,
            mlp_ratio=mlp_ratio,
            expand_ratio=expand_ratio,
            se_ratio=se_ratio,
            backend=attn_backend,
        )
        self.stages = nn.ModuleList(
            MaxViTStage(
                stem_width if i == 0 else dims[i - 1],
                dims[i],
                depths[i],
                dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                **block_kwargs,
            )
            for i in range(len(dims))
        )
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)  # head: pool, norm, pre-logits MLP (tanh), classifier
        self.pre_logits = nn.Linear(dims[-1], dims[-1])
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=2 ** (i + 2), module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """timm's init for MaxViT ("vit_eff"): EfficientNet-style convs; xavier-uniform attention/MLP linears with
        zero biases (MLP biases normal(1e-6)); normal(0.02) bias tables. The head keeps PyTorch's default init,
        as timm's does."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                init_conv_weights(m)
            elif isinstance(m, nn.Linear) and name.startswith("stages."):
                nn.init.xavier_uniform_(m.weight)
                if ".mlp." in name:
                    nn.init.normal_(m.bias, std=1e-6)
                else:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RelPosAttention):
                nn.init.normal_(m.relative_position_bias_table, std=0.02)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        names = {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then stages or blocks, then head.
        Downsampling lives inside each stage's first block, so blocks are the only groups."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)"
        return {"stem": r"^stem|^mask_token", "blocks": blocks, "head": r"^norm|^pre_logits|^head"}

    def init_head(self, head: nn.Linear) -> None:
        """A new classifier keeps PyTorch's default init, as timm's."""

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stem output (B, C_stem, ceil(H/2), ceil(W/2)); masked positions (True) become the mask token or zeros."""
        return replace_masked(self.stem(images), mask, self.mask_token, "channels_first")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.tanh(self.pre_logits(self.norm(x.mean(dim=(-2, -1)))))  # (B, C)
        return x if pre_logits else self.head(x)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (lists, so YAML can hold them)."""
        return dict(
            img_size=self.img_size,
            in_chans=self.in_chans,
            dims=list(self.dims),
            depths=list(self.depths),
            stem_width=self.stem_width,
            head_dim=self.head_dim,
            window_size=self.window_size,
            grid_size=self.grid_size,
            mlp_ratio=self.mlp_ratio,
            expand_ratio=self.expand_ratio,
            se_ratio=self.se_ratio,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
        )


# name: (dims, depths, stem width); the paper's Table 1 sizes (timm's maxvit_*_tf_224). `test` is CI-sized:
# 64px, so windows and grids are 2 x 2 (img_size // 32).
_SIZES = {
    "maxvit_test": ((32, 64, 96, 128), (1, 1, 2, 1), 32),
    "maxvit_tiny_224": ((64, 128, 256, 512), (2, 2, 5, 2), 64),
    "maxvit_small_224": ((96, 192, 384, 768), (2, 2, 5, 2), 64),
    "maxvit_base_224": ((96, 192, 384, 768), (2, 6, 14, 2), 64),
    "maxvit_large_224": ((128, 256, 512, 1024), (2, 6, 14, 2), 128),
}
register_sizes(
    MaxViT,
    {
        name: dict(img_size=64 if name.endswith("_test") else 224, dims=dims, depths=depths, stem_width=stem)
        for name, (dims, depths, stem) in _SIZES.items()
    },
    smoke=dict(img_size=64, depths=(1, 1, 1, 1)),  # CPU-test size (see models/__init__.py)
)
