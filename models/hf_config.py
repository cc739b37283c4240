"""Reading a transformers config for import (`from_hf`): the checks every family's importer shares.

Each importer reads a config the way its twin class reads it, and refuses only what Tessera cannot represent,
always as `ValueError("<ConfigClass>.<field>=<value>: <why>")`.
"""

from __future__ import annotations

from typing import NoReturn

EXACT_GELU = ("gelu", "gelu_python")  # transformers' names of the exact (erf) GELU, which Tessera's MLPs use


def reject(cfg, field: str, why: str) -> NoReturn:
    raise ValueError(f"{type(cfg).__name__}.{field}={getattr(cfg, field)!r}: {why}")


def check_gelu(cfg, model: str) -> None:
    if cfg.hidden_act not in EXACT_GELU:
        reject(cfg, "hidden_act", f"Tessera's {model} uses the exact GELU ('gelu')")


def square(cfg, field: str, model: str) -> int:
    """An int, or a pair of equal ints (transformers takes either for sizes, patches and windows)."""
    v = getattr(cfg, field)
    if isinstance(v, int):
        return v
    if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] == v[1] and isinstance(v[0], int):
        return int(v[0])
    reject(cfg, field, f"Tessera's {model} takes a square {field} (one int)")


def nominal_size(cfg, field: str = "image_size") -> int:
    """An int, or the height of (height, width): for families whose twin reads the size only nominally."""
    size = getattr(cfg, field)
    if isinstance(size, (list, tuple)):
        if len(size) != 2:
            reject(cfg, field, "expected an int or (height, width)")
        size = size[0]
    return int(size)


def check_drop_path(cfg) -> float:
    """Stochastic depth (training only) as Tessera's constructors take it."""
    if not 0.0 <= float(cfg.drop_path_rate) < 1.0:
        reject(cfg, "drop_path_rate", "Tessera's stochastic depth takes a rate in [0, 1)")
    return float(cfg.drop_path_rate)


def square_entries(cfg, field: str, n: int, model: str) -> list[int]:
    """The first n entries of a per-stage list (kernels, strides, padding), each an int or a pair of equal ints
    (transformers' convolutions take either)."""
    out = []
    for v in getattr(cfg, field)[:n]:
        if isinstance(v, (list, tuple)):
            if not (len(v) == 2 and v[0] == v[1]):
                reject(cfg, field, f"Tessera's {model} takes square kernels and strides (one int per stage)")
            v = v[0]
        out.append(int(v))
    return out
