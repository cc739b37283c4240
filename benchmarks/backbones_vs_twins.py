"""Forward+backward throughput of each backbone family at its paper base size: Tessera vs its twin holding the
same weights (transformers' class for the families with one; timm's MaxViT, the reference implementation, for
MaxViT which has none in transformers).

One step = forward to logits (1000 classes) + cross-entropy + backward, same batch for both. Models are timed
alternately (Tessera, twin; then twin, Tessera; ...) after warmup, and the median over rounds is reported. Before timing
we check on the CPU that both give the same float64 logits, so both do the same work; then both move to `--device`
and train in `--precision` (bf16: torch.autocast for both). Results and analysis: docs/benchmarks.md;
benchmarks/gpu_check.py calls `bench` per family.

    .venv/bin/python benchmarks/backbones_vs_twins.py                       # every family
    .venv/bin/python benchmarks/backbones_vs_twins.py --family swin convnext --batch 8 --rounds 5
    python benchmarks/backbones_vs_twins.py --device cuda --precision bf16 --batch 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import create_model  # noqa: E402
from models.hf import adapter_for_model  # noqa: E402
from ops.compat import import_transformers  # noqa: E402

# family -> the paper's base size in Tessera's registry
BASE = {
    "vit": "vit_base_patch16",
    "swin": "swin_base_patch4_window7_224",
    "swinv2": "swinv2_base_window8_256",
    "convnext": "convnext_base",
    "convnextv2": "convnextv2_base",
    "pvt_v2": "pvt_v2_b2",
    "poolformer": "poolformer_m36",
    "maxvit": "maxvit_base_224",
}
# family -> its CI-sized member (`--size test`: a quick run of the same code, e.g. benchmarks/gpu_check.py --smoke)
TEST = {
    "vit": "vit_test_patch4",
    "swin": "swin_test",
    "swinv2": "swinv2_test",
    "convnext": "convnext_test",
    "convnextv2": "convnextv2_test",
    "pvt_v2": "pvt_v2_test",
    "poolformer": "poolformer_test",
    "maxvit": "maxvit_test",
}


def hf_twin(model: torch.nn.Module):
    """(name, twin module, logits fn) for a family with a transformers class."""
    hf = adapter_for_model(model).to_hf(model)
    return f"hf_{type(hf).__name__}", hf, lambda x: hf(pixel_values=x).logits


def timm_maxvit_twin(model: torch.nn.Module):
    from models.maxvit_timm import to_timm  # the reference MaxViT is timm's (test-only dependency)

    twin = to_timm(model)
    return f"timm_{type(twin).__name__}", twin, twin


def twin_of(family: str, model: torch.nn.Module):
    return timm_maxvit_twin(model) if family == "maxvit" else hf_twin(model)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", nargs="*", default=list(BASE), choices=list(BASE))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: torch.autocast for both"
    )
    p.add_argument(
        "--size", choices=("base", "test"), default="base", help="paper base size, or the CI-sized one"
    )
    return p.parse_args(argv)


def step(fn, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], bf16: bool = False) -> float:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(fn(x), y)
    loss.backward()
    for p in params:
        p.grad = None
    return loss.item()


def bench(family: str, args: argparse.Namespace) -> dict:
    model_name = (TEST if args.size == "test" else BASE)[family]
    device, bf16 = args.device, args.precision == "bf16"
    torch.manual_seed(0)
    ours = create_model(
        model_name, num_classes=1000
    ).eval()  # eval: no stochastic depth, same math as the twin
    name, twin, twin_fn = twin_of(family, ours)
    twin.eval()
    size = ours.hparams()["img_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    # Same function? Checked in float64 on one image: at random init a deep net's fp32 rounding alone can reach
    # 1e-3 of the logits (MaxViT-B), which would hide nothing but also prove nothing.
    with torch.no_grad():
        ours.double(), twin.double()
        a, b = ours(x[:1].double()), twin_fn(x[:1].double())
        ours.float(), twin.float()
    diff = (a - b).abs().max().item()
    assert diff < 1e-6 * max(1.0, a.abs().max().item()), f"{family}: float64 logits differ by {diff}"
    ours.to(device), twin.to(device)
    x, y = x.to(device), y.to(device)
    runners = [("tessera", ours, list(ours.parameters())), (name, twin_fn, list(twin.parameters()))]
    times: dict[str, list[float]] = {r[0]: [] for r in runners}
    for _, fn, params in runners:
        for _ in range(args.warmup):
            step(fn, x, y, params, bf16)
    for rnd in range(args.rounds):
        for label, fn, params in (
            runners if rnd % 2 == 0 else runners[::-1]
        ):  # ABBA: neither always goes first
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(fn, x, y, params, bf16)  # ends in loss.item(): the device has finished
            times[label].append(time.perf_counter() - t0)
    rate = {k: args.batch * args.steps / statistics.median(v) for k, v in times.items()}
    n_params = sum(p.numel() for p in ours.parameters()) / 1e6
    row = dict(family=family, model=model_name, twin=name, params_m=n_params, size=size, max_logit_diff=diff)
    row.update(ours=rate["tessera"], theirs=rate[name], ratio=rate["tessera"] / rate[name])
    print(
        f"{family:11s} {model_name:30s} {n_params:6.1f}M {size}px  tessera {row['ours']:6.2f} img/s  "
        f"{name} {row['theirs']:6.2f} img/s  ratio {row['ratio']:.2f}  (float64 logits max diff {diff:.1e})",
        flush=True,
    )
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tf = import_transformers()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} cores"
    print(
        f"torch {torch.__version__}, transformers {tf.__version__}, {args.device} ({where}), threads "
        f"{torch.get_num_threads()}, batch {args.batch}, {args.precision}, forward+backward, "
        f"median of {args.rounds} rounds"
    )
    rows = [bench(f, args) for f in args.family]
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min, at the end)")
    print("| family | model | twin | params | input | Tessera img/s | twin img/s | Tessera / twin |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['model']} | {r['twin']} | {r['params_m']:.1f}M | {r['size']} | "
            f"{r['ours']:.2f} | {r['theirs']:.2f} | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
