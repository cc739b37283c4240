"""Make `import torchvision` work on a CPU-only torch, in any Python of the venv, without importing Tessera.

The registry's torchvision wheel is built against CUDA torch: on the CPU torch its import dies with
`RuntimeError: operator torchvision::nms does not exist`, and with it `import streaming`, transformers' vision
classes, its fast image processors and `pipeline(...)`. Its pure-Python parts work once the two operator schemas
its meta registrations refer to exist, so on a CPU-only torch we define them (with no kernel: torchvision's
compiled ops stay unavailable; Tessera never calls them).

Two ways in, one implementation:
  * `ensure_torchvision_importable()`: Tessera calls it before it imports transformers or streaming;
  * an import hook installed into the venv (`python -m ops.torchvision_hook install`, run by scripts/setup.sh):
    a `.pth` file puts a finder on `sys.meta_path` at interpreter start. The finder only compares module names
    (no torch import at start, so `python -c pass` stays as fast); when torchvision is first *executed* it
    defines the schemas, then steps out of the way. A mere `importlib.util.find_spec("torchvision")` (how
    libraries probe for it) imports nothing.
This file is copied into site-packages as `_tessera_torchvision_hook.py`, so it imports only the standard
library at module level, and importing it has no side effects.
"""

from __future__ import annotations

import os  # (already imported by `site` at start: free)
import sys

# Nothing else at module level: every module imported here would be paid by every interpreter start in the venv.

INSTALLED_NAME = "_tessera_torchvision_hook"  # the copy in site-packages
PTH_NAME = "tessera-torchvision-hook.pth"
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_LIB = None  # the torch.library.Library holding the schemas: torch unregisters them when it is collected


def _ops_load(torch) -> bool:
    """True when torchvision is absent or its compiled ops load on this torch (then it needs no help)."""
    import glob
    import importlib.util

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
    """Define `torchvision::nms`/`qnms`, once, before torchvision's first import, if its compiled ops cannot
    load. Does nothing once torchvision is imported (by then it either worked or failed)."""
    if "torchvision" not in sys.modules:
        _prepare()


def _prepare() -> None:
    global _LIB
    if _LIB is not None:
        return
    import torch

    if torch.version.cuda is not None or _ops_load(torch):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        try:
            lib.define(op + _SCHEMA)
        except RuntimeError as err:  # another copy of this shim (or a real build) got there first
            if "multiple times" not in str(err) and "already" not in str(err):
                raise
    _LIB = lib


class _Loader:
    """(An importlib Loader, by duck typing: subclassing importlib.abc would cost ~10 ms at every start.)
    Wraps torchvision's own loader: shims, restores the original loader on the module, then runs it."""

    def __init__(self, finder: TorchvisionFinder, loader) -> None:
        self.finder, self.loader = finder, loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.finder.uninstall()
        module.__loader__ = module.__spec__.loader = self.loader  # afterwards nothing shows this wrapper
        try:
            _prepare()  # (torchvision is in sys.modules already: the import system put it there)
        except Exception as err:  # never make an import fail that would otherwise have worked
            print(f"{INSTALLED_NAME}: could not prepare torchvision ({err})", file=sys.stderr)
        self.loader.exec_module(module)

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.loader, name)


class TorchvisionFinder:
    """On sys.meta_path: answers only for the top-level `torchvision`, with its real spec and a wrapped loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(self, spec.loader)
                return spec
        return None

    def uninstall(self) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]


def install() -> None:
    """Put the finder first on sys.meta_path (what the .pth line calls at interpreter start)."""
    if "torchvision" in sys.modules or any(type(f).__name__ == "TorchvisionFinder" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, TorchvisionFinder())


# --- installing into a venv -------------------------------------------------------------------------------


def _site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def install_into_venv(site_packages: str | None = None) -> list[str]:
    """Copy this file into site-packages as `_tessera_torchvision_hook.py` and add the .pth line that installs
    the finder at start. Idempotent; returns the paths written."""
    site = site_packages or _site_packages()
    target = os.path.join(site, INSTALLED_NAME + ".py")
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    with open(target, "w", encoding="utf-8") as f:
        f.write(source)
    import py_compile

    py_compile.compile(target, doraise=True)  # as pip does: no interpreter start pays for compiling it
    pth = os.path.join(site, PTH_NAME)
    with open(pth, "w", encoding="utf-8") as f:  # a .pth line starting with `import` is executed at start
        f.write(f"import {INSTALLED_NAME}; {INSTALLED_NAME}.install()\n")
    return [target, pth]


def uninstall_from_venv(site_packages: str | None = None) -> list[str]:
    site = site_packages or _site_packages()
    removed = []
    for name in (INSTALLED_NAME + ".py", PTH_NAME):
        path = os.path.join(site, name)
        if os.path.exists(path):
            os.remove(path)
            removed.append(path)
    import importlib.util

    cached = importlib.util.cache_from_source(os.path.join(site, INSTALLED_NAME + ".py"))
    if os.path.exists(cached):
        os.remove(cached)
    return removed


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ops.torchvision_hook", description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["install", "uninstall"])
    p.add_argument("--site-packages", default=None, help="default: this interpreter's site-packages")
    args = p.parse_args(argv)
    fn = install_into_venv if args.action == "install" else uninstall_from_venv
    for path in fn(args.site_packages):
        print(f"{args.action}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
