"""Objectives: nn.Modules that own their heads and losses and return {"loss": scalar, **parts}.

Each registered objective class has a `Config` dataclass (its section of the config tree, chosen by
`objective.name`) and is built as `cls(backbone, cfg)`, or `cls(backbone, cfg, tokenizer=info)` when it declares
`needs_tokenizer = True` (text objectives: pretrain.data's TokenizerInfo of the run's data), and with `seed=` (the
run's seed) when it declares `needs_seed = True`, and with `data=` (the run's DataConfig) when it declares
`needs_data = True` (distillation: the student's preprocessing, and the data a store of teacher outputs was made from). A class attribute `backbone_kwargs` (e.g. {"mask_token": True})
gives constructor arguments the backbone is built with unless the config sets them (objectives that draw per-sample masks: models.masking). Every
objective class answers `supports(backbone) -> bool` (whether it can train that backbone): a config pairing an
objective with a backbone it cannot train is refused naming the objectives that can (`objectives_for`). Scalar
parts are logged; other parts (predictions, masks) are for the objective's own `visuals()`.
"""

from __future__ import annotations

import torch.nn as nn

from models.registry import Registry

OBJECTIVES = Registry("objective")


def register_objective(name: str):
    """Class decorator: register an objective under `name`; its Config learns the name (`to_yaml` writes it)."""

    def wrap(cls: type) -> type:
        OBJECTIVES.register(name)(cls)
        cls.Config.registered_name = name
        return cls

    return wrap


def objective_config(name: str | None) -> type:
    """The Config class of objective `name`; KeyError naming the registered ones (also for a missing name)."""
    if name is None:
        raise KeyError(f"missing; registered objectives: {', '.join(OBJECTIVES.names())}")
    return OBJECTIVES.get(name).Config


def objective_name(cfg) -> str:
    name = getattr(type(cfg), "registered_name", None)
    if name is None:
        raise KeyError(f"no registered objective has config class {type(cfg).__name__}")
    return name


def objectives_for(backbone: nn.Module) -> list[str]:
    """The registered objectives that can train `backbone` (their `supports`)."""
    return [n for n in OBJECTIVES.names() if OBJECTIVES.get(n).supports(backbone)]


def build_objective(cfg, backbone: nn.Module, tokenizer=None, seed: int = 0, data=None) -> nn.Module:
    cls = OBJECTIVES.get(objective_name(cfg))
    kwargs = {}
    if getattr(cls, "needs_data", False):
        kwargs["data"] = data
    if getattr(cls, "needs_tokenizer", False):
        kwargs["tokenizer"] = tokenizer
    if getattr(cls, "needs_seed", False):
        kwargs["seed"] = seed
    return cls(backbone, cfg, **kwargs)


from pretrain.objectives import classify, clm, contrastive, distill, mae, mlm, simmim, spark  # noqa: E402,F401  (register the objectives)

__all__ = [
    "OBJECTIVES",
    "build_objective",
    "objective_config",
    "objective_name",
    "objectives_for",
    "register_objective",
]
