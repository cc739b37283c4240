"""Shared fixtures: tiny shards converted once per session, launch helpers for multi-process runs, and the helpers
of the Hugging Face parity tests (an offline hub, weights moved away from their init)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "mae_tiny.yaml")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """sklearn digits (train split) as MDS shards, converted once for the whole session."""
    from pretrain.data import convert

    out = tmp_path_factory.mktemp("shards") / "digits_train"
    convert("digits", "train", str(out))
    return str(out)


@pytest.fixture
def hf_offline(monkeypatch):
    """For HF round trips (`pytestmark = pytest.mark.usefixtures("hf_offline")`): from_pretrained must find
    everything in the folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def trained_like(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Perturb every weight (N(0, 0.05^2) added), so parity cannot pass by init luck (zero biases and tables,
    unit norms, tiny layer scales, zero GRN, equal temperatures...); eval()."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


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


def torchrun_cmd(nproc: int, args: list[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m pretrain.train ARGS` with this interpreter."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pretrain.train",
        *args,
    ]


def torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    return launch(torchrun_cmd(nproc, args), **kw)


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
