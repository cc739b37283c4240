"""One GPU check: attention kernels, MAE ViT-B/L and every backbone family against their twins, and a DeepSpeed
ZeRO-2 resume, in one run that fits a short GPU lease. Writes ONE markdown table (stdout, and $OUT/gpu_check.md
when $OUT is set, else runs/gpu_check.md; `--out` overrides), rewritten after every row.

    bash benchmarks/gpu_check.sh            # on the GPU machine (installs the carried .whl/ first)
    bash benchmarks/gpu_check.sh --smoke    # the same code at tiny sizes on the CPU (tests/test_gpu_check.py)

Sections (each in its own process, so a crash, an OOM or a hang costs one section, not the run):
  attention  ops.attention.attention through each torch SDPA kernel (sdpa_kernel) and flash-attn if installed,
             vs ops.attention.reference_attention: forward and forward+backward, bf16, ms, TFLOP/s, error vs an
             fp32 reference
  mae        benchmarks/vit_mae_throughput.run: MAE ViT-B/16 and ViT-L/16 train steps, Tessera vs transformers'
             ViTMAEForPreTraining holding the same weights, img/s and MFU
  backbones  benchmarks/backbones_vs_twins.bench: each family at base size vs its twin, bf16
  deepspeed  `python -m pretrain.train` with DeepSpeed ZeRO-2 bf16: uninterrupted vs stopped (train.stop_at_step)
             and resumed, per-step losses and consolidated final weights compared, plus a repeat of the
             uninterrupted run as the run-to-run noise floor
A wall-time budget (--budget-s) is split so that every later section keeps a reserve; a section that runs past
its share is stopped and the table says so. Results and how to run it on a lent GPU: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # the repo's packages, and the two reused benchmarks

SECTIONS = ("attention", "mae", "backbones", "deepspeed")
COLUMNS = ("section", "case", "time", "throughput", "MFU", "compared with", "status")
KEYS = ("section", "case", "time", "throughput", "mfu", "compare", "status")
# Seconds kept back for a section while the ones before it run (GPU, smoke): a section may use what the earlier
# ones left, but never the reserves of the later ones.
RESERVE = {"attention": (45, 10), "mae": (60, 15), "backbones": (100, 25), "deepspeed": (120, 45)}
T0 = float(os.environ.get("GPU_CHECK_T0", time.time()))  # the parent's start: one clock for every process


def log(msg: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[gpu_check {stamp} +{time.time() - T0:5.1f}s] {msg}", flush=True)


def plan(smoke: bool) -> dict:
    """Sizes: a full run for one H100/H200, or tiny ones for the CPU smoke run (same code)."""
    if smoke:
        return dict(
            device="cpu",
            precision="bf16",
            attn_shapes=[(64, 2, 2, 16), (256, 1, 2, 16)],  # (tokens N, batch B, heads H, head dim d)
            attn_reps=(1, 3),  # (warmup, timed) calls
            mae_models=[("vit_test_patch4", 8)],
            mae=["--decoder", "32x1x2", "--steps", "1", "--rounds", "2", "--warmup", "3"],
            bb=["--size", "test", "--batch", "2", "--steps", "1", "--rounds", "1", "--warmup", "1"],
            families=["vit", "maxvit"],  # a transformers twin and the timm one
            ds_steps=(6, 3),  # (steps, stop-at step)
        )
    return dict(
        device="cuda",
        precision="bf16",
        attn_shapes=[(1024, 8, 16, 64), (8192, 1, 16, 64)],
        attn_reps=(3, 10),
        mae_models=[("vit_base_patch16", 128), ("vit_large_patch16", 64)],
        mae=["--decoder", "512x8x16", "--steps", "3", "--rounds", "5", "--warmup", "3"],
        bb=["--size", "base", "--batch", "64", "--steps", "2", "--rounds", "5", "--warmup", "3"],
        families=None,  # all of backbones_vs_twins.BASE
        ds_steps=(20, 10),
    )


# ---------------------------------------------------------------------------------------------------- helpers


def row(section: str, case: str, time="—", throughput="—", mfu="—", compare="—", status="ok") -> dict:
    return dict(
        section=section, case=case, time=time, throughput=throughput, mfu=mfu, compare=compare, status=status
    )


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
    return text[:160] + ("..." if len(text) > 160 else "")


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.3g}%"


def num(x: float) -> str:
    """3 significant digits (whole numbers from 100 up)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def free_device(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def peak_tflops(device: str) -> float | None:
    """bf16 peak of one device (pretrain.mfu: a GPU's data sheet, or a measured CPU matmul rate)."""
    import torch

    from pretrain.mfu import device_peak_tflops

    try:
        return device_peak_tflops(torch.device(device), "bf16")[0]
    except LookupError as err:
        log(f"no peak for MFU: {err}")
        return None


def timed_ms(fn, device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of fn() (device events on CUDA), after warmup calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------- sections


def section_attention(p: dict, emit, deadline: float) -> None:
    import torch
    from torch.nn.attention import SDPBackend

    from ops.attention import flash_available, reference_attention

    dev = p["device"]
    peak = peak_tflops(dev)
    kernels = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    cases = [("reference", "reference", None)]  # (label, ops.attention backend, SDPA kernel)
    cases += [(f"sdpa/{k.split('_')[0].lower()}", "sdpa", getattr(SDPBackend, k)) for k in kernels]
    if flash_available():
        cases.append(("flash-attn", "flash", None))
    else:
        emit(row("attention", "flash-attn", status="skipped: not installed (pip install 'tessera[flash]')"))
    on_cpu = (None, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    for n, b, h, d in p["attn_shapes"]:
        g = torch.Generator(device=dev).manual_seed(n)
        q, k, v, grad_out = (
            torch.randn(b, h, n, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(4)
        )
        ref_in = [
            t.float().requires_grad_() for t in (q, k, v)
        ]  # fp32 reference on the same bf16-rounded inputs
        ref_out = reference_attention(*ref_in)
        ref_out.backward(grad_out.float())
        ref_out, ref_grads = ref_out.detach(), [t.grad for t in ref_in]
        del ref_in

        for label, backend, kernel in cases:
            for mode in ("fwd", "fwd+bwd"):
                case = f"{label} {mode}, N={n} (B{b} H{h} d{d})"
                if time.time() > deadline:
                    emit(row("attention", case, status="skipped: section time budget spent"))
                    continue
                if dev == "cpu" and kernel not in on_cpu:
                    emit(row("attention", case, status="skipped: CUDA-only kernel"))
                    continue
                try:
                    ms, errs = _attention_timed(
                        (q, k, v, grad_out), (ref_out, ref_grads), backend, kernel, mode, p
                    )
                except Exception as err:  # a kernel that does not take these inputs, an OOM: this row only
                    refused = "No available kernel" in str(err)  # SDPA's words for the first
                    emit(
                        row(
                            "attention",
                            case,
                            status=f"{'skipped' if refused else 'error'}: {short_error(err)}",
                        )
                    )
                    free_device(dev)
                    continue
                # model FLOPs: QK^T and PV forward; backward (dQ, dK, dV, dP) twice that, recompute not counted
                tflops = 4 * b * h * n * n * d * (1 if mode == "fwd" else 3) / (ms / 1e3) / 1e12
                worst_abs, worst_rel = max(e[0] for e in errs), max(e[1] for e in errs)
                ok = math.isfinite(worst_rel) and worst_rel < 2e-2  # bf16 operands: 1e-3..1e-2 of fp32
                emit(
                    row(
                        "attention",
                        case,
                        time=f"{num(ms)} ms",
                        throughput=f"{num(tflops)} TFLOP/s",
                        mfu=pct(None if peak is None else tflops / peak),
                        compare=f"fp32 reference ({'out' if mode == 'fwd' else 'out, dq, dk, dv'}): "
                        f"max abs err {worst_abs:.1e}, rel {worst_rel:.1e}",
                        status="ok" if ok else f"error: rel err {worst_rel:.1e} over the bf16 bound 2e-2",
                    )
                )
                free_device(dev)
        del q, k, v, grad_out, ref_out, ref_grads
        free_device(dev)


def _attention_timed(inputs, refs, backend: str, kernel, mode: str, p: dict) -> tuple[float, list]:
    """(median ms, [(max abs err, rel err)] of the output and, with backward, of dq, dk, dv)."""
    import torch
    from torch.nn.attention import sdpa_kernel

    from ops.attention import attention

    *qkv, grad_out = inputs
    leaves = [t.clone().requires_grad_(mode == "fwd+bwd") for t in qkv]

    def call():
        with sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext():
            if mode == "fwd":
                with torch.no_grad():
                    return attention(*leaves, backend=backend)
            for t in leaves:
                t.grad = None
            out = attention(*leaves, backend=backend)
            out.backward(grad_out)
            return out

    errs = [_err(call().float(), refs[0])]  # checked first: a kernel refusing these inputs fails here
    if mode == "fwd+bwd":
        errs += [_err(t.grad.float(), r) for t, r in zip(leaves, refs[1])]
    return timed_ms(call, p["device"], *p["attn_reps"]), errs


def _err(x, ref) -> tuple[float, float]:
    """(max |x - ref|, ||x - ref|| / ||ref||)"""
    diff = x - ref
    return diff.abs().max().item(), (diff.norm() / ref.norm()).item()


def section_mae(p: dict, emit, deadline: float) -> None:
    import vit_mae_throughput as vm

    for model, batch in p["mae_models"]:
        base = f"{model} MAE, batch {batch}"
        if time.time() > deadline:
            emit(row("mae", base, status="skipped: section time budget spent"))
            continue
        args = vm.parse_args(
            ["--model", model, "--batch", str(batch), "--device", p["device"], "--precision", p["precision"]]
            + p["mae"]
        )
        log(f"mae: {base}, {p['precision']}, decoder {args.decoder}")
        try:
            res = vm.run(args)
        except Exception as err:
            traceback.print_exc()
            emit(row("mae", base, status=f"error: {short_error(err)}"))
            free_device(p["device"])
            continue
        rate, times = res["rate"], res["times"]
        for name, r in rate.items():
            if name == "tessera":
                compare = f"fp32 step-0 loss equals HF's (<1e-4): {res['losses']['tessera']:.5f}"
            else:
                per_round = statistics.median(t / t0 for t, t0 in zip(times[name], times["tessera"]))
                compare = f"Tessera / {name} = {rate['tessera'] / r:.2f} (per-round median {per_round:.2f})"
            emit(
                row(
                    "mae",
                    f"{base}: {name}",
                    time=f"{num(1000 * batch / r)} ms/step",
                    throughput=f"{num(r)} img/s",
                    mfu=pct(res["mfu"][name]),
                    compare=compare,
                )
            )
        del res
        free_device(p["device"])


def section_backbones(p: dict, emit, deadline: float) -> None:
    import backbones_vs_twins as bt

    args = bt.parse_args(["--device", p["device"], "--precision", p["precision"]] + p["bb"])
    for family in p["families"] or list(bt.BASE):
        model = (bt.TEST if args.size == "test" else bt.BASE)[family]
        case = f"{family}: {model}, batch {args.batch}"
        if time.time() > deadline:
            emit(row("backbones", case, status="skipped: section time budget spent"))
            continue
        log(f"backbones: {case}, {args.precision}")
        try:
            r = bt.bench(family, args)
        except Exception as err:
            traceback.print_exc()
            emit(row("backbones", case, status=f"error: {short_error(err)}"))
        else:
            emit(
                row(
                    "backbones",
                    f"{family}: {model} ({r['params_m']:.1f}M, {r['size']}px), batch {args.batch}",
                    time=f"{num(1000 * args.batch / r['ours'])} ms/step",
                    throughput=f"{num(r['ours'])} img/s",
                    compare="no twin runs here (timed alone)"
                    if r["ratio"] is None
                    else f"{r['twin']} {num(r['theirs'])} img/s; Tessera / twin = {r['ratio']:.2f}; "
                    f"float64 logits max diff {r['max_logit_diff']:.0e}",
                )
            )
        free_device(p["device"])


def section_deepspeed(p: dict, emit, deadline: float, work: Path) -> None:
    """ZeRO-2 bf16 through the real entry point: A uninterrupted; B stopped at the cut, then relaunched (resumes);
    C = A again (run-to-run noise). A, B's first launch and C run at once (one device, shared), then B resumes."""
    from pretrain.data import convert
    from pretrain.export import load_checkpoint_model

    steps, cut = p["ds_steps"]
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="deepspeed-", dir=work))  # fresh: a stale run dir would be resumed
    convert("digits", "train", str(tmp / "shards"))
    sets = ["engine.backend=deepspeed", "engine.zero_stage=2", "engine.precision=bf16", "run.progress=false"]
    sets += [f"train.max_steps={steps}", f"checkpoint.interval={cut}", "run.log_interval=1"]
    sets += [f"data.local={tmp / 'shards'}"]
    cfg = f"mae_tiny ({steps} steps, stop at {cut})"

    def launch(jobs: dict[str, list[str]]) -> dict[str, tuple[float, str]]:
        """Start every job at once; {log name: (seconds, log text)}; raises if one fails or the budget ends."""
        procs, t0, out = {}, time.time(), {}
        for name, extra in jobs.items():
            overrides = sets + [f"run.output_dir={tmp / name[0]}"] + extra  # B-cut and B-resume share B/
            cmd = [sys.executable, "-m", "pretrain.train", "configs/mae_tiny.yaml"]
            cmd += [a for s in overrides for a in ("--set", s)]
            with open(tmp / f"{name}.log", "w") as logf:
                procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        while len(out) < len(procs):
            for name, proc in procs.items():
                if name not in out and proc.poll() is not None:
                    out[name] = (time.time() - t0, (tmp / f"{name}.log").read_text())
            if time.time() > deadline:
                for proc in procs.values():
                    proc.kill()
                raise TimeoutError(
                    f"section time budget spent during {', '.join(sorted(set(procs) - set(out)))}"
                )
            time.sleep(0.2)
        for name, proc in procs.items():
            if proc.returncode:
                print(
                    f"--- {name}'s log, last 40 lines:\n" + "\n".join(out[name][1].splitlines()[-40:]),
                    flush=True,
                )
                tail = [ln for ln in out[name][1].splitlines() if ln.strip()][-3:]
                raise RuntimeError(f"{name} exited {proc.returncode}: {' / '.join(tail)}")
        return out

    metrics, state = {}, {}

    def compare(a: str, b: str) -> tuple[str, float, float]:
        """(description, max |loss diff|, max |weight diff|) between runs a and b."""
        for name in (a, b):
            if name not in metrics:
                metrics[name] = [
                    json.loads(ln) for ln in (tmp / name / "metrics.jsonl").read_text().splitlines()
                ]
                model, meta = load_checkpoint_model(tmp / name)
                assert meta["step"] == steps, f"{name}: latest checkpoint is step {meta['step']}, not {steps}"
                state[name] = model.state_dict()
            assert [r["step"] for r in metrics[name]] == list(range(1, steps + 1)), f"{name}: steps logged"
        la, lb = [r["loss"] for r in metrics[a]], [r["loss"] for r in metrics[b]]
        first = next((i + 1 for i, (x, y) in enumerate(zip(la, lb)) if x != y), None)
        dl = max(abs(x - y) for x, y in zip(la, lb))
        dw = max((state[a][k] - state[b][k]).abs().max().item() for k in state[a])
        text = (
            f"losses identical at all {steps} steps"
            if first is None
            else (f"losses first differ at step {first}, max abs diff {dl:.1e}")
        )
        return f"{text}; final fp32 weights max abs diff {dw:.1e}", dl, dw

    log(f"deepspeed: {cfg}, runs under {tmp}")
    try:
        first = launch({"A": [], "B-cut": [f"train.stop_at_step={cut}"], "C": []})
        second = launch({"B-resume": []})
        (c_text, dl_c, dw_c), (b_text, dl_b, dw_b) = compare("A", "C"), compare("A", "B")
    except Exception as err:
        traceback.print_exc()
        emit(row("deepspeed", f"ZeRO-2 bf16, {cfg}", status=f"error: {short_error(err)}"))
        return
    steady = metrics["A"][1:] or metrics["A"]  # step 1 holds the warm-up
    mfus = [r["mfu"] for r in steady if "mfu" in r]
    engine_ok = "engine=deepspeed (ZeRO-2, bf16)" in first["A"][1]
    emit(
        row(
            "deepspeed",
            f"A: uninterrupted, {cfg}",
            time=f"{num(first['A'][0])} s launch",
            throughput=f"{num(statistics.median(r['samples_per_sec'] for r in steady))} img/s (B, C ran alongside)",
            mfu=pct(statistics.median(mfus) if mfus else None),
            compare=f"final loss {metrics['A'][-1]['loss']:.4f}",
            status="ok" if engine_ok else "error: A's log has no 'engine=deepspeed (ZeRO-2, bf16)'",
        )
    )
    emit(
        row(
            "deepspeed",
            f"C: A repeated (run-to-run noise), {cfg}",
            f"{num(first['C'][0])} s launch",
            compare=c_text,
        )
    )
    if "resumed from" not in second["B-resume"][1]:
        status = "error: B's second launch did not resume"
    elif dl_b == 0 and dw_b == 0:
        status = "ok: bit-identical"
    elif (dl_c > 0 or dw_c > 0) and dl_b <= 2 * dl_c and dw_b <= 2 * dw_c:
        status = "ok: within 2x the run-to-run noise (C vs A): nondeterministic kernels, not the resume"
    else:
        status = "error: resume differs by more than 2x the run-to-run noise (C vs A)"
    both = first["B-cut"][0] + second["B-resume"][0]
    emit(
        row(
            "deepspeed",
            f"B: stopped at step {cut}, resumed; vs A",
            f"{num(both)} s (2 launches)",
            compare=b_text,
            status=status,
        )
    )


# ---------------------------------------------------------------------------------------------------- driver


def child(args: argparse.Namespace) -> int:
    """Run one section, appending its rows to args.rows as JSON lines."""
    p = plan(args.smoke)

    def emit(r: dict) -> None:
        with open(args.rows, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        log(f"{r['section']} | {r['case']} | {r['time']} | {r['throughput']} | {r['mfu']} | {r['status']}")

    fn = {
        "attention": section_attention,
        "mae": section_mae,
        "backbones": section_backbones,
        "deepspeed": lambda p, emit, deadline: section_deepspeed(p, emit, deadline, Path(args.work)),
    }[args.child]
    try:
        fn(p, emit, args.deadline)
    except Exception as err:  # import failures (a missing package) and anything outside the per-row guards
        traceback.print_exc()
        emit(row(args.child, "(section)", status=f"error: {short_error(err)}"))
    return 0


def header(smoke: bool, budget: float) -> list[str]:
    import torch

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    from pretrain.mfu import gpu_peak_tflops

    if torch.cuda.is_available():
        card = torch.cuda.get_device_name()
        peak = gpu_peak_tflops(card)
        cuda = f" (CUDA {torch.version.cuda}); bf16 peak for MFU " + (
            "unknown" if peak is None else f"{peak} TFLOP/s (data sheet)"
        )
    else:
        card, cuda = f"no GPU: CPU, {os.cpu_count()} cores", "; peak for MFU: a measured bf16 matmul rate"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "smoke run (tiny sizes on the CPU)" if smoke else "full run"
    return [
        f"# GPU check: {card}",
        "",
        f"{mode}; {date}; torch {torch.__version__}{cuda}; transformers {version('transformers')}; "
        f"deepspeed {version('deepspeed')}; flash-attn {version('flash-attn')}; Python {sys.version.split()[0]}; "
        f"budget {budget:.0f} s",
        "",
    ]


def table(head: list[str], rows: list[dict], notes: list[str]) -> str:
    lines = head + ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k in KEYS) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


NOTES = [
    "attention: TFLOP/s count the model's matmuls (forward 4·B·H·N²·d, forward+backward 3x that, recompute not "
    "counted); MFU = TFLOP/s over the card's bf16 dense data-sheet peak (pretrain.mfu.GPU_PEAK_TFLOPS); errors "
    "are against reference_attention in fp32 on the same bf16 inputs (rel = ||x - ref|| / ||ref||, bound 2e-2).",
    "mae: one train step = forward + loss + backward + fused AdamW, bf16 autocast, timed alternately with HF on "
    "the same weights, batch, noise; MFU = model FLOPs per sample (pretrain.mfu.count_train_flops, meta device) "
    "x img/s over the bf16 peak.",
    "backbones: forward + cross-entropy + backward, bf16 autocast, eval mode, ABBA-alternated with the twin "
    "after a float64 logits check on the CPU.",
    "deepspeed: `python -m pretrain.train configs/mae_tiny.yaml` with engine.backend=deepspeed, zero_stage=2, "
    "precision=bf16, one process per run; A, C and B's first launch share the device at once, then B resumes. "
    "Weights are the consolidated fp32 master weights of the last checkpoint. B passes when bit-identical to A, "
    "or, where C (a plain repeat of A) is not bit-identical either (nondeterministic CUDA kernels), when B's loss "
    "and weight differences stay within 2x C's.",
]


def parent(args: argparse.Namespace) -> int:
    smoke = args.smoke
    budget = args.budget_s or (240.0 if smoke else 450.0)
    out = (
        Path(args.out) if args.out else (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs")
    )
    out = out / "gpu_check.md" if out.suffix != ".md" else out
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else ROOT / "runs" / "gpu_check_work"
    t_end = T0 + budget
    log(f"writing {out}; budget {budget:.0f} s; sections {', '.join(args.sections)}")
    head = header(smoke, budget)
    rows: list[dict] = []
    notes = list(NOTES) + ["smoke run: tiny models on a CPU; its numbers only show the code runs"] * smoke
    import torch

    if not smoke and not torch.cuda.is_available():
        notes.insert(0, "no CUDA device: run with --smoke for the CPU sizes")
        out.write_text(table(head, rows, notes))
        print(out.read_text())
        return 2

    def write() -> None:
        out.write_text(table(head, rows, notes + [f"took {time.time() - T0:.0f} s"]))
        with open(out.with_suffix(".jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    current: list[subprocess.Popen] = []

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    mode = 1 if smoke else 0
    try:
        for i, section in enumerate(args.sections):
            reserve_later = sum(RESERVE[s][mode] for s in args.sections[i + 1 :])
            deadline = t_end - reserve_later
            left = deadline - time.time()
            if left < 0.5 * RESERVE[section][mode]:
                rows.append(
                    row(section, "(section)", status=f"skipped: {max(left, 0):.0f} s of the budget left")
                )
                write()
                continue
            log(f"section {section}: up to {left:.0f} s")
            with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as fh:
                rows_file = fh.name
            cmd = [sys.executable, "-u", __file__, "--child", section, "--rows", rows_file]
            cmd += ["--deadline", str(deadline), "--work", str(work)] + ["--smoke"] * smoke
            env = {**os.environ, "GPU_CHECK_T0": str(T0)}
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, start_new_session=True
            )  # own group: kill it whole
            current[:] = [proc]
            try:
                rc = proc.wait(timeout=max(1.0, left + 20))  # a grace period to write its last row
                problem = None if rc == 0 else f"error: section process exited {rc} (log above)"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                problem = f"error: stopped at its share of the budget ({left:.0f} s); rows missing after this"
            current.clear()
            got = [json.loads(line) for line in Path(rows_file).read_text().splitlines() if line.strip()]
            os.unlink(rows_file)
            rows += got
            if problem or not got:
                rows.append(row(section, "(section)", status=problem or "error: the section wrote no rows"))
            write()
    except KeyboardInterrupt as err:
        for proc in current:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        notes.insert(0, f"stopped early ({err}): the sections after the last row did not run")
        write()
        print(out.read_text(), flush=True)
        return 124
    write()
    print("\n" + out.read_text(), flush=True)
    log(f"done: {out}")
    return 1 if any(r["status"].startswith("error") for r in rows) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU: the same code, in about a minute"
    )
    p.add_argument(
        "--budget-s", type=float, default=None, help="wall-time budget (default 450 GPU, 240 smoke)"
    )
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--out", help="markdown file or folder (default: $OUT, else runs/)")
    p.add_argument("--work", help="folder for the DeepSpeed runs (default runs/gpu_check_work)")
    p.add_argument("--child", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
