#!/usr/bin/env bash
# Set up (idempotent) and run the test suite on CPU. `.ci/run` calls exactly this.
#   bash scripts/test.sh            # lint + default suite
#   RUN_SLOW=1 bash scripts/test.sh # also the tests marked slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pytest exits 5 when it collects nothing: with `set -e` that fails this script, as it should.
.venv/bin/python -m pytest -q -m "not slow and not gpu" "$@"
if [ "${RUN_SLOW:-0}" = "1" ]; then
  .venv/bin/python -m pytest -q -m slow "$@" || { rc=$?; [ $rc -eq 5 ] && echo "(no slow tests)" || exit $rc; }
fi
