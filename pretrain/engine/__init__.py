"""The engine seam: how a model's gradients are computed, reduced, clipped and applied, and how its state is
saved. The loop sees only `Engine`; it never knows which backend runs (and engines never know objectives).
"""

from __future__ import annotations

import torch.nn as nn

from pretrain.config import Config
from pretrain.dist import DistContext
from pretrain.engine.base import Engine, StepResult


def build_engine(model: nn.Module, cfg: Config, ctx: DistContext) -> Engine:
    if cfg.engine.backend == "deepspeed":
        from pretrain.engine.deepspeed_engine import DeepSpeedEngine  # the one module that imports deepspeed

        return DeepSpeedEngine(model, cfg, ctx)
    from pretrain.engine.ddp import TorchEngine

    return TorchEngine(model, cfg, ctx)


def consolidated_state_dict(ckpt_engine_dir: str, backend: str) -> dict:
    """fp32 full state dict of the trained module from a checkpoint's engine folder (any ZeRO stage)."""
    if backend == "deepspeed":
        from pretrain.engine.deepspeed_engine import consolidate

        return consolidate(ckpt_engine_dir)
    from pretrain.engine.ddp import consolidate

    return consolidate(ckpt_engine_dir)


__all__ = ["Engine", "StepResult", "build_engine", "consolidated_state_dict"]
