#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the Python 3.12 x86-64 wheels that benchmarks/gpu_check.sh needs on the lent GPU
# machine and its image lacks or has at another version. Run it here, before the GPU session; the device call then
# carries ".whl" and gpu_check.sh installs it with `pip install --no-index --no-deps --target`.
#
#   bash benchmarks/gpu_wheels.sh        # needs the repo's .venv (bash scripts/setup.sh) and PyPI
#
# The image (device README, KINDS.md) has Python 3.12, torch 2.11 (CUDA), torchvision, accelerate 1.15, numpy,
# safetensors, timm, scikit-learn, tensorboard, pyyaml, tqdm, pillow, psutil, py-cpuinfo, ninja, msgpack, einops,
# xxhash, requests; transformers 5.17 with huggingface-hub 1.33 and tokenizers 0.23.2. What comes from here:
# - deepspeed 0.19.8: PyPI has only its sdist. With DS_BUILD_OPS=0 (no op is compiled ahead; DeepSpeed JIT-builds
#   one on first use, and Tessera's ZeRO path uses none: torch's fused AdamW) `pip wheel` makes a pure-Python
#   py3-none-any wheel, which installs on any Python 3. It is built here with the repo venv's setuptools and torch
#   (--no-build-isolation); its build record (accelerator cpu, no installed ops) is read only for prebuilt ops.
#   Its own needs missing from the image: hjson, pydantic (+ pydantic-core, annotated-types, typing-inspection,
#   typing-extensions >= 4.16).
# - mosaicml-streaming 0.13.0, and what `import streaming` needs at import time that the image lacks: brotli,
#   python-snappy (+ cramjam), zstd, catalogue. Its cloud clients (boto3, oci, azure, google) load only for remote
#   URLs: not carried. zstd 1.5.7.2 (the version here) has no cp312 wheel; 1.5.6.1 has one and satisfies
#   streaming's zstd>=1.5.2.5 (so do 1.5.6.2 and 1.5.7.3, but PyPI has yanked both).
# - transformers 4.57.6 + huggingface-hub 0.36.2 + tokenizers 0.22.2, Tessera's pins, over the image's 5.x:
#   Tessera requires transformers<5 (pyproject; mosaicml-streaming 0.13 too), its HF twins and parity checks are
#   tested against 4.57.6, and the CPU numbers in docs/benchmarks.md were taken with it. transformers 4.57.6
#   refuses tokenizers 0.23.2 (it wants <=0.23.0), hence tokenizers too.
# - timm 1.0.31, the pin the MaxViT twin (models/maxvit_timm.py) is tested against; the image's timm is unpinned.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
[ -x "$PY" ] || { echo "[gpu_wheels] no .venv: run bash scripts/setup.sh first"; exit 1; }
pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" requirements/constraints.txt; }  # Tessera's pinned version
have() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }  # the version tested here

DEST=.whl
rm -rf "$DEST" && mkdir -p "$DEST"
wheels=(
  "mosaicml-streaming==$(pin mosaicml-streaming)"
  "transformers==$(pin transformers)"
  "huggingface-hub==$(pin huggingface-hub)"
  "tokenizers==$(pin tokenizers)"
  "timm==$(pin timm)"
  "hjson==$(have hjson)"
  "pydantic==$(have pydantic)"
  "pydantic-core==$(have pydantic-core)"
  "annotated-types==$(have annotated-types)"
  "typing-inspection==$(have typing-inspection)"
  "typing-extensions==$(have typing-extensions)"
  "brotli==$(have brotli)"
  "python-snappy==$(have python-snappy)"
  "cramjam==$(have cramjam)"
  "catalogue==$(have catalogue)"
  "zstd==1.5.6.1"
)
echo "[gpu_wheels] downloading ${#wheels[@]} wheels for CPython 3.12, manylinux x86-64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${wheels[@]}"

ds="deepspeed==$(pin deepspeed)"
echo "[gpu_wheels] building $ds (sdist only on PyPI) into a py3-none-any wheel, no ops compiled"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$ds"

# A pure-Python DeepSpeed wheel, one file per distribution (two versions of one stop the whole install there).
ls "$DEST"/deepspeed-*-py3-none-any.whl >/dev/null
if "$PY" -m zipfile -l "$DEST"/deepspeed-*.whl | grep -q '\.so '; then
  echo "[gpu_wheels] the deepspeed wheel holds compiled ops: it would not load on Python 3.12"; exit 1
fi
dupes=$(ls "$DEST" | sed 's/-[0-9].*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "[gpu_wheels] more than one wheel of: $dupes"; exit 1; }

ls -l "$DEST"
total=$(du -cb "$DEST"/* | tail -1 | cut -f1)
echo "[gpu_wheels] $(ls "$DEST" | wc -l) wheels, $((total / 1024 / 1024)) MiB ($total bytes) in $DEST/"
[ "$total" -lt $((50 * 1024 * 1024)) ] || { echo "[gpu_wheels] over 50 MiB: the device call carries 64 MiB in all"; exit 1; }
