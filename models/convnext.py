"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") and ConvNeXt V2 (Woo et al. 2023, GRN).

The backbone contract is in models/__init__.py. Here:
  stem: 4x4 stride-4 conv + LayerNorm -> (B, C0, H/4, W/4)  (`stem_stride` = 4; a `mask` applies here)
  stages.i: downsample (LayerNorm + 2x2 stride-2 conv, none in stage 0), then blocks, at stride 4 * 2**i
  block (V1): x + drop_path(gamma * pwconv2(gelu(pwconv1(LN(dwconv7x7(x))))))   gamma: layer scale, init 1e-6
  block (V2): x + drop_path(pwconv2(GRN(gelu(pwconv1(LN(dwconv7x7(x)))))))       no layer scale
  forward_features(images, mask=None) -> last stage map (B, C3, H/32, W/32), un-normed (HF last_hidden_state)
  forward_head(x, pre_logits=True) -> LayerNorm(mean over H, W) (B, C3)             (HF pooler_output)
  forward_intermediates(images) -> stage i's output after its blocks (HF hidden_states[i + 1])
Inputs of any size run (convs floor odd sizes, as HF does); `img_size` is the native size, kept for export.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hierarchical import HierarchicalBackbone, replace_masked, run_blocks
from models.layers import drop_path, drop_path_rates
from models.registry import register_sizes

NORM_EPS = 1e-6  # every LayerNorm inside the network (stem, downsample, blocks), as the paper's code and HF


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a channels-first map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2, eq. 1-3) on channels-last maps: aggregate each channel by its
    L2 norm over H, W, normalise by the mean over channels, calibrate the input; gamma = beta = 0 at init makes it
    the identity."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)  # (B, 1, 1, C)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, LayerNorm, inverted MLP (4x) with GELU [+ GRN], [layer scale], stochastic depth."""

    def __init__(
        self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6, grn: bool = False
    ):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)  # 1x1 convs as linears on channels-last maps
        self.grn = GRN(4 * dim) if grn else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        ls = layer_scale_init_value
        self.gamma = nn.Parameter(torch.full((dim,), ls)) if ls > 0 else None
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = F.gelu(self.pwconv1(self.norm(y)))  # (B, H, W, 4C), exact (erf) GELU
        if self.grn is not None:
            y = self.grn(y)
        y = self.pwconv2(y)  # (B, H, W, C)
        if self.gamma is not None:
            y = self.gamma * y
        return x + drop_path(y.permute(0, 3, 1, 2), self.drop_path, self.training)


class ConvNeXtStage(nn.Module):
    """A downsampling layer (LayerNorm + 2x2 stride-2 conv; none in stage 0, which follows the stem) and the
    blocks; `ConvNeXt.run_stage` runs it."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, dpr: Sequence[float], ls: float, grn: bool):
        super().__init__()
        if in_dim is None:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=NORM_EPS), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2)
            )
        self.blocks = nn.ModuleList(ConvNeXtBlock(dim, dpr[j], ls, grn) for j in range(depth))


class ConvNeXtLayout(HierarchicalBackbone):
    """What the ConvNeXt-shaped families share (ConvNeXt, ConvNeXt V2, HorNet): `stem` to stride 4 with an optional
    `mask_token`, `stages[i]` of `downsample` then `blocks`, and a head that averages the last map, then `norm`
    (LayerNorm) and `head`. Subclasses build those modules and keep their own hparams."""

    def init_weights(self) -> None:
        """The papers' code: truncated normal (std 0.02) convs and linears with zero bias; unit LayerNorms,
        layer scale at its init value, ConvNeXt V2's zero GRN (set in their constructors)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay); a downsample joins its stage's first
        block, as in timm (and HorNet's code)."""
        blocks = (
            r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)]
        )
        return {"stem": r"^stem|^mask_token", "blocks": blocks, "head": r"^norm|^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stem output (B, C0, H/4, W/4); positions where `mask` (B, H/4, W/4) is True hold the mask token
        (or zeros)."""
        return replace_masked(self.stem(images), mask, self.mask_token, "channels_first")  # (B, C0, h, w)

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:  # (B, C_{i-1}, h, w) -> (B, C_i, h', w')
        return run_blocks(self, self.stages[i].blocks, self.stages[i].downsample(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean(dim=(2, 3)))  # (B, C3): global average pool, then LayerNorm
        return x if pre_logits else self.head(x)


class ConvNeXt(ConvNeXtLayout):
    """ConvNeXt V1: stem, then `len(depths)` stages of widths `dims`; blocks with layer scale, no GRN."""

    use_grn = False  # ConvNeXtV2 turns it on (and layer scale off)

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        layer_scale_init_value: float = 1e-6,  # 0 disables layer scale
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        head_norm_eps: float = 1e-6,  # the pooled LayerNorm's eps (HF: config.layer_norm_eps)
        mask_token: bool = False,
    ):
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if len(depths) != len(dims) or not depths:
            raise ValueError(f"depths {depths} and dims {dims} must be non-empty and of the same length")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.depths, self.dims = depths, dims
        self.layer_scale_init_value, self.drop_path_rate = layer_scale_init_value, drop_path_rate
        self.head_norm_eps = head_norm_eps
        self.stem_stride = patch_size
        self.num_features = dims[-1]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size),
            LayerNorm2d(dims[0], eps=NORM_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dims[0], 1, 1)) if mask_token else None
        # stochastic depth grows linearly over all blocks, 0 for the first
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        dpr = [[next(rates) for _ in range(d)] for d in depths]  # per stage
        ls = 0.0 if self.use_grn else layer_scale_init_value
        self.stages = nn.ModuleList(
            ConvNeXtStage(dims[i - 1] if i else None, dims[i], depths[i], dpr[i], ls, self.use_grn)
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
            layer_scale_init_value=self.layer_scale_init_value,
            num_classes=self.head.out_features if isinstance(self.head, nn.Linear) else 0,
            drop_path_rate=self.drop_path_rate,
            head_norm_eps=self.head_norm_eps,
            mask_token=self.mask_token is not None,
        )


class ConvNeXtV2(ConvNeXt):
    """ConvNeXt V2: GRN after the MLP's GELU, no layer scale."""

    use_grn = True

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        depths: tuple[int, ...] = (3, 3, 9, 3),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        num_classes: int = 0,
        drop_path_rate: float = 0.0,
        head_norm_eps: float = 1e-6,
        mask_token: bool = False,
    ):
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            depths=depths,
            dims=dims,
            layer_scale_init_value=0.0,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            head_norm_eps=head_norm_eps,
            mask_token=mask_token,
        )

    def hparams(self) -> dict:
        hp = super().hparams()
        del hp["layer_scale_init_value"]
        return hp


# name: (depths, dims). `test` is CI-sized; the rest are the papers' sizes (ConvNeXt Table 9 / V2 Table 1).
_SIZES = {
    ConvNeXt: {
        "convnext_test": ((1, 1, 1, 1), (16, 32, 64, 128)),
        "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
        "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
        "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
        "convnext_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    },
    ConvNeXtV2: {
        "convnextv2_test": ((1, 1, 1, 1), (16, 32, 64, 128)),
        "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
        "convnextv2_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
        "convnextv2_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
        "convnextv2_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
        "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
        "convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
        "convnextv2_large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    },
}
for _cls, _sizes in _SIZES.items():
    register_sizes(
        _cls,
        {
            name: dict(img_size=64 if name.endswith("_test") else 224, depths=depths, dims=dims)
            for name, (depths, dims) in _sizes.items()
        },
        smoke=dict(img_size=64, depths=(1, 1, 1, 1)),  # CPU-test size: one block per stage
    )
