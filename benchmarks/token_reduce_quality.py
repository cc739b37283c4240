"""What ToMe merging and EViT pruning cost in quality, next to what they save in time, in one run on Fashion-MNIST.

    python benchmarks/token_reduce_quality.py [--out runs/token_reduce_quality] [--tome 16 24] [--evit 0.7 0.5]
        [--pretrain-steps 600] [--finetune-steps 300] [--batch 64] [--probe-samples 5000]

The model is the README demo's ViT (4 blocks, 128 wide) on 2x2 patches of the 28x28 images: 196 patch tokens, as
ViT-B/16 at 224 px. The stages:
1. MAE pretraining once, without reduction (MAE's encoder already sees 49 of the 196 patches; merging is for the
   stages that see them all), python -m pretrain.train configs/mae_vit_demo_fmnist.yaml;
2. for each setting (plain, tome_r=..., evit_keep_rate=...), the same pretrained weights:
   - linear probe and kNN of the frozen encoder run with that setting (pretrain.probe's features and scores);
   - fine-tuning with labels (configs/finetune_fmnist.yaml, model.init_from the MAE run) with that setting at the
     same budget, scored on the whole test split;
3. train-step throughput of the fine-tune model at each setting, side by side in this process (steps alternate
   between settings, so load on the machine hits all alike).
Prints one table with the differences to the plain model and writes OUT/token_reduce_quality.json. One seed: the
differences include run-to-run noise (rerun with --seed to see its size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from token_reduce import side_by_side  # noqa: E402  (benchmarks/, this script's folder)

from pretrain.recipe import classifier_accuracy, finetune_overrides  # noqa: E402

MAE = "configs/mae_vit_demo_fmnist.yaml"
FINETUNE = "configs/finetune_fmnist.yaml"
ARCH = {"pos_embed": "sincos", "patch_size": 2}  # on vit_mini_patch4: 196 patches of a 28x28 image


def _train(config: str, sets: list[str]) -> None:
    cmd = [sys.executable, "-m", "pretrain.train", config, *[a for s in sets for a in ("--set", s)]]
    print("[quality] $ " + " ".join(cmd), flush=True)
    if subprocess.call(cmd) != 0:
        raise SystemExit(f"[quality] stage failed: {' '.join(cmd)}")


def _with(encoder, setting: dict):
    """The same weights in a model with `setting` (tome_r / evit_keep_rate) switched on."""
    model = type(encoder)(**{**encoder.hparams(), **setting})
    model.load_state_dict(encoder.state_dict())
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/token_reduce_quality")
    ap.add_argument("--tome", type=int, nargs="*", default=[16, 24], help="tome_r values")
    ap.add_argument("--evit", type=float, nargs="*", default=[0.7, 0.5], help="evit_keep_rate values")
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument(
        "--batch", type=int, default=64, help="fine-tune micro-batch (and the timed steps' batch)"
    )
    ap.add_argument("--probe-samples", type=int, default=5000, help="train and test images of the probe")
    ap.add_argument("--timed-steps", type=int, default=8, help="timed train steps per setting")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from pretrain.build import load_config
    from pretrain.probe import features, load_encoder, load_eval_images, random_like, score

    out = Path(args.out)
    settings = {"plain": {}}
    settings |= {f"tome_r={r}": {"tome_r": r} for r in args.tome}
    settings |= {f"evit_keep_rate={k:g}": {"evit_keep_rate": k} for k in args.evit}
    arch = json.dumps(ARCH)

    # 1. MAE pretraining, plain (a finished run resumes at its end: a rerun reuses it)
    mae_run = out / "mae"
    t0 = time.time()
    _train(
        MAE,
        [f"model.kwargs={arch}", f"train.max_steps={args.pretrain_steps}", f"run.output_dir={mae_run}"]
        + [f"optim.warmup_steps={args.pretrain_steps // 20}"]
        + [f"seed={args.seed}", "eval.interval=0", "run.image_interval=0"],
    )
    results: dict = {"pretrain_seconds": round(time.time() - t0, 1), "settings": {}}
    pre_cfg = load_config(str(mae_run / "config.yaml"))

    # 2. probe and fine-tune per setting
    encoder, meta = load_encoder(mae_run)
    n = args.probe_samples
    tr_x, tr_y, te_x, te_y = load_eval_images(meta.get("data", {}), None, encoder.hparams()["img_size"], n, n)
    for label, feats in (("random_init", random_like(encoder)), ("raw_pixels", None)):
        f = (lambda x: x.flatten(1)) if feats is None else (lambda x, m=feats: features(m, x))
        results[label] = score(f(tr_x), tr_y, f(te_x), te_y)
    for name, kw in settings.items():
        model = _with(encoder, kw)
        probe = score(features(model, tr_x), tr_y, features(model, te_x), te_y)
        ft = out / f"finetune_{name.replace('=', '')}"
        sets = finetune_overrides(pre_cfg, ft, mae_run)
        sets = [s for s in sets if not s.startswith("model.kwargs=")]
        sets += [f"model.kwargs={json.dumps({**ARCH, **kw})}", f"seed={args.seed}"]
        sets += [f"train.max_steps={args.finetune_steps}", f"optim.warmup_steps={args.finetune_steps // 10}"]
        sets += [f"train.micro_batch_size={args.batch}"]
        t1 = time.time()
        _train(FINETUNE, sets)
        acc, count = classifier_accuracy(ft)
        results["settings"][name] = {
            **probe,
            "finetune_accuracy": acc,
            "finetune_test_images": count,
            "finetune_seconds": round(time.time() - t1, 1),
        }
        print(f"[quality] {name}: {results['settings'][name]}", flush=True)

    # 3. train-step throughput, side by side
    torch.manual_seed(0)
    ref = type(encoder)(**{**encoder.hparams(), "num_classes": 10})
    speed = side_by_side(ref, settings, args.batch, args.timed_steps)
    for name in settings:
        results["settings"][name].update(speed[name])
    results["args"] = vars(args)
    results["threads"] = torch.get_num_threads()
    (out / "token_reduce_quality.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


def table(r: dict) -> str:
    s = r["settings"]
    p = s["plain"]
    rows = [
        f"fine-tune model: ViT 4 blocks x 128, 2x2 patches of 28x28 Fashion-MNIST (196 tokens), batch "
        f"{r['args']['batch']}, fp32, {r['threads']} threads; probe {r['args']['probe_samples']} train / "
        f"{r['args']['probe_samples']} test images; fine-tune {r['args']['finetune_steps']} steps, whole test split",
        "| setting | tokens after the last block | train step img/s | speed-up | linear probe | kNN | fine-tune |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in s.items():
        d = "" if name == "plain" else " ({:+.1f})"
        rows.append(
            f"| {name} | {v['tokens_left']} | {v['img_per_s']:.0f} | {v['speedup']:.2f}x | "
            f"{v['linear_probe']:.4f}{d.format(100 * (v['linear_probe'] - p['linear_probe']))} | "
            f"{v['knn']:.4f}{d.format(100 * (v['knn'] - p['knn']))} | "
            f"{v['finetune_accuracy']:.4f}{d.format(100 * (v['finetune_accuracy'] - p['finetune_accuracy']))} |"
        )
    for label in ("random_init", "raw_pixels"):
        v = r[label]
        rows.append(
            f"| {label.replace('_', ' ')} (baseline) | | | | {v['linear_probe']:.4f} | {v['knn']:.4f} | |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
