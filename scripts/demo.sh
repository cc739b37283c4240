#!/usr/bin/env bash
# The demo, in one command: set up, pretrain MAE on real Fashion-MNIST images with 2 ranks through
# `accelerate launch` on CPU, export to Hugging Face format, probe the pretrained encoder against a random-init
# encoder of the same shape and raw pixels, then fine-tune it vs from scratch.   Extra arguments go to the
# pretraining run, e.g.
#   bash scripts/demo.sh --set train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" TOKENIZERS_PARALLELISM=false
CONFIG=configs/mae_vit_demo_fmnist.yaml RUN=runs/demo OUT=out/demo_hf
EXTRA=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[demo] Fashion-MNIST is not installed: training on sklearn digits instead"
  EXTRA=(--set data.dataset=digits --set data.image_size=16 --set data.hflip=false --set train.micro_batch_size=64)
fi
rm -rf "$RUN" "$OUT"   # a fresh demo each time (a relaunch of the same command would resume instead)

# pretrain (accelerate launch, 2 ranks), export to HF, probe (linear + kNN: pretrained vs random init vs raw pixels),
# then fine-tune with labels from the pretrained weights and from scratch at the same budget (pretrain/recipe.py)
python -m pretrain.recipe "$CONFIG" --export "$OUT" "${EXTRA[@]}" "$@" --set run.output_dir="$RUN"   # last --set wins
echo "[demo] metrics: $RUN/metrics.jsonl  reconstructions: $RUN/images/  HF model: $OUT  (tensorboard --logdir $RUN/tensorboard)"
