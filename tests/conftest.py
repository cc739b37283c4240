"""Shared fixtures: tiny shards converted once per session, and launch helpers for multi-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "mae_tiny.yaml")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """sklearn digits (train split) as MDS shards, converted once for the whole session."""
    from pretrain.data import convert

    out = tmp_path_factory.mktemp("shards") / "digits_train"
    convert("digits", "train", str(out))
    return str(out)


def tiny_args(out_dir, shards: str, *extra: str) -> list[str]:
    """Arguments for the tiny MAE config writing into `out_dir`, reading pre-converted shards."""
    args = [
        TINY,
        "--set",
        f"run.output_dir={out_dir}",
        "--set",
        f"data.local={shards}",
        "--set",
        "run.progress=false",
    ]
    for e in extra:
        args += ["--set", e]
    return args


def launch(cmd: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command from the repo root; fail the test with its output if it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    return launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "pretrain.train",
            *args,
        ],
        **kw,
    )


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
