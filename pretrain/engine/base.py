"""What every engine provides to the loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


@dataclass
class StepResult:
    loss: float  # mean loss over the micro-batches of this step (this rank)
    outputs: list[dict]  # each micro-batch's objective output
    grad_norm: float  # global grad norm before clipping


class Engine:
    module: nn.Module  # the unwrapped model (the objective with its backbone)
    name: str

    def train_step(self, micro_batches: list[dict], lr: float) -> StepResult:
        """Forward/backward every micro-batch, reduce gradients across ranks, clip, and take one step."""
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """Write engine state (model + optimizer, sharded or not) into `folder`. Called on every rank."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote into `folder`, on the same number of ranks."""
        raise NotImplementedError

    def load_resharded(self, folder: Path) -> None:
        """Restore what `save` wrote into `folder` on another number of ranks (elastic resume). Called on
        every rank; model and optimizer state must come back whole, split the way this world size splits
        them."""
        raise NotImplementedError(f"the {self.name} engine cannot resume on a different number of ranks")

    def describe(self) -> str:
        raise NotImplementedError


def to_device(batch: dict, device: torch.device, float_dtype: torch.dtype | None = None) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def param_bounds(module: nn.Module) -> list[tuple[nn.Parameter, tuple[float, float]]]:
    """Parameters the objective keeps within bounds after every optimizer step (`module.param_bounds()`:
    {qualified name: (low, high)}, e.g. CLIP's logit scale in [0, ln 100]); engines clamp them in place."""
    fn = getattr(module, "param_bounds", None)
    if fn is None:
        return []
    params = dict(module.named_parameters())
    return [(params[name], bounds) for name, bounds in fn().items()]
