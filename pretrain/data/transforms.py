"""Image transforms in torch + PIL only (no torchvision: its CUDA wheel does not load on CPU torch).

Every random choice draws from an explicit `torch.Generator`, never the global RNG, so the same sample gets the
same augmentation in any worker, on any rank, before or after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image (L or RGB) -> float (C, H, W) in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, C)
    x = torch.from_numpy(arr.copy())
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    return x.float().div_(255.0)


def resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, size, size), bilinear with antialiasing (so downscaling does not alias)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    out = F.interpolate(x.unsqueeze(0), size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out.squeeze(0)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random area fraction `scale` with aspect `ratio` (log-uniform), resize to (C, size, size).

    Same sampling as torchvision's RandomResizedCrop: 10 tries, then a center crop clamped to `ratio`.
    """
    if generator is None:
        raise ValueError("random_resized_crop needs an explicit torch.Generator")
    _, h, w = x.shape
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        cw = round(math.sqrt(target_area * aspect))
        ch = round(math.sqrt(target_area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            return resize(x[:, top : top + ch, left : left + cw], size)
    in_ratio = w / h  # fallback: the largest center crop within the allowed aspect range
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(x[:, top : top + ch, left : left + cw], size)


def hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror (C, H, W) left-right with probability p."""
    if torch.rand((), generator=generator).item() < p:
        return x.flip(-1)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, H, W) -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """The whole per-sample pipeline: train (crop + flip) or eval (resize only), then normalize. Picklable."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    crop_scale_min: float = 0.35
    hflip: bool = True

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        x = to_tensor(img)  # (C, H, W) in [0, 1]
        if self.augment:
            if generator is None:
                raise ValueError("augmenting needs an explicit torch.Generator")
            x = random_resized_crop(x, self.image_size, (self.crop_scale_min, 1.0), generator=generator)
            if self.hflip:
                x = hflip(x, generator)
        else:
            x = resize(x, self.image_size)
        return normalize(x, self.mean, self.std)  # (C, S, S)
