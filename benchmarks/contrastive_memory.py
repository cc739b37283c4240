"""Peak memory and samples/s of one CLIP training step vs the global batch: one micro-batch vs GradCache (CPU).

One step = TorchEngine.train_step (single process, fp32, fused AdamW, grad clip 1.0) of the `clip` objective
(pretrain/objectives/contrastive.py, local loss) on a small two-tower (default `clip_test`: a 2-block 32-wide
pre-norm ViT at 32 px, patch 4, and a 2-block 32-wide causal text transformer, 1k vocabulary, 32-token captions),
on random images and captions ([BOS] ids [EOS], padded, lengths random), at each global batch N of `--batches`:

    full     one micro-batch of all N samples: the towers' graph holds N samples' activations
    cached   train.grad_accum_steps = N / --micro: GradCache (pretrain/engine/cached.py) embeds every micro-batch
             without a graph, takes the loss once over all N, then replays each micro-batch with its graph
    chunked  cached, with the loss's rows taken in blocks of --micro (objective.chunk_size: each block's logits
             recomputed in backward), so the loss holds --micro x N logits instead of N x N
    loss     the ClipLoss alone, forward + backward on N random (N, E) features: what the loss itself adds

The claim checked: the cached step's memory is that of one micro-batch of activations plus what grows with N:
the N x E features, their cached gradients, and the loss's logits. With one process the local loss has b = N
rows, so its logits are N x N (two directions, each with its softmax and gradient): quadratic in N, and the
`loss` row measures exactly that part; the full step's activations grow linearly in N on top of it. Across W
ranks each rank's logits are b x N (b = N / W): linear in N.

Every point runs in a fresh child process with MALLOC_MMAP_THRESHOLD_=65536 (large buffers are mmap'd and go
back to the OS when freed, so one step's leftovers never pad the next point's peak). Memory: `base` is the
process's RSS after the model, optimizer and the whole batch are built (the batch's images, 12 KiB a sample, are
in it); `peak` is the RSS high-water mark (resource.getrusage ru_maxrss) at the end; `+step` = peak - base is what
the step adds (activations, features, logits, gradients, AdamW state). samples/s is N over the fastest timed step
(on a shared machine other processes only ever add time); samples per CPU-s is N over the least CPU time
(time.process_time: all of the process's threads) of a timed step, which other processes barely change: with
`--threads 1` it is the work of a step, the figure to compare on a loaded machine. `--warmup` untimed steps,
then timed steps until `--budget` seconds have passed (at least 1, at most `--steps`); a first step slower than
`--cold-after` seconds is itself the measurement (flagged cold).

    .venv/bin/python benchmarks/contrastive_memory.py --json out/contrastive_memory.json
    .venv/bin/python benchmarks/contrastive_memory.py --threads 1 --json out/contrastive_memory_t1.json  # loaded
    .venv/bin/python benchmarks/contrastive_memory.py --batches 32 64 --micro 16 --steps 1   # smoke

Results and analysis: docs/benchmarks.md (issue 11: contrastive memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import create_model  # noqa: E402
from pretrain.config import Config  # noqa: E402
from pretrain.dist import DistContext  # noqa: E402
from pretrain.engine.ddp import TorchEngine  # noqa: E402
from pretrain.objectives.contrastive import Clip, ClipConfig  # noqa: E402
from pretrain.objectives.contrastive_loss import ClipLoss  # noqa: E402

MODES = ("full", "cached", "chunked", "loss")
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed large buffers return to the OS: peaks are real


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--micro", type=int, default=256, help="GradCache micro-batch (N / micro micro-batches)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--model", default="clip_test", help="a registered two-tower model (models/two_tower.py)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1000, help="vocabulary; BOS = vocab - 2, EOS = vocab - 1")
    p.add_argument("--text-len", type=int, default=32, help="tokens per caption (data.text_len)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (none when a step is slow)")
    p.add_argument("--steps", type=int, default=3, help="most timed steps per point")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per point (>= 1 step)")
    p.add_argument("--cold-after", type=float, default=30.0, help="a first step slower than this is measured")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a point's process is killed")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here (and the table next to it, .md)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one point, as JSON: internal
    args = p.parse_args(argv)
    bad = [n for n in args.batches if n % args.micro]
    if bad:
        p.error(f"--batches {bad} are not multiples of --micro {args.micro}")
    return args


def make_batch(n: int, spec: dict) -> dict:
    """An image-text batch as the loader gives it: images (n, 3, S, S), captions [BOS] ids [EOS] right-padded
    with 0 to text_len (lengths uniform in [3, text_len]), attention_mask."""
    g = torch.Generator().manual_seed(spec["seed"] + n)
    size, vocab, length = spec["img_size"], spec["vocab"], spec["text_len"]
    ids = torch.randint(1, vocab - 2, (n, length), generator=g)  # (n, L) ids, never BOS / EOS / pad
    lengths = torch.randint(3, length + 1, (n,), generator=g)  # (n,) real tokens, BOS and EOS included
    pos = torch.arange(length)[None]  # (1, L)
    ids[:, 0] = vocab - 2
    ids = torch.where(pos == (lengths - 1)[:, None], vocab - 1, ids)  # EOS at the last real position
    mask = (pos < lengths[:, None]).long()  # (n, L)
    return {
        "image": torch.randn(n, 3, size, size, generator=g),  # (n, 3, S, S), as if normalized
        "input_ids": ids.masked_fill(mask == 0, 0),
        "attention_mask": mask,
        "index": torch.arange(n),
    }


def split(batch: dict, k: int) -> list[dict]:
    """k equal micro-batches (views: no copy of the images)."""
    return [{key: v.chunk(k)[i] for key, v in batch.items()} for i in range(k)]


def rss_mib() -> float:
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mib() -> float:
    """This process's RSS high-water mark so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(spec: dict):
    """(the clip objective around the two-tower, TorchEngine) in fp32 on the CPU, one process."""
    torch.manual_seed(spec["seed"])
    vocab = spec["vocab"]
    backbone = create_model(
        spec["model"],
        img_size=spec["img_size"],
        vocab_size=vocab,
        context_length=spec["text_len"],
        eos_token_id=vocab - 1,
    )
    chunk = (
        spec["micro"] if spec.get("mode") == "chunked" else 0
    )  # the loss's rows in blocks of one micro-batch
    module = Clip(backbone, ClipConfig(chunk_size=chunk)).train()
    cfg = Config()  # fp32, the torch engine, AdamW (fused), grad clip 1.0
    return module, TorchEngine(module, cfg, DistContext())


def timed(step, spec: dict) -> tuple[list[float], bool]:
    """(timed step seconds, cold): warmup, then steps until the budget is spent (>= 1, <= steps)."""
    first = step()
    cold = spec["warmup"] > 0 and first >= spec["cold_after"]
    if cold or spec["warmup"] == 0:
        times = [first]
    else:
        times = []
        for _ in range(spec["warmup"] - 1):
            step()
    if not cold:
        t_start = time.perf_counter()
        while len(times) < spec["steps"] and (not times or time.perf_counter() - t_start < spec["budget"]):
            times.append(step())
    return times, cold


def run_point(spec: dict) -> dict:
    """One (batch, mode) point in this (fresh) process: build, step, measure."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    n, mode = spec["n"], spec["mode"]
    row = {"n": n, "mode": mode, "threads": torch.get_num_threads()}
    if mode == "loss":
        return {**row, **run_loss(spec)}
    module, engine = build(spec)
    batch = make_batch(n, spec)
    k = n // spec["micro"] if mode in ("cached", "chunked") else 1
    micro = split(batch, k)
    base, base_hw = rss_mib(), maxrss_mib()
    losses, cpu = [], []

    def step() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(engine.train_step(micro, lr=1e-4).loss)  # ends in a host sync (float)
        cpu.append(time.process_time() - c0)
        return time.perf_counter() - t0

    times, cold = timed(step, spec)
    cpu = cpu[-len(times) :]  # the timed steps' CPU seconds (all threads of this process)
    peak = maxrss_mib()
    return {
        **row,
        "micro_batches": k,
        "micro_batch": n // k,
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
        "embed_dim": module.backbone.embed_dim,
        "step_s": min(times),
        "step_times": times,
        "cold": cold,
        "samples_per_s": n / min(times),
        "cpu_s": min(cpu),
        "cpu_times": cpu,
        "samples_per_cpu_s": n / min(cpu),
        "first_loss": losses[0],
        "base_rss_mib": base,
        "base_hw_mib": base_hw,
        "peak_rss_mib": peak,
        "step_mib": peak - base,
    }


def run_loss(spec: dict) -> dict:
    """ClipLoss forward + backward on N random unit features of the model's width: the loss's own memory."""
    e = build(spec)[0].backbone.embed_dim
    g = torch.Generator().manual_seed(spec["seed"])
    n = spec["n"]
    img = F.normalize(torch.randn(n, e, generator=g), dim=-1).requires_grad_()  # (N, E)
    txt = F.normalize(torch.randn(n, e, generator=g), dim=-1).requires_grad_()  # (N, E)
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    loss_fn = ClipLoss(local_loss=True)
    base, base_hw = rss_mib(), maxrss_mib()
    t0 = time.perf_counter()
    loss = loss_fn(img, txt, scale)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = maxrss_mib()
    return {
        "embed_dim": e,
        "step_s": seconds,
        "first_loss": loss.item(),
        "logits_mib": 2 * n * n * 4 / 2**20,  # the two (N, N) fp32 logit matrices themselves
        "base_rss_mib": base,
        "base_hw_mib": base_hw,
        "peak_rss_mib": peak,
        "step_mib": peak - base,
    }


def spawn(spec: dict, timeout: float) -> dict:
    """run_point(spec) in a fresh interpreter; a failed or killed child gives a row saying so."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    row = {"n": spec["n"], "mode": spec["mode"]}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **CHILD_ENV}
        )
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        return {**row, "error": f"exit {proc.returncode}{killed}: {tail[:200]}"}
    return json.loads(lines[-1])


def _mem(r: dict | None) -> str:
    if r is None:
        return "—"
    if "error" in r:
        return r["error"]
    return f"{r['peak_rss_mib']:.0f} (+{r['step_mib']:.0f})"


def _speed(r: dict | None) -> str:
    if r is None or "error" in r:
        return "—"
    return f"{r['samples_per_s']:.0f} ({r['samples_per_cpu_s']:.0f})" + (" cold" if r["cold"] else "")


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if a is None or b is None or "error" in a or "error" in b or b[key] <= 0:
        return "—"
    return f"{a[key] / b[key]:.2f}"


def table(rows: list[dict], micro: int) -> str:
    """One line per global batch: full and cached peak RSS (+ the step's own MiB) and samples/s (per second of
    the process's CPU time), the ratios (full / cached step memory, cached / full samples per CPU second), and
    what the loss alone adds."""
    by = {(r["n"], r["mode"]): r for r in rows}
    head = [
        f"| global batch | micro-batches of {micro} | full: peak MiB (+step) | full: samples/s (per CPU-s) "
        "| cached: peak MiB (+step) | cached: samples/s (per CPU-s) | step memory full / cached "
        "| samples per CPU-s cached / full "
        "| loss alone: +MiB (N×N logits MiB) | cached + chunked loss: peak MiB (+step), samples/s (per CPU-s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines = []
    for n in sorted({r["n"] for r in rows}):
        full, cached, loss = by.get((n, "full")), by.get((n, "cached")), by.get((n, "loss"))
        chunked = by.get((n, "chunked"))
        if loss is None:
            loss_cell = "—"
        elif "error" in loss:
            loss_cell = loss["error"]
        else:
            loss_cell = f"+{loss['step_mib']:.0f} ({loss['logits_mib']:.0f})"
        lines.append(
            f"| {n} | {n // micro} | {_mem(full)} | {_speed(full)} | {_mem(cached)} | {_speed(cached)} | "
            f"{_ratio(full, cached, 'step_mib')} | {_ratio(cached, full, 'samples_per_cpu_s')} | {loss_cell} | "
            f"{_mem(chunked)}, {_speed(chunked)} |"
        )
    return "\n".join(head + lines)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_point(json.loads(args.child))), flush=True)
        return None
    keys = ("micro", "model", "img_size", "vocab", "text_len", "warmup", "steps", "budget", "cold_after")
    common = {k: getattr(args, k) for k in keys} | {"seed": args.seed, "threads": args.threads}
    print(
        f"torch {torch.__version__}, cpu ({os.cpu_count()} cores), threads {args.threads or torch.get_num_threads()}"
        f"; {args.model} at {args.img_size} px, vocab {args.vocab}, {args.text_len}-token captions; clip "
        f"(local loss), TorchEngine fp32, one process; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    rows: list[dict] = []
    t_all = time.perf_counter()
    for n in args.batches:
        for mode in args.modes:
            load = os.getloadavg()[0]
            r = spawn({**common, "n": n, "mode": mode}, args.timeout)
            r["load_before"] = load
            rows.append(r)
            extra = r.get("error") or (
                f"peak {r['peak_rss_mib']:.0f} MiB (+{r['step_mib']:.0f}), {r['step_s']:.2f} s/step"
                + (f", {r['cpu_s']:.2f} CPU s" if "cpu_s" in r else "")
            )
            print(f"  N {n:5d} {mode:6s}: {extra} (load {load:.2f})", flush=True)
    wall = time.perf_counter() - t_all
    md = table(rows, args.micro)
    print(f"\nwall {wall:.0f} s; load average {os.getloadavg()[0]:.2f} (1 min, at the end)\n\n{md}")
    res = {
        "command": "benchmarks/contrastive_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "wall_s": wall,
        "args": {k: v for k, v in vars(args).items() if k != "child"},
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        Path(args.json).with_suffix(".md").write_text(md + "\n")
    return res


if __name__ == "__main__":
    main()
