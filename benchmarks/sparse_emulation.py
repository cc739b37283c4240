"""Cost of the dense emulation of sparse convolution (models/sparse.py, SparK / FCMAE's encoder) against a plain
dense forward + backward of the same backbone.

One step = forward + backward of the encoder alone (no decoder, no optimizer): `sparse_forward(net, x, active)`
vs `net.forward_intermediates(x)`, the loss the sum of every stage's mean, the same images and weights, train
mode. The emulation adds element-wise re-masks after every layer (and, for PoolFormer, masked statistics); it
saves no FLOPs, since masked positions are computed and then zeroed. The two are timed alternately (dense,
sparse, dense, ...) after warmup steps; we report each one's median over rounds, and the median over rounds of
the ratio within a round (robust to other load that comes and goes on a shared machine).

    .venv/bin/python benchmarks/sparse_emulation.py --model convnext_tiny --batch 8 --rounds 5
(`--device cuda --precision bf16` on a GPU; `--model convnextv2_tiny` adds GRN, `poolformer_s12` the masked
GroupNorm and pooling.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import create_model  # noqa: E402
from models.masking import random_cell_masks  # noqa: E402
from models.sparse import final_reduction, sparse_forward  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="convnext_tiny", help="registry name (ConvNeXt, ConvNeXt V2, PoolFormer)"
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU); default: torch's")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    """{"ms": {variant: median ms per step}, "times": {variant: [s per round]}, "ratio": the median over rounds
    of sparse / dense in the same round}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = create_model(args.model, img_size=args.size).to(args.device).train()
    cell = final_reduction(net)
    n = args.size // cell
    x = torch.randn(args.batch, net.in_chans, args.size, args.size, device=args.device)
    masked = random_cell_masks(
        0, torch.zeros(args.batch, dtype=torch.long), torch.arange(args.batch), (n, n), args.mask_ratio
    )
    active = (~masked).to(args.device)  # (B, n, n) True = visible

    def loss_of(maps: list[torch.Tensor]) -> torch.Tensor:
        return sum(m.float().mean() for m in maps)

    variants = {
        "dense": lambda: loss_of(net.forward_intermediates(x)),
        "sparse": lambda: loss_of(sparse_forward(net, x, active)),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}

    def step(fn) -> None:
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = fn()
        loss.backward()
        net.zero_grad(set_to_none=True)

    for fn in variants.values():
        for _ in range(args.warmup):
            step(fn)
    sync(args.device)
    for rnd in range(args.rounds):  # alternate, so drift (other load, heat) hits both alike
        for name, fn in variants.items():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(fn)
            sync(args.device)
            times[name].append((time.perf_counter() - t0) / args.steps)
        print(
            f"round {rnd + 1}/{args.rounds}: "
            + "  ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items())
        )
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    # each round's own ratio, then their median: robust to load that comes and goes between rounds
    paired = statistics.median(s / d for s, d in zip(times["sparse"], times["dense"]))
    return {"ms": ms, "times": times, "ratio": paired, "cells": (n, n), "cell": cell}


def main(argv=None) -> None:
    args = parse_args(argv)
    res = run(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} cores"
    print(
        f"\ntorch {torch.__version__}, device {args.device} ({device}), threads {torch.get_num_threads()}, "
        f"precision {args.precision}, load average {os.getloadavg()[0]:.2f} (1 min, at the end)"
    )
    print(
        f"command: .venv/bin/python benchmarks/sparse_emulation.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
    )
    n, cell = res["cells"][0], res["cell"]
    print(
        "| model | image | batch | mask | dense fwd+bwd (ms) | sparse emulation fwd+bwd (ms) | sparse / dense (per round) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.model} | {args.size} px | {args.batch} | {args.mask_ratio} of {n}x{n} cells of {cell} px | "
        f"{res['ms']['dense']:.0f} | {res['ms']['sparse']:.0f} | {res['ratio']:.2f} |"
    )


if __name__ == "__main__":
    main()
