#!/usr/bin/env bash
# One GPU check (benchmarks/gpu_check.py): attention kernels, MAE ViT-B/L and every backbone family against their
# twins, DeepSpeed ZeRO-2 stop/resume. Writes one markdown table to $OUT/gpu_check.md (else runs/gpu_check.md).
#
#   bash benchmarks/gpu_wheels.sh              # here, once, before a GPU session: fills .whl/
#   bash benchmarks/gpu_check.sh               # on the GPU machine, with .whl carried: installs it, then checks
#   bash benchmarks/gpu_check.sh --smoke       # the same code at tiny sizes on the CPU, in the repo's .venv
#
# On the GPU machine (python3 of the image, no network) the carried wheels go into /tmp/tessera-site, which
# PYTHONPATH puts before the image's own packages (transformers 4.57.6 over the image's 5.x, and so on).
# Other arguments go to gpu_check.py (--budget-s, --sections, --out, --work). PYTHON=... picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
for a in "$@"; do [ "$a" = --smoke ] && smoke=1; done
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ "$smoke" = 1 ] && [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi

if [ -n "${OUT:-}" ]; then
  log="$OUT/gpu_check.log"
else
  mkdir -p runs && log=runs/gpu_check.log
fi
exec > >(tee "$log") 2>&1  # everything below, pip and nvidia-smi included, also into the log
tee_pid=$!

if [ "$smoke" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/tessera-site
  echo "[gpu_check] installing $(ls .whl/*.whl | wc -l) carried wheels into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "[gpu_check] installing .whl/ failed"; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$smoke" = 0 ]; then
  echo "[gpu_check] no .whl/ here: using the interpreter's own packages (bash benchmarks/gpu_wheels.sh makes it)"
fi
export PYTHONUNBUFFERED=1
if [ "$smoke" = 0 ]; then  # the card as found (read only; its settings are left alone)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu,utilization.gpu --format=csv \
    2>/dev/null || true
fi

# gpu_check.py keeps its own budget (450 s by default); this only stops a run that hangs past it, inside the
# device call's 10 minutes.
limit="${GPU_CHECK_TIMEOUT:-$([ "$smoke" = 1 ] && echo 400 || echo 510)}"
timeout -k 15 "$limit" "$PY" -u benchmarks/gpu_check.py "$@"
rc=$?
exec >&- 2>&-  # close the pipe, so tee finishes writing the log before this script exits
wait "$tee_pid" 2>/dev/null
exit "$rc"
