"""MetaFormer / PoolFormer (Yu et al., "MetaFormer is Actually What You Need for Vision", CVPR 2022).

A MetaFormer block is a transformer block whose token mixer is left abstract:
    x = x + drop_path(ls1 * mixer(norm1(x)))        norm = GroupNorm(1, C), ls = layer scale (per channel)
    x = x + drop_path(ls2 * mlp(norm2(x)))          mlp = 1x1 conv, GELU, 1x1 conv
PoolFormer takes the plainest mixer there is, `Pooling`: avg_pool3x3(x) - x (stride 1, padding excluded from
the average). `MetaFormerBlock` / `MetaFormerStage` take any mixer module, so other MetaFormers plug in there.
Layout: stem conv k7 s4 p2, then 4 stages at strides 4, 8, 16, 32; stages 1..3 start with a conv k3 s2 p1.

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> last stage map (B, C, H/32, W/32), un-normed (HF last_hidden_state)
  forward_head(x, pre_logits=True) -> mean over (H, W) of the final GroupNorm(x), (B, C) (what HF's
      PoolFormerForImageClassification feeds its classifier)
  forward_intermediates(images) -> stage i's output (B, C_i, H/s_i, W/s_i) = HF hidden_states[i] (HF has one
      hidden state per stage and none for the stem)
  stem_stride = 4: the stem output has floor((H - 3) / 4) + 1 rows (H/4 when 4 divides H); `mask` has that grid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_blocks
from models.layers import drop_path, drop_path_rates
from models.registry import register_sizes


class Pooling(nn.Module):
    """PoolFormer's token mixer: the 3x3 neighbourhood average (padding not counted) minus the token itself.
    The "- x" is there because the block adds the residual back."""

    def __init__(self, pool_size: int = 3):
        super().__init__()
        if pool_size % 2 == 0:
            raise ValueError(f"pool_size must be odd (the map keeps its size), got {pool_size}")
        self.pool_size = pool_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        p = self.pool_size
        return F.avg_pool2d(x, p, stride=1, padding=p // 2, count_include_pad=False) - x


class ConvMlp(nn.Module):
    """The channel MLP as 1x1 convolutions on a (B, C, H, W) map."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the paper and HF


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (CaiT), initialised small so blocks start near identity."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return x * self.scale.view(-1, 1, 1)


class MetaFormerBlock(nn.Module):
    """x + drop_path(ls1 * mixer(norm1(x))), then x + drop_path(ls2 * mlp(norm2(x))); any token mixer."""

    def __init__(
        self,
        dim: int,
        token_mixer: nn.Module,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float | None = 1e-5,  # None: no layer scale
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim, eps=norm_eps)  # normalises over (C, H, W) per sample
        self.token_mixer = token_mixer
        self.ls1 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.norm2 = nn.GroupNorm(1, dim, eps=norm_eps)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))  # int(), as HF's intermediate_size
        self.ls2 = nn.Identity() if layer_scale_init is None else LayerScale(dim, layer_scale_init)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        x = x + drop_path(self.ls1(self.token_mixer(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


class MetaFormerStage(nn.Module):
    """Optional downsampling conv (k3 s2 p1) from `in_dim` to `dim`, then `depth` MetaFormer blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        mixer: Callable[[int], nn.Module],  # dim -> token mixer module
        downsample: bool,
        drop_paths: Sequence[float],
        **block_kwargs,
    ):
        super().__init__()
        self.downsample = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            MetaFormerBlock(dim, mixer(dim), drop_path=drop_paths[i], **block_kwargs) for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C, H', W')
        return run_blocks(self, self.blocks, self.downsample(x))


class PoolFormer(HierarchicalBackbone):
    stem_stride = 4

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        depths: Sequence[int] = (2, 2, 6, 2),
        dims: Sequence[int] = (64, 128, 320, 512),
        mlp_ratio: float = 4.0,
        pool_size: int = 3,
        layer_scale_init: float = 1e-5,
        use_layer_scale: bool = True,
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        depths, dims = [int(d) for d in depths], [int(d) for d in dims]
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {depths} and dims {dims} must be non-empty and of equal length")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.depths, self.dims = img_size, in_chans, depths, dims
        self.mlp_ratio, self.pool_size, self.norm_eps = mlp_ratio, pool_size, norm_eps
        self.layer_scale_init, self.use_layer_scale = layer_scale_init, use_layer_scale
        self.drop_path_rate = drop_path_rate
        self.num_features = dims[-1]
        self.stem = nn.Conv2d(in_chans, dims[0], kernel_size=7, stride=4, padding=2)
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0], 1, 1)) if mask_token else None
        total = sum(depths)
        dpr = drop_path_rates(drop_path_rate, total)
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            start = sum(depths[:i])
            self.stages.append(
                MetaFormerStage(
                    dims[max(i - 1, 0)],
                    dim,
                    depth,
                    mixer=lambda _dim: Pooling(pool_size),
                    downsample=i > 0,
                    drop_paths=dpr[start : start + depth],
                    mlp_ratio=mlp_ratio,
                    layer_scale_init=layer_scale_init if use_layer_scale else None,
                    norm_eps=norm_eps,
                )
            )
        self.norm = nn.GroupNorm(1, dims[-1], eps=norm_eps)  # the head's norm, before global average pooling
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)
        ]
        self.init_weights()

    def init_weights(self) -> None:
        """The paper's (timm) init: truncated-normal(0.02) convs and linears, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): stem, then stages/blocks."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )
        return {"stem": r"^stem|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stem output (B, C_0, H/4, W/4); masked positions (True) become the mask token or zeros."""
        x = self.stem(images)  # (B, C_0, H', W'), H' = floor((H - 3) / 4) + 1
        return replace_masked(x, mask, self.mask_token, "channels_first")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x).mean(dim=(-2, -1))  # (B, C)
        return x if pre_logits else self.head(x)

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (lists, so YAML can hold them)."""
        return dict(
            img_size=self.img_size,
            in_chans=self.in_chans,
            depths=list(self.depths),
            dims=list(self.dims),
            mlp_ratio=self.mlp_ratio,
            pool_size=self.pool_size,
            layer_scale_init=self.layer_scale_init,
            use_layer_scale=self.use_layer_scale,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
            norm_eps=self.norm_eps,
        )


# name: (depths, dims, layer scale init); the paper's Table 1 sizes. `test` is CI-sized.
_SIZES = {
    "poolformer_test": ((1, 1, 2, 1), (16, 32, 48, 64), 1e-5),
    "poolformer_s12": ((2, 2, 6, 2), (64, 128, 320, 512), 1e-5),
    "poolformer_s24": ((4, 4, 12, 4), (64, 128, 320, 512), 1e-5),
    "poolformer_s36": ((6, 6, 18, 6), (64, 128, 320, 512), 1e-6),
    "poolformer_m36": ((6, 6, 18, 6), (96, 192, 384, 768), 1e-6),
    "poolformer_m48": ((8, 8, 24, 8), (96, 192, 384, 768), 1e-6),
}
register_sizes(
    PoolFormer,
    {
        name: dict(
            img_size=64 if name.endswith("_test") else 224, depths=depths, dims=dims, layer_scale_init=ls
        )
        for name, (depths, dims, ls) in _SIZES.items()
    },
    smoke=dict(img_size=64, depths=(1, 1, 1, 1)),  # CPU-test size (see models/__init__.py)
)
