"""Parameter groups (no weight decay on biases, norms, tokens, position embeddings; layer-wise LR decay) and the
LR schedule."""

from __future__ import annotations

import math
import re

import torch.nn as nn


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters that modules list in their `no_weight_decay()`."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def layer_ids(backbone: nn.Module) -> dict[str, int]:
    """Depth of every parameter from the backbone's `group_matcher()`: 0 for the stem, 1..N for the blocks in the
    order of the integers their regex captures (plus the optional suffix tuple), N + 1 for the head."""
    gm = backbone.group_matcher()
    blocks = gm["blocks"] if isinstance(gm["blocks"], list) else [(gm["blocks"], None)]
    where = f"{type(backbone).__name__}.group_matcher()"
    keys: dict[str, object] = {}
    for name, _ in backbone.named_parameters():
        hits: list[object] = []
        if re.match(gm["stem"], name):
            hits.append("stem")
        for pattern, suffix in blocks:
            m = re.match(pattern, name)
            if m:
                hits.append(tuple(int(g) for g in m.groups() if g is not None) + tuple(suffix or ()))
        if re.match(gm["head"], name):
            hits.append("head")
        if len(hits) != 1:
            raise ValueError(f"{where}: parameter {name!r} matches {len(hits)} groups, expected exactly one")
        keys[name] = hits[0]
    order = sorted({k for k in keys.values() if isinstance(k, tuple)})
    rank = {k: i + 1 for i, k in enumerate(order)}
    top = len(order) + 1
    return {n: 0 if k == "stem" else top if k == "head" else rank[k] for n, k in keys.items()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups. With layer_decay < 1 each backbone depth d (of D + 1) gets lr_scale = layer_decay ** (D + 1 - d)
    (BEiT/MAE fine-tuning); the objective's own heads and decoders keep the full LR. Engines apply `lr_scale`."""
    skip = no_decay_names(model)
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    ids = layer_ids(backbone) if layer_decay != 1.0 else {}
    top = max(ids.values(), default=0)
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or name in skip or name.endswith("_token") else weight_decay
        depth = ids.get(name[len(prefix) :], top) if name.startswith(prefix) else top
        groups.setdefault((wd, layer_decay ** (top - depth)), []).append(p)
    return [
        {"params": ps, "weight_decay": wd, "lr_scale": scale}
        for (wd, scale), ps in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][0]))
    ]


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then cosine/linear decay or constant."""
    if warmup_steps and step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return lr + (min_lr - lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
