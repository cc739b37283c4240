"""Imports that need help on this machine's CPU-only torch: transformers and timm (they import torchvision).

The torchvision shim itself lives in ops/torchvision_hook.py, which scripts/setup.sh also installs into the venv
as an import hook, so a user's own Python imports transformers, streaming and torchvision without Tessera.
Tessera still calls it itself, for environments set up without that hook. Nothing runs at import time.
"""

from __future__ import annotations

import os
import sys

from ops.torchvision_hook import ensure_torchvision_importable

__all__ = ["ensure_torchvision_importable", "import_timm", "import_transformers"]


def import_transformers():
    """The `transformers` module, importable on CPU-only torch."""
    ensure_torchvision_importable()
    import transformers

    return transformers


TEST_DEPS = (
    "test-deps"  # under the venv (sys.prefix): reference implementations only tests and benchmarks import
)


def import_timm():
    """timm (the reference MaxViT), which scripts/setup.sh installs into <venv>/test-deps, outside site-packages:
    with timm importable everywhere, accelerate's CLI imports it at start (and with it torchvision), which slows
    every launch. Tessera never needs timm at run time."""
    ensure_torchvision_importable()
    extra = os.path.join(sys.prefix, TEST_DEPS)
    if os.path.isdir(extra) and extra not in sys.path:
        sys.path.append(extra)
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm is missing: bash scripts/setup.sh installs it into {extra}") from err
    return timm
