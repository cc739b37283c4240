"""Objectives: nn.Modules that own their heads and losses and return {"loss": scalar, **parts}.

Each registered objective class has a `Config` dataclass (its section of the config tree, chosen by
`objective.name`) and is built as `cls(backbone, cfg)`. Scalar parts are logged; other parts (predictions,
masks) are for the objective's own `visuals()`.
"""

from __future__ import annotations

import torch.nn as nn

from models.registry import Registry

OBJECTIVES = Registry("objective")


def objective_name(cfg) -> str:
    for name in OBJECTIVES.names():
        if OBJECTIVES.get(name).Config is type(cfg):
            return name
    raise KeyError(f"no registered objective has config class {type(cfg).__name__}")


def build_objective(cfg, backbone: nn.Module) -> nn.Module:
    return OBJECTIVES.get(objective_name(cfg))(backbone, cfg)


from pretrain.objectives import classify, mae  # noqa: E402,F401  (register "classify", "mae")

__all__ = ["OBJECTIVES", "build_objective", "objective_name"]
