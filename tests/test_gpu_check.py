"""benchmarks/gpu_check.sh --smoke: the GPU check's code at tiny sizes on the CPU, so it is known to run when a
session is lent a GPU for a few minutes (every section, every row, numbers and no errors)."""

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

# rows the smoke run must fill with numbers: (section, a substring of the case)
EXPECTED = [
    ("attention", f"{name} {mode}, N={n} ")
    for name in ("reference", "sdpa/flash", "sdpa/math")
    for mode in ("fwd", "fwd+bwd")
    for n in (64, 256)
]
EXPECTED += [("mae", f"vit_test_patch4 MAE, batch 8: {name}") for name in ("tessera", "hf_sdpa", "hf_eager")]
EXPECTED += [("backbones", "vit: vit_test_patch4"), ("backbones", "maxvit: maxvit_test")]
EXPECTED += [
    ("deepspeed", "A: uninterrupted"),
    ("deepspeed", "B: stopped at step 3"),
    ("deepspeed", "C: A repeated"),
]


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke", "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    table = (tmp_path / "gpu_check.md").read_text()
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert table.startswith("# GPU check: ") and "smoke run" in table and "torch " in table
    assert (tmp_path / "gpu_check.log").read_text().count("[gpu_check ") > 10  # progress, timestamped
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ")
    ]
    assert rows[0] == ["section", "case", "time", "throughput", "MFU", "compared with", "status"]
    rows = rows[1:]
    assert not [r for r in rows if r[6].startswith("error")], table
    assert {r[0] for r in rows} == {"attention", "mae", "backbones", "deepspeed"}
    number = re.compile(r"\d")
    for section, case in EXPECTED:
        found = [r for r in rows if r[0] == section and case in r[1]]
        assert len(found) == 1, (section, case, table)
        r = found[0]
        assert r[6].startswith("ok") and number.search(r[2]), r  # a time
        if section in ("attention", "mae") or case.startswith("A:"):
            assert number.search(r[3]) and number.search(r[4]), r  # a rate, an MFU
        elif section == "backbones":
            assert number.search(r[3]), r
        assert number.search(r[5]), r  # the comparison: error vs reference, ratio, loss/weight diffs
    ds = {r[1][0]: r for r in rows if r[0] == "deepspeed"}
    assert ds["B"][6] == "ok: bit-identical", table  # on the CPU a resumed ZeRO-2 run is exact
    assert "losses identical at all 6 steps" in ds["B"][5] and "weights max abs diff 0.0e+00" in ds["B"][5]


def test_gpu_check_budget_and_no_gpu(tmp_path):
    """Sections the budget cannot fit are skipped with a note (exit 0); a full run without CUDA stops at once."""
    cmd = [sys.executable, "benchmarks/gpu_check.py"]
    skip = subprocess.run(
        cmd + ["--smoke", "--budget-s", "1", "--sections", "attention", "mae", "--out", str(tmp_path / "s")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert skip.returncode == 0, skip.stdout + skip.stderr
    table = (tmp_path / "s" / "gpu_check.md").read_text()
    for section in ("attention", "mae"):
        assert f"| {section} | (section) | — | — | — | — | skipped: 0 s of the budget left |" in table
    if not torch.cuda.is_available():
        full = subprocess.run(cmd + ["--out", str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True)
        assert full.returncode == 2 and "no CUDA device" in (tmp_path / "f" / "gpu_check.md").read_text()
