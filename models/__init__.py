"""Model zoo. `create_model(name, **overrides)` builds any registered backbone; nothing here imports pretrain."""

from __future__ import annotations

import torch.nn as nn

from models import vit  # noqa: F401  (registers the ViT sizes)
from models.registry import MODELS, Registry, check_kwargs


def create_model(name: str, **overrides) -> nn.Module:
    """Build registered model `name`; `overrides` replace its default constructor arguments."""
    factory = MODELS.get(name)
    check_kwargs(factory, overrides, where=f"model {name!r}")
    return factory(**overrides)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


__all__ = ["MODELS", "Registry", "check_kwargs", "create_model", "list_models"]
