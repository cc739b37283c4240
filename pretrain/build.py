"""Config -> the trained module (an objective wrapping a registered backbone)."""

from __future__ import annotations

import torch
import torch.nn as nn

import models
from pretrain.config import Config
from pretrain.data.sources import get_dataset
from pretrain.objectives import build_objective


def model_kwargs(cfg: Config) -> dict:
    """The backbone's constructor arguments: the config's, plus what the data decides unless the config says."""
    kwargs = dict(cfg.model.kwargs)
    kwargs.setdefault("in_chans", get_dataset(cfg.data.dataset).channels)
    kwargs.setdefault("img_size", cfg.data.image_size)
    return kwargs


def build_model(cfg: Config) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every restart
    kwargs = model_kwargs(cfg)
    backbone = models.create_model(cfg.model.name, **kwargs)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return build_objective(cfg.objective, backbone)


def example_batch(cfg: Config, batch_size: int, device: torch.device | str = "cpu") -> dict:
    """A batch shaped like the loader's (values random), e.g. to count FLOPs on the meta device."""
    kwargs = model_kwargs(cfg)
    size = cfg.data.image_size
    return {
        "image": torch.randn(batch_size, kwargs["in_chans"], size, size, device=device),  # (B, C, S, S)
        "label": torch.zeros(batch_size, dtype=torch.long, device=device),
        "index": torch.arange(batch_size, device=device),
    }


def count_params(module: nn.Module) -> int:
    # under ZeRO-3 a rank holds an empty placeholder; DeepSpeed keeps the full size in ds_numel
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
