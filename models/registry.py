"""A registry is a name -> factory dict with a decorator. One per kind (models, objectives, datasets)."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            near = difflib.get_close_matches(name, self._entries, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
            raise KeyError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._entries


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], where: str) -> None:
    """Raise TypeError naming any key `fn` does not accept (with the nearest accepted names) or a value of
    the wrong simple type. A factory that forwards to a class declares it as `fn.builds`."""
    target = getattr(fn, "builds", fn)
    init = target.__init__ if inspect.isclass(target) else target
    params = {
        n: p
        for n, p in inspect.signature(init).parameters.items()
        if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    try:
        hints = typing.get_type_hints(init)
    except (NameError, TypeError):
        hints = {}
    for key, value in kwargs.items():
        if key not in params:
            near = difflib.get_close_matches(key, params, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, near))}?" if near else ""
            raise TypeError(f"{where}: unknown key {key!r}.{hint} Valid keys: {', '.join(sorted(params))}")
        expected = hints.get(key)
        ok = {
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
            bool: lambda v: isinstance(v, bool),
            str: lambda v: isinstance(v, str),
        }.get(expected)
        if ok is not None and not ok(value):
            raise TypeError(f"{where}.{key}: expected {expected.__name__}, got {value!r}")


MODELS = Registry("model")


def register_sizes(cls: type, sizes: dict[str, dict[str, Any]], smoke: dict[str, Any]) -> None:
    """Register a model factory per size: `MODELS.get(name)(**overrides)` builds `cls(**{**sizes[name],
    **overrides})` and carries `builds` (`cls`, what `check_kwargs` validates overrides against) and `smoke`
    (overrides that make the size cheap for CPU tests; see models/__init__.py)."""
    for name, defaults in sizes.items():
        MODELS.register(name)(_sized_factory(cls, defaults, smoke))


def _sized_factory(cls: type, defaults: dict[str, Any], smoke: dict[str, Any]) -> Callable[..., Any]:
    def factory(**overrides):
        return cls(**{**defaults, **overrides})

    factory.builds = cls
    factory.smoke = dict(smoke)  # a copy per size
    return factory
