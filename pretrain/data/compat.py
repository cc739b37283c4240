"""The one door through which Tessera imports mosaicml-streaming (it imports torchvision: see ops.compat)."""

from __future__ import annotations

from types import ModuleType

from ops.compat import ensure_torchvision_importable


def import_streaming() -> ModuleType:
    """Return the `streaming` module, making torchvision importable first where needed."""
    ensure_torchvision_importable()
    try:
        import streaming
    except ImportError as err:
        raise ImportError(
            "Tessera's data layer needs mosaicml-streaming: pip install mosaicml-streaming "
            "(with -c requirements/constraints.txt)"
        ) from err
    return streaming
