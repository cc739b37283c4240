"""Forward+backward throughput of each backbone family at its paper base size: Tessera vs its twin holding the
same weights (transformers' class for the families with one; timm's reference implementation for MaxViT, DaViT,
CrossViT and TinyViT, which transformers lacks). CSWin, HorNet and NAT/DiNAT have no twin that runs here (none
exists for the first two; transformers' Nat/Dinat need the natten kernels, which have no wheel for this torch):
their rows time Tessera alone. Every row also gives the model FLOPs utilization (counted FLOPs of the step / time /
the measured fp32 matmul rate, as pretrain.mfu does), which compares families with each other and with the peak.

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
import importlib
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
from pretrain.mfu import count_flops, device_peak_tflops  # noqa: E402

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
    "cvt": "cvt_21",
    "davit": "davit_base",
    "crossvit": "crossvit_base_240",
    "tiny_vit": "tiny_vit_21m_224",
    "cswin": "cswin_base_224",
    "hornet": "hornet_base_7x7",
    "nat": "nat_base",
    "dinat": "dinat_base",
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
    "cvt": "cvt_test",
    "davit": "davit_test",
    "crossvit": "crossvit_test",
    "tiny_vit": "tiny_vit_test",
    "cswin": "cswin_test",
    "hornet": "hornet_test",
    "nat": "nat_test",
    "dinat": "dinat_test",
}
NO_TWIN = {"cswin", "hornet", "nat", "dinat"}  # timed alone (see the module docstring)
TIMM_TWIN = {"maxvit", "davit", "crossvit", "tiny_vit"}  # models/<family>_timm.py: to_timm


def hf_twin(model: torch.nn.Module):
    """(name, twin module, logits fn) for a family with a transformers class."""
    hf = adapter_for_model(model).to_hf(model)
    return f"hf_{type(hf).__name__}", hf, lambda x: hf(pixel_values=x).logits


def timm_twin(family: str, model: torch.nn.Module):
    """(name, twin, logits fn) for a family whose reference is timm's (a test-only dependency)."""
    to_timm = importlib.import_module(f"models.{family}_timm").to_timm
    twin = to_timm(model)
    return f"timm_{type(twin).__name__}", twin, twin


def cvt_twin(model: torch.nn.Module):
    from models.cvt_hf import cvt_to_hf

    hf = cvt_to_hf(model)
    return f"hf_{type(hf).__name__}", hf, lambda x: hf(pixel_values=x).logits


def twin_of(family: str, model: torch.nn.Module):
    if family in TIMM_TWIN:
        return timm_twin(family, model)
    return cvt_twin(model) if family == "cvt" else hf_twin(model)


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


def bench(family: str, args: argparse.Namespace, peak_tflops: float | None = None) -> dict:
    """One family's row: Tessera's img/s, its twin's (None without one), their ratio, MFU against `peak_tflops`
    (TFLOP/s of the device; None: not computed)."""
    model_name = (TEST if args.size == "test" else BASE)[family]
    device, bf16 = args.device, args.precision == "bf16"
    torch.manual_seed(0)
    ours = create_model(
        model_name, num_classes=1000
    ).eval()  # eval: no stochastic depth, same math as the twin
    size = ours.hparams()["img_size"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (args.batch,), generator=g)
    runners = [("tessera", ours, list(ours.parameters()))]
    name, diff = "none", None
    if family not in NO_TWIN:
        name, twin, twin_fn = twin_of(family, ours)
        twin.eval()
        # Same function? Checked in float64 on one image: at random init a deep net's fp32 rounding alone can
        # reach 1e-3 of the logits (MaxViT-B), which would hide nothing but also prove nothing.
        with torch.no_grad():
            ours.double(), twin.double()
            a, b = ours(x[:1].double()), twin_fn(x[:1].double())
            ours.float(), twin.float()
        diff = (a - b).abs().max().item()
        assert diff < 1e-6 * max(1.0, a.abs().max().item()), f"{family}: float64 logits differ by {diff}"
        if (
            family == "tiny_vit"
        ):  # timm's TinyViT caches its attention bias in eval mode, with the graph of the
            (
                ours.train(),
                twin.train(),
            )  # first step: a second backward fails. Train mode, drop path 0, on both.
        twin.to(device)
        runners.append((name, twin_fn, list(twin.parameters())))
    flops = None
    if peak_tflops:  # model FLOPs of one step, counted on one image on the CPU (the same on any device)
        flops = args.batch * count_flops(lambda: step(ours, x[:1], y[:1], runners[0][2]))
    ours.to(device)
    x, y = x.to(device), y.to(device)
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
    ratio = rate["tessera"] / rate[name] if name in rate else None
    row.update(ours=rate["tessera"], theirs=rate.get(name), ratio=ratio)
    row["gflop_per_img"] = None if flops is None else flops / args.batch / 1e9
    row["mfu"] = None if flops is None else flops * rate["tessera"] / args.batch / (peak_tflops * 1e12)
    print(
        f"{family:11s} {model_name:30s} {n_params:6.1f}M {size}px  tessera {row['ours']:6.2f} img/s", end=""
    )
    if row["ratio"] is not None:
        print(
            f"  {name} {row['theirs']:6.2f} img/s  ratio {row['ratio']:.2f}  (float64 logits max diff {diff:.1e})",
            end="",
        )
    print("" if row["mfu"] is None else f"  MFU {row['mfu']:.1%}", flush=True)
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
    peak, source = device_peak_tflops(torch.device(args.device), args.precision)
    print(f"peak {peak:.3f} TFLOP/s ({source})")
    rows = [bench(f, args, peak) for f in args.family]
    print(f"\nload average {os.getloadavg()[0]:.2f} (1 min, at the end)")
    print(
        "| family | model | twin | params | input | GFLOP/img (fwd+bwd) | Tessera img/s | MFU | twin img/s | Tessera / twin |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        twin = "- | -" if r["ratio"] is None else f"{r['theirs']:.2f} | {r['ratio']:.2f}"
        print(
            f"| {r['family']} | {r['model']} | {r['twin']} | {r['params_m']:.1f}M | {r['size']} | "
            f"{r['gflop_per_img']:.2f} | {r['ours']:.2f} | {r['mfu']:.1%} | {twin} |"
        )


if __name__ == "__main__":
    main()
