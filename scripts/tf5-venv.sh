#!/usr/bin/env bash
# Create ./.venv-tf5: a *user's* environment with the newest transformers 5 (pinned, with every dependency, by
# requirements/constraints-tf5.txt) and without Tessera, where tests/test_transformers5.py loads Tessera's
# Hugging Face exports (tests/tf5_check.py). Tessera's own .venv stays on transformers 4.57 (see
# requirements/constraints.txt). torch==2.13.0 (CPU wheel) first, as scripts/setup.sh does, then the rest.
# Idempotent: a second run only re-checks (a stamp records the hash of what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-tf5
CONSTRAINTS=requirements/constraints-tf5.txt
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do command -v "$cand" >/dev/null && PY="$cand" && break; done
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" || { echo "[tf5-venv] '$PY -m venv' failed: install the venv module (Debian: apt-get install python3.11-venv)"; exit 1; }
fi
PIP="$VENV/bin/python -m pip"

stamp="$VENV/.tf5-install"
want="$(cat "$CONSTRAINTS" scripts/tf5-venv.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  rm -f "$stamp"
  echo "[tf5-venv] installing torch==2.13.0 (CPU), then transformers 5 and its pinned dependencies into $VENV"
  $PIP install -q torch==2.13.0 -c "$CONSTRAINTS"
  $PIP install -q -c "$CONSTRAINTS" transformers pillow torchvision
  $PIP check
  echo "$want" > "$stamp"
fi
# A user's venv: Tessera must not be importable from it (an editable install would hide export bugs).
if $PIP show -q tessera >/dev/null 2>&1; then
  echo "[tf5-venv] removing Tessera from $VENV (it plays a user's environment)"
  $PIP uninstall -y -q tessera
fi
# The registry's torchvision is a CUDA build: the import hook (ops/torchvision_hook.py, copied into this venv's
# site-packages with a .pth line) lets its Python parts import on the CPU torch. Cheap, so always refreshed.
"$VENV/bin/python" ops/torchvision_hook.py install >/dev/null
# -I: nothing from this checkout on sys.path (as for a user), only the venv's own site-packages
PYABS="$(pwd)/$VENV/bin/python"
echo "[tf5-venv] ready: $(cd / && "$PYABS" -I -c 'import torch, torchvision, transformers; print("torch", torch.__version__, "| torchvision", torchvision.__version__, "| transformers", transformers.__version__)')"
