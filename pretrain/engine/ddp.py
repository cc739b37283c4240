"""Plain PyTorch engine: DDP across ranks, AdamW, optional bf16 autocast. The reference the others match."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pretrain.config import Config
from pretrain.dist import DistContext
from pretrain.engine.base import Engine, StepResult, param_bounds, to_device
from pretrain.engine.cached import CachedStep, uses_cache
from pretrain.optim import param_groups


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: nn.Module, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        self.module = model.to(ctx.device)
        self.wrapped = DDP(self.module) if ctx.distributed else self.module
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.module, o.weight_decay, o.layer_decay),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            fused=True,  # one kernel over all tensors: ~4x faster optimizer step on CPU (docs/benchmarks.md)
        )
        self.autocast_dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else None
        self.params = [p for p in self.module.parameters() if p.requires_grad]

    def describe(self) -> str:
        ddp = "DDP" if isinstance(self.wrapped, DDP) else "single process"
        return f"torch ({ddp}, AdamW, {self.cfg.engine.precision})"

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype)

    def train_step(self, micro_batches: list[dict], lr: float) -> StepResult:
        if uses_cache(self.module):
            return self._cached_step(micro_batches, lr)
        n = len(micro_batches)
        outputs, total = [], 0.0  # summed on device: one host sync per step, not per micro-batch
        for i, batch in enumerate(micro_batches):
            last = i == n - 1
            sync = (
                self.wrapped.no_sync()
                if isinstance(self.wrapped, DDP) and not last
                else contextlib.nullcontext()
            )
            with sync:
                with self._autocast():
                    out = self.wrapped(to_device(batch, self.ctx.device))
                (out["loss"] / n).backward()  # mean over micro-batches, as one big batch would give
            total = total + out["loss"].detach().float()
            outputs.append(out)
        return StepResult(loss=float(total) / n, outputs=outputs, grad_norm=self._update(lr))

    def _update(self, lr: float) -> float:
        """Clip, step, zero the gradients, keep bounded parameters in bounds; returns the grad norm."""
        clip = self.cfg.train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip).item()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer-wise LR decay
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, (low, high) in param_bounds(self.module):
                p.clamp_(low, high)
        return grad_norm

    def _cached_step(self, micro_batches: list[dict], lr: float) -> StepResult:
        """GradCache (pretrain/engine/cached.py): the one-big-batch gradient of a batch-coupled loss."""
        batches = [to_device(b, self.ctx.device) for b in micro_batches]
        plan = CachedStep(self.module, batches, self.ctx.device, self._autocast)
        whole = plan.prepare(self.wrapped)
        if len(batches) == 1:  # the features kept their graph: no recompute
            plan.surrogate_single().backward()
            return StepResult(loss=float(whole["loss"]), outputs=[whole], grad_norm=self._update(lr))
        last = len(batches) - 1
        for i, batch, cached in plan.chunks():
            ddp = isinstance(self.wrapped, DDP)
            sync = self.wrapped.no_sync() if ddp and i != last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out = self.wrapped(batch, cached=cached)
                out["loss"].backward()
        return StepResult(loss=float(whole["loss"]), outputs=[whole], grad_norm=self._update(lr))

    def save(self, folder: Path) -> None:
        if self.ctx.is_main:  # DDP keeps every rank identical: one copy is the whole state
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.module.state_dict(), folder / "model.pt")
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        self.module.load_state_dict(torch.load(folder / "model.pt", map_location=self.ctx.device))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.ctx.device))

    def load_resharded(self, folder: Path) -> None:
        self.load(folder)  # one full copy of model and optimizer, whatever the number of ranks that wrote it


def consolidate(folder: str) -> dict:
    return torch.load(Path(folder) / "model.pt", map_location="cpu")
