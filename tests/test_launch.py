"""Launcher integration without starting processes: accelerate's flags and Slurm's variables."""

import subprocess
import sys
from pathlib import Path

import pytest

from launch.accelerate import LaunchError, accelerate_overrides, merge_overrides
from pretrain.dist import _from_env

ACC = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


def test_accelerate_flags_become_overrides():
    env = {
        **ACC,
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu",
        "WORLD_SIZE": "2",
        "RANK": "0",
    }
    got = {k: v for k, v, _ in accelerate_overrides(env, parent_argv=[])}
    assert got == {
        "engine.precision": "bf16",
        "engine.backend": "deepspeed",
        "engine.zero_stage": 3,
        "train.grad_accum_steps": 4,
        "engine.offload_optimizer": True,
    }
    merged, notes = merge_overrides(["train.max_steps=5"], env)
    assert "engine.zero_stage=3" in merged and merged[-1] == "train.max_steps=5"
    assert any("--zero_stage 3" in n for n in notes)
    with pytest.raises(LaunchError, match="conflicts with --set engine.zero_stage=2"):
        merge_overrides(["engine.zero_stage=2"], env)
    assert accelerate_overrides({"PATH": "/bin"}) == []  # not under accelerate: nothing


@pytest.mark.parametrize(
    "env, argv, fragment",
    [
        (
            {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"},
            ["python", "accelerate", "launch", "--cpu", "--num_processes", "2"],
            "started a single process",
        ),
        (
            {"ACCELERATE_USE_CPU": "True"},
            ["python", "accelerate", "launch", "--cpu", "--num_processes=4"],
            "--num_processes 4",
        ),
        (
            {"ACCELERATE_USE_CPU": "True"},
            ["python", "accelerate", "launch", "--cpu", "--use_deepspeed"],
            "--cpu --use_deepspeed",
        ),
        ({"ACCELERATE_MIXED_PRECISION": "fp16"}, [], "fp16 is not supported"),
        ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, [], "dynamo_backend inductor"),
        ({"ACCELERATE_USE_FSDP": "true"}, [], "--use_fsdp"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"},
            [],
            "deepspeed_config_file",
        ),
        ({"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, [], "zero3_init_flag"),
    ],
)
def test_accelerate_refusals(env, argv, fragment):
    with pytest.raises(LaunchError, match=fragment.replace("-", r"\-")):
        accelerate_overrides({**ACC, **env}, parent_argv=argv)


def test_accelerate_cpu_single_process_is_fine():
    # one process asked, one started; a MASTER_ADDR exported by the user's shell is not a refusal
    env = {**ACC, "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "10.0.0.1"}
    assert accelerate_overrides(env, parent_argv=["python", "accelerate", "launch", "--cpu"]) == []


def test_rank_and_world_from_launchers():
    assert _from_env({}) == (0, 1, 0, 1, "python")
    assert _from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (
        3,
        4,
        1,
        2,
        "torchrun",
    )
    assert _from_env({"RANK": "0", "WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"})[-1] == "accelerate"
    srun = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        "SLURM_STEP_NUM_NODES": "2",
    }
    assert _from_env(srun) == (5, 8, 1, 4, "slurm")
    # the batch script itself (no srun step): one process, not a rank waiting for 7 others
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"}
    assert _from_env(batch) == (0, 1, 0, 1, "python")


def test_accelerate_cli_starts():
    """README's demo runs the `accelerate` command; its CLI imports every optional package it finds (timm, and
    through it torchvision, which cannot import on this CPU torch), so the environment must keep those out."""
    cli = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(cli), "launch", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--num_processes" in proc.stdout
