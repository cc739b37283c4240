"""FLIP patch dropout: train-step throughput of a CLIP objective with `objective.patch_dropout` p vs p = 0, side by
side in one process (steps alternate A B A B ..., so load on the machine hits both alike).

    python benchmarks/patch_dropout.py [--config configs/clip_emoji.yaml] [--rates 0.25 0.5 0.75] [--steps 20]

Builds the config's model and objective (its micro-batch, image size and caption length; random pixels and token
ids: throughput does not depend on them), one process, TorchEngine. Prints samples/s per rate and the speed-up
over p = 0. The retrieval cost of the same switch needs two trainings: docs/contrastive.md has both runs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.build import build_model, example_batch, load_config, model_kwargs  # noqa: E402
from pretrain.dist import DistContext  # noqa: E402
from pretrain.engine.ddp import TorchEngine  # noqa: E402


def engines(config: str, rates: list[float], overrides: list[str]):
    """One engine per rate over the same initial weights."""
    out = {}
    for p in [0.0, *rates]:
        cfg = load_config(config, [*overrides, f"objective.patch_dropout={p}"])
        model = build_model(cfg)
        out[p] = (TorchEngine(model, cfg, DistContext()), cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/clip_emoji.yaml")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per rate (after 2 warm-up steps)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    runs = engines(args.config, args.rates, args.set)
    cfg0 = runs[0.0][1]
    batch = example_batch(cfg0, cfg0.train.micro_batch_size)
    batch["input_ids"][:, -1] = model_kwargs(cfg0)["eos_token_id"]  # CLIP pools at the end-of-text token
    times: dict[float, list[float]] = {p: [] for p in runs}
    for i in range(args.steps + 2):
        for p, (engine, _) in runs.items():
            t0 = time.perf_counter()
            engine.train_step([copy.copy(batch)], lr=1e-4)
            if i >= 2:
                times[p].append(time.perf_counter() - t0)
    n = cfg0.train.micro_batch_size
    base = statistics.median(times[0.0])
    print(
        f"{args.config}: micro-batch {n}, image {cfg0.data.image_size} px, caption {cfg0.data.text_len} tokens, "
        f"{torch.get_num_threads()} threads, {args.steps} timed steps per rate (median)"
    )
    print("| patch_dropout | image tokens kept | samples/s | speed-up |")
    print("|---|---|---|---|")
    patches = runs[0.0][0].module.backbone.visual.num_patches
    for p, t in times.items():
        med = statistics.median(t)
        kept = max(1, round((1 - p) * patches))
        print(f"| {p:g} | {kept} of {patches} | {n / med:.1f} | {base / med:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
