"""Masks for masked image modeling (SimMIM, SparK, FCMAE): a random subset of square cells of `mask_patch_size`
pixels, the same for a sample wherever and whenever it is drawn.

A sample's mask is a pure function of (seed, epoch, sample id): no RNG stream, no rank, no batch position goes in,
so a resumed run, an elastic one (another world size) and an evaluation replay draw the same cells.
Rounding: `num_masked(cells, ratio) = ceil(cells * ratio)` cells are masked in every sample (SimMIM's rule; 30
of 49 at ratio 0.6, 22 of 36), computed in exact rational arithmetic so that float noise never adds a cell.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

_SALT = 0x5EED_3A5C  # keeps mask draws apart from the per-step seeds of pretrain.loop.seed_step


def num_masked(cells: int, ratio: float) -> int:
    """ceil(cells * ratio), exactly: the ratio is read as the decimal it was written as (0.6, not 0.59999...)."""
    return math.ceil(Fraction(str(ratio)) * cells)


def mask_cells(
    image_size: int | tuple[int, int], mask_patch_size: int, stride: int, what: str = "stem"
) -> tuple[int, int]:
    """The (rows, cols) of the mask-cell grid for `image_size` images; ValueError naming both grids when a mask
    cell is not a whole number of cells of the `what` grid (`stride` pixels: "stem", or "final stage") or the
    image is not a whole number of mask cells."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if mask_patch_size <= 0 or mask_patch_size % stride:
        raise ValueError(
            f"mask_patch_size {mask_patch_size} is not a multiple of the {what} stride ({stride} px): a mask cell must "
            f"cover whole {stride}x{stride} cells of the {h // stride}x{w // stride} {what} grid"
        )
    if h % mask_patch_size or w % mask_patch_size:
        raise ValueError(
            f"image {h}x{w} is not divisible by mask_patch_size {mask_patch_size}: the mask grid "
            f"({h / mask_patch_size:g}x{w / mask_patch_size:g} cells) must tile the {h // stride}x{w // stride} "
            f"{what} grid"
        )
    return h // mask_patch_size, w // mask_patch_size


def check_ratio(cells: int, ratio: float, key: str = "objective.mask_ratio") -> int:
    """The masked count; ValueError naming `key` when it leaves no masked or no visible cell."""
    n = num_masked(cells, ratio) if 0 <= ratio <= 1 else -1
    if not 0 < n < cells:
        raise ValueError(
            f"{key}: {ratio} masks {max(n, 0)} of {cells} mask cells; at least one must be masked and one visible"
        )
    return n


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One 63-bit seed per (run seed, epoch, sample id)."""
    s = ((((seed ^ _SALT) * 1_000_003 + epoch) * 1_000_033) + index) % (2**63 - 1)
    return s


def random_cell_masks(
    seed: int, epoch: torch.Tensor, index: torch.Tensor, cells: tuple[int, int], ratio: float
) -> torch.Tensor:
    """(B, rows, cols) bool, True = masked: exactly `num_masked(rows * cols, ratio)` cells per sample, drawn from
    (seed, epoch[b], index[b]) alone. `epoch` and `index` are (B,) integer tensors (the loader's batch keys)."""
    rows, cols = cells
    n_cells = rows * cols
    n = num_masked(n_cells, ratio)
    out, device = torch.zeros(len(index), n_cells, dtype=torch.bool, device="cpu"), index.device
    if device.type == "meta":  # shapes only (FLOP counting on the meta device): any valid mask will do
        epoch, index = (
            torch.zeros(len(index), dtype=torch.long, device="cpu"),
            torch.arange(len(index), device="cpu"),
        )
    for b, (e, i) in enumerate(zip(epoch.tolist(), index.tolist())):
        g = torch.Generator().manual_seed(sample_seed(seed, int(e), int(i)))
        out[b, torch.randperm(n_cells, generator=g, device="cpu")[:n]] = True
    return out.view(-1, rows, cols).to(device)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, h, w) -> (B, h * factor, w * factor): each cell repeated factor x factor times."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
