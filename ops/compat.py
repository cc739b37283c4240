"""Make `import torchvision` survive on a CPU-only torch (transformers and streaming import it).

The registry's torchvision wheel is built against CUDA torch: on the CPU torch its import dies with
`RuntimeError: operator torchvision::nms does not exist`. Its pure-Python parts import fine once the two
operator schemas its meta registrations refer to exist, so on a CPU-only torch we define them (with no kernel:
torchvision's compiled ops stay unavailable, and Tessera never calls them). Nothing runs at import time.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_NMS_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
# The Library must stay alive: when it is garbage-collected, torch unregisters its definitions.
_TORCHVISION_LIB: torch.library.Library | None = None


def _torchvision_ops_load() -> bool:
    """True when torchvision is absent or its compiled ops load on this torch (then it needs no help)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(libs[0])  # a matching build registers its real ops here
    except OSError:  # built against another torch (the registry's CUDA wheel on CPU torch)
        return False
    return True


def ensure_torchvision_importable() -> None:
    """Define `torchvision::nms`/`qnms`, once, before torchvision's first import, if its ops cannot load."""
    global _TORCHVISION_LIB
    if _TORCHVISION_LIB is not None or torch.version.cuda is not None or "torchvision" in sys.modules:
        return
    if _torchvision_ops_load():
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(op + _NMS_SCHEMA)
        except RuntimeError as err:  # a real torchvision build or another shim got there first
            if "multiple times" not in str(err) and "already" not in str(err):
                raise
    _TORCHVISION_LIB = lib


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
    with timm importable everywhere, accelerate's CLI imports it at start, and timm imports torchvision, which
    fails on this CPU torch (see ensure_torchvision_importable). Tessera never needs timm at run time."""
    ensure_torchvision_importable()
    extra = os.path.join(sys.prefix, TEST_DEPS)
    if os.path.isdir(extra) and extra not in sys.path:
        sys.path.append(extra)
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"timm is missing: bash scripts/setup.sh installs it into {extra}") from err
    return timm
