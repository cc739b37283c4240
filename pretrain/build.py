"""Config -> the trained module (an objective wrapping a registered backbone)."""

from __future__ import annotations

import torch
import torch.nn as nn

import models
from pretrain.config import Config
from pretrain.data.sources import get_dataset
from pretrain.objectives import build_objective


def build_model(cfg: Config) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every restart
    kwargs = dict(cfg.model.kwargs)
    if "in_chans" not in kwargs:  # the data decides the input channels and size unless the config says
        kwargs["in_chans"] = get_dataset(cfg.data.dataset).channels
    if "img_size" not in kwargs:
        kwargs["img_size"] = cfg.data.image_size
    backbone = models.create_model(cfg.model.name, **kwargs)
    if cfg.model.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return build_objective(cfg.objective, backbone)


def count_params(module: nn.Module) -> int:
    # under ZeRO-3 a rank holds an empty placeholder; DeepSpeed keeps the full size in ds_numel
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
