"""Multi-process runs (gloo, 2 ranks) through the real launchers: torchrun, accelerate launch, srun-style env."""

import os
import random
import subprocess
import sys

import pytest
import torch

from pretrain import export
from tests.conftest import ROOT, TINY, launch, read_metrics, tiny_args, torchrun

STEPS = ("train.max_steps=10", "checkpoint.interval=4")


def resume_matches(tmp_path, shards, *extra):
    """Uninterrupted 2-rank run vs the same run stopped at step 5 and relaunched: per-step losses identical."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    torchrun(2, tiny_args(ref, shards, *STEPS, *extra))
    torchrun(2, tiny_args(cut, shards, *STEPS, *extra, "train.stop_at_step=5"))
    proc = torchrun(2, tiny_args(cut, shards, *STEPS, *extra))
    assert "resumed from" in proc.stdout and "at step 5" in proc.stdout
    a, b = read_metrics(ref), read_metrics(cut)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    accum = 2 if "train.grad_accum_steps=2" in extra else 1
    assert a[-1]["samples_seen"] == 10 * 16 * 2 * accum
    assert all(r["grad_norm"] > 0 for r in a)
    return a, proc


def test_ddp_two_ranks_resume_exact(tmp_path, digits_shards):
    rows, proc = resume_matches(tmp_path, digits_shards, "data.num_workers=2")
    assert "world_size=2" in proc.stdout and "engine=torch (DDP" in proc.stdout
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_deepspeed_zero2_fp32_resume_exact_and_matches_ddp(tmp_path, digits_shards):
    rows, proc = resume_matches(
        tmp_path, digits_shards, "engine.backend=deepspeed", "engine.zero_stage=2", "train.grad_accum_steps=2"
    )
    assert "engine=deepspeed (ZeRO-2, fp32)" in proc.stdout
    ddp = tmp_path / "ddp"
    torchrun(2, tiny_args(ddp, digits_shards, *STEPS, "train.grad_accum_steps=2"))
    for a, b in zip(rows, read_metrics(ddp)):  # same math, different reduction order
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * b["grad_norm"], (a, b)
    # consolidating the ZeRO-2 shards gives the weights DDP trained, not just something loadable. Adam turns
    # reduction-order noise into ~1e-4 on near-zero-gradient weights; training moved them by ~1e-2, and a stale,
    # misplaced or bf16-rounded shard would differ by that much.
    zero, _ = export.load_checkpoint_model(tmp_path / "ref")
    plain, _ = export.load_checkpoint_model(ddp)
    from pretrain.build import build_model, load_config

    init = build_model(load_config(TINY, ["model.kwargs.pos_embed=sincos"])).state_dict()
    diff = max(
        (a - b).abs().max().item() for a, b in zip(zero.state_dict().values(), plain.state_dict().values())
    )
    moved = max((a - b).abs().max().item() for a, b in zip(plain.state_dict().values(), init.values()))
    assert diff < 0.05 * moved and moved > 5e-3, (diff, moved)


def test_deepspeed_zero3_bf16_resume_exact_and_exports(tmp_path, digits_shards):
    rows, proc = resume_matches(
        tmp_path, digits_shards, "engine.backend=deepspeed", "engine.zero_stage=3", "engine.precision=bf16"
    )
    assert "engine=deepspeed (ZeRO-3, bf16)" in proc.stdout
    assert rows[-1]["loss"] < rows[0]["loss"]
    # ZeRO-3 shards are consolidated into one fp32 model that transformers loads
    assert export.main([str(tmp_path / "cut"), str(tmp_path / "hf")]) == 0
    from ops.compat import import_transformers

    hf = import_transformers().ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    model, meta = export.load_checkpoint_model(tmp_path / "cut")
    assert meta["zero_stage"] == 3 and meta["step"] == 10
    x, noise = torch.randn(2, 1, 16, 16), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(pixel_values=x, noise=noise).logits,
            model({"image": x}, noise=noise)["pred"],
            atol=1e-5,
            rtol=0,
        )


def accelerate(*args, env=None, check=True):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(random.randint(20000, 40000)),
        *args,
    ]
    if check:
        return launch(cmd, env=env)
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def test_accelerate_launch_runs_two_ranks_and_honours_deepspeed(tmp_path, digits_shards):
    proc = accelerate(
        "--multi_gpu",
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "pretrain.train",
        *tiny_args(tmp_path / "a", digits_shards, "train.max_steps=3"),
    )
    assert "world_size=2 launcher=accelerate" in proc.stdout
    proc = accelerate(
        "--use_deepspeed",
        "--zero_stage",
        "2",
        "--num_processes",
        "2",
        "--mixed_precision",
        "bf16",
        "-m",
        "pretrain.train",
        *tiny_args(tmp_path / "b", digits_shards, "train.max_steps=3"),
    )
    assert "world_size=2" in proc.stdout and "engine=deepspeed (ZeRO-2, bf16)" in proc.stdout
    assert "engine.zero_stage=2 (from accelerate launch --zero_stage 2)" in proc.stdout


def test_accelerate_settings_that_cannot_be_honoured_are_refused(tmp_path, digits_shards):
    proc = accelerate(
        "--cpu",
        "--num_processes",
        "2",
        "-m",
        "pretrain.train",
        *tiny_args(tmp_path / "c", digits_shards),
        check=False,
    )
    assert proc.returncode != 0 and "started a single process" in proc.stderr
    proc = accelerate(
        "--num_processes",
        "1",
        "--mixed_precision",
        "fp16",
        "-m",
        "pretrain.train",
        *tiny_args(tmp_path / "d", digits_shards),
        check=False,
    )
    assert proc.returncode != 0 and "fp16 is not supported" in proc.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # refused before any work


def test_srun_style_environment(tmp_path, digits_shards):
    """Under a bare `srun`, rank and world size come from SLURM_* (no torchrun, no RANK/WORLD_SIZE)."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    job = str(random.randint(1000, 9999))
    procs = []
    for rank in range(2):
        env = {
            **base,
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_LOCALID": str(rank),
            "SLURM_NNODES": "1",
            "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_JOB_ID": job,
            "PYTHONUNBUFFERED": "1",
            "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
            "OMP_NUM_THREADS": "1",
        }
        cmd = [
            sys.executable,
            "-m",
            "pretrain.train",
            *tiny_args(tmp_path / "s", digits_shards, "train.max_steps=3"),
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "world_size=2 launcher=slurm" in outs[0][0]
    assert read_metrics(tmp_path / "s")[-1]["samples_seen"] == 3 * 16 * 2


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "bf16")])
def test_deepspeed_single_process_stages_0_1(tmp_path, digits_shards, stage, precision):
    """Plain `python -m` (world size 1): DeepSpeed gets an in-memory process group; export consolidates."""
    run = tmp_path / "z"
    proc = launch(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            *tiny_args(
                run,
                digits_shards,
                "train.max_steps=3",
                "engine.backend=deepspeed",
                f"engine.zero_stage={stage}",
                f"engine.precision={precision}",
            ),
        ]
    )
    assert f"engine=deepspeed (ZeRO-{stage}, {precision})" in proc.stdout
    rows = read_metrics(run)
    assert len(rows) == 3 and all(r["grad_norm"] > 0 for r in rows)
    assert export.main([str(run), str(tmp_path / "hf")]) == 0
    model, meta = export.load_checkpoint_model(run)
    assert meta["zero_stage"] == stage and all(v.dtype == torch.float32 for v in model.state_dict().values())


@pytest.mark.slow
def test_deepspeed_optimizer_offload(tmp_path, digits_shards):
    """ZeRO-2 with the optimizer state in CPU memory (DeepSpeedCPUAdam, JIT-built on first use: ~2 min)."""
    run = tmp_path / "o"
    proc = launch(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            *tiny_args(
                run,
                digits_shards,
                "train.max_steps=4",
                "engine.backend=deepspeed",
                "engine.zero_stage=2",
                "engine.offload_optimizer=true",
            ),
        ],
        timeout=900,
    )
    assert "offload-optimizer" in proc.stdout
    rows = read_metrics(run)
    assert len(rows) == 4 and rows[-1]["loss"] < rows[0]["loss"] and all(r["grad_norm"] > 0 for r in rows)
