"""Long-context training throughput and peak memory of Tessera's decoder: softmax attention vs linear attention.

One step = forward + next-token cross-entropy + backward + AdamW step (fused), batch 1, on one row of
`--contexts` tokens, for a small decoder (default dim 256, 4 layers, 4 heads, vocab 8192) with every layer
softmax attention or every layer one linear mode (none, retention, gla; models/llama.py `linear_attn`, same
width). Activation checkpointing is on from `--ckpt-from` tokens (16k) up. Variants:

    softmax_1doc   one document fills the row (no doc_ids): the plain causal case
    softmax        the row packs several documents and is document-masked (doc_ids, positions restart)
    none, retention, gla   the same packed row through linear attention, the state reset at each document

The packed row holds documents whose lengths are drawn log-uniformly in [N/32, N/2] (seeded; the last one cut
to fill the row): a handful of long documents per row (8 with the default seed, Σ sᵢ² / N ≈ 0.16 N), about
what long-context data mixes look like. Token ids are random (speed does not depend on them).

Every setting runs in a fresh child process, so its peak memory is that process's RSS high-water mark
(resource.getrusage ru_maxrss, read at the end) with nothing left over from the other settings; the RSS
high-water right after the model and optimizer are built is reported too (`base`), and `peak - base` is what
the step itself added (activations, gradients, AdamW state). Steps per setting: `--warmup` untimed, then timed
steps until `--budget` seconds have passed (at least 1, at most `--steps`); when the first step already takes
longer than `--cold-after` seconds, no warmup is run and that one (cold) step is the measurement (flagged
`cold`; one-time costs are then a small part of it). tokens/s is from the fastest timed step: on a shared
machine, other processes only ever add time.

MFU: model FLOPs from pretrain.mfu.text_flops (6N + 12·L·d·s per token for softmax layers, with s = the keys
a token sees: the row for softmax_1doc, Σ sᵢ² / N for a packed row; the chunked linear-attention work for
linear layers; checkpoint recompute not counted) over the CPU fp32 matmul rate of
pretrain.mfu.measure_matmul_tflops, probed in every setting's own process just before and after its steps: MFU
is against the mean of those two, i.e. the share of the cores the setting actually had. On a quiet machine that is
the cores' rate; on a shared one (other processes taking CPU time) the probes drop along with the step, so this
MFU stays comparable across settings where raw tokens/s does not. The table shows both probes; the JSON also
holds the probes at start and end.

    .venv/bin/python benchmarks/text_context.py --json out/text_context.json
    .venv/bin/python benchmarks/text_context.py --contexts 256 512 --dim 64 --depth 2 --vocab 512   # smoke

Results and analysis: docs/benchmarks.md, "Long-context text (decoder, CPU)".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models.llama import LlamaDecoder  # noqa: E402
from pretrain.mfu import measure_matmul_tflops, text_flops  # noqa: E402

VARIANTS = ("softmax_1doc", "softmax", "none", "retention", "gla")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument(
        "--ckpt-from", type=int, default=16384, help="activation checkpointing from this length on"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (none when a step is slow)")
    p.add_argument("--steps", type=int, default=5, help="most timed steps per setting")
    p.add_argument(
        "--budget", type=float, default=15.0, help="seconds of timed steps per setting (>= 1 step)"
    )
    p.add_argument(
        "--cold-after",
        type=float,
        default=30.0,
        help="a first step slower than this is the measurement itself (no warmup at that size)",
    )
    p.add_argument(
        "--timeout", type=float, default=400.0, help="seconds before a setting's process is killed"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (and the table next to it, .md)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one setting, as JSON: internal
    return p.parse_args(argv)


def doc_lengths(n: int, seed: int) -> list[int]:
    """Document lengths filling a row of n tokens: log-uniform in [n/32, n/2], the last one cut to fit."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, n // 32), max(1, n // 2)
    out: list[int] = []
    while sum(out) < n:
        u = torch.rand((), generator=g).item()
        out.append(min(round(lo * (hi / lo) ** u), n - sum(out)))
    return out


def make_row(n: int, vocab: int, variant: str, seed: int) -> dict:
    """(1, n) input_ids plus, for a packed row, positions and doc_ids; and the keys a token sees on average."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, n), generator=g)
    if variant == "softmax_1doc":
        return {"input_ids": ids, "positions": None, "doc_ids": None, "lengths": [n], "keys": float(n)}
    lengths = doc_lengths(n, seed)
    positions = torch.cat([torch.arange(s) for s in lengths])[None]
    doc_ids = torch.cat([torch.full((s,), i) for i, s in enumerate(lengths)])[None]
    keys = sum(s * s for s in lengths) / n  # Σ sᵢ² / N: keys a token sees, averaged over the row
    return {"input_ids": ids, "positions": positions, "doc_ids": doc_ids, "lengths": lengths, "keys": keys}


def build_model(spec: dict) -> LlamaDecoder:
    torch.manual_seed(spec["seed"])
    linear = None if spec["variant"].startswith("softmax") else spec["variant"]
    model = LlamaDecoder(
        vocab_size=spec["vocab"],
        dim=spec["dim"],
        depth=spec["depth"],
        num_heads=spec["heads"],
        max_seq_len=max(spec["n"], 1),
        linear_attn=linear,
    )
    model.set_grad_checkpointing(spec["n"] >= spec["ckpt_from"])
    return model.train()


def targets_of(row: dict) -> torch.Tensor:
    """Next-token targets within each document (pretrain.objectives.clm's rule): -100 across boundaries."""
    ids, doc = row["input_ids"], row["doc_ids"]
    t = torch.full_like(ids, -100)
    same = torch.ones_like(ids[:, 1:], dtype=torch.bool) if doc is None else doc[:, 1:] == doc[:, :-1]
    t[:, :-1] = torch.where(same, ids[:, 1:], -100)
    return t


def maxrss_mib() -> float:
    """This process's RSS high-water mark so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_setting(spec: dict) -> dict:
    """One setting, in this (fresh) process: build, step, time; the result row."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    row = make_row(spec["n"], spec["vocab"], spec["variant"], spec["seed"])
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    targets = targets_of(row)
    base = maxrss_mib()
    rate_before = measure_matmul_tflops(torch.float32, "cpu", seconds=0.5)  # the CPU share we get right now

    def step() -> float:
        t0 = time.perf_counter()
        logits = model(row["input_ids"], row["positions"], row["doc_ids"])  # (1, N, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - t0

    first = step()  # the first warmup step, or the measurement itself when it is slow (or warmup is 0)
    cold = spec["warmup"] > 0 and first >= spec["cold_after"]
    times = [first] if cold or spec["warmup"] == 0 else []
    if not cold:
        for _ in range(spec["warmup"] - 1):
            step()
        t_start = time.perf_counter()
        while len(times) < spec["steps"] and (not times or time.perf_counter() - t_start < spec["budget"]):
            times.append(step())
    step_s = min(times)
    peak_rss = maxrss_mib()  # read before the matmul probe below
    rate_after = measure_matmul_tflops(torch.float32, "cpu", seconds=0.5)
    flops = text_flops(model, spec["n"]).per_token(row["keys"]) * spec["n"]  # model FLOPs of one step
    return {
        "variant": spec["variant"],
        "n": spec["n"],
        "docs": len(row["lengths"]),
        "keys_per_token": row["keys"],
        "checkpointing": model.grad_checkpointing,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": step_s,
        "step_times": times,
        "cold": cold,
        "tokens_per_s": spec["n"] / step_s,
        "flops_per_step": flops,
        "tflops": flops / step_s / 1e12,
        "base_rss_mib": base,
        "peak_rss_mib": peak_rss,
        "matmul_tflops": [rate_before, rate_after],
        "threads": torch.get_num_threads(),
    }


def spawn(spec: dict, timeout: float) -> dict:
    """run_setting(spec) in a fresh interpreter; a failed or killed child gives a row saying so."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    base = {"variant": spec["variant"], "n": spec["n"]}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {**base, "error": f"exit {proc.returncode}{killed}: {tail[:200]}"}
    return json.loads(lines[-1])


def fmt_row(r: dict) -> str:
    name = {"softmax_1doc": "softmax, 1 document"}.get(r["variant"], r["variant"])
    if "error" in r:
        return f"| {r['n']} | {name} | — | — | — | — | — | — | — | {r['error']} |"
    mfu = f"{100 * r['tflops'] / statistics.mean(r['matmul_tflops']):.1f}%"
    steps = f"{len(r['step_times'])}" + (" (cold)" if r["cold"] else "")
    probe = "/".join(f"{1e3 * v:.0f}" for v in r["matmul_tflops"])
    return (
        f"| {r['n']} | {name} | {r['docs']} | {r['keys_per_token']:.0f} | {r['tokens_per_s']:.0f} | "
        f"{r['step_s']:.2f} | {mfu} | {r['peak_rss_mib']:.0f} (+{r['peak_rss_mib'] - r['base_rss_mib']:.0f}) | "
        f"{probe} | {steps}{', ckpt' if r['checkpointing'] else ''} |"
    )


def table(rows: list[dict]) -> str:
    head = [
        "| tokens/row | attention | docs | keys/token | tokens/s | s/step | MFU | peak RSS MiB (+step) "
        "| matmul GFLOP/s before/after | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [fmt_row(r) for r in rows])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_setting(json.loads(args.child))), flush=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rate0 = measure_matmul_tflops(torch.float32, "cpu", seconds=1.0)
    print(
        f"torch {torch.__version__}, cpu ({os.cpu_count()} cores), threads {torch.get_num_threads()}; "
        f"fp32 matmul rate {rate0 * 1e3:.0f} GFLOP/s at start; decoder dim {args.dim}, {args.depth} layers, "
        f"{args.heads} heads, vocab {args.vocab}, batch 1, fused AdamW",
        flush=True,
    )
    keys = ("dim", "depth", "heads", "vocab", "warmup", "steps", "budget", "cold_after", "ckpt_from", "seed")
    common = {k: getattr(args, k) for k in keys}
    common["threads"] = args.threads
    rows: list[dict] = []
    t_all = time.perf_counter()
    for n in args.contexts:
        for variant in args.variants:
            load = os.getloadavg()[0]
            r = spawn({**common, "n": n, "variant": variant}, args.timeout)
            r["load_before"] = load
            rows.append(r)
            print(fmt_row(r), flush=True)
    rate1 = measure_matmul_tflops(torch.float32, "cpu", seconds=1.0)
    wall = time.perf_counter() - t_all
    load = os.getloadavg()[0]
    print(
        f"\nfp32 matmul rate {rate0 * 1e3:.0f} GFLOP/s at start, {rate1 * 1e3:.0f} at the end; wall {wall:.0f} s; "
        f"load average {load:.2f} (1 min, at the end)\n"
    )
    md = table(rows)
    print(md)
    if args.json:
        res = {
            "command": "benchmarks/text_context.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "matmul_tflops_start": rate0,
            "matmul_tflops_end": rate1,
            "load_average_end": load,
            "wall_s": wall,
            "args": {k: v for k, v in vars(args).items() if k != "child"},
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        Path(args.json).with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
