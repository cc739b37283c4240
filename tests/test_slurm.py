"""slurm/pretrain.sh on a real two-node Slurm cluster on this host (scripts/slurm-cluster.sh), and launch.slurm.

The cluster tests (marker `slurm`) need root and Debian's slurm-wlm + munge (scripts/setup.sh installs them);
without them they skip, or fail when TESSERA_REQUIRE_SLURM=1 (CI). Each job node gets a private /tmp and
/dev/shm, as on real machines, so everything a job reads or writes lives under /var/tmp here (the "shared
file system"), not in pytest's /tmp folders.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from launch import slurm as launch_slurm
from tests.conftest import ROOT, launch, read_metrics

CLUSTER = ROOT / "scripts" / "slurm-cluster.sh"
CONFIG = "configs/classify_tiny.yaml"


# ---- launch.slurm --dry-run: no cluster needed ----


def test_dry_run_prints_the_sbatch_command_and_the_resolved_script(capsys, monkeypatch):
    monkeypatch.delenv("LOG_DIR", raising=False)
    monkeypatch.setenv("GRACE", "30")  # exported settings reach the job (sbatch --export=ALL): shown resolved
    argv = [CONFIG, "--nodes", "2", "--procs-per-node", "4", "--partition", "gpu", "--time", "01:00:00"]
    assert launch_slurm.main([*argv, "--set", "train.max_steps=7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    command = next(line for line in out.splitlines() if line.startswith("sbatch "))
    assert shlex.split(command) == [
        "sbatch",
        "--parsable",
        "--job-name=classify_tiny",
        "--nodes=2",
        "--partition=gpu",
        "--time=01:00:00",
        "--export=ALL,PROCS_PER_NODE=4",
        "slurm/pretrain.sh",
        CONFIG,
        "--set",
        "train.max_steps=7",
    ]
    script = out.split("as this job runs it:\n", 1)[1]
    lines = script.splitlines()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
        "PROCS_PER_NODE=4",
    ):
        assert line in lines
    assert "GRACE=30" in lines and 'PYTHON="${PYTHON:-.venv/bin/python}"' in lines  # not exported: unchanged
    assert "#SBATCH --nodes=1" not in lines and "##SBATCH --partition=gpu" not in lines
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (ROOT / "logs" / "classify_tiny").exists()  # a dry run writes nothing


def test_dry_run_refuses_a_bad_config_naming_the_key(capsys):
    assert launch_slurm.main([CONFIG, "--nodes", "1", "--set", "train.max_stepz=3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.max_stepz" in err and "train.max_steps" in err
    assert launch_slurm.main(["configs/nope.yaml", "--nodes", "1", "--dry-run"]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_slurm.main([CONFIG, "--nodes", "0", "--dry-run"])


def test_batch_script_outside_slurm_says_how_to_submit():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", "slurm/pretrain.sh", CONFIG], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "sbatch slurm/pretrain.sh" in proc.stderr


# ---- a real cluster: two slurmd "nodes" on this host ----


@dataclass
class Cluster:
    base: Path  # under /var/tmp: visible to jobs on every node
    env: dict[str, str]  # SLURM_CONF for sbatch/scontrol; LOG_DIR for the job's status files
    shards: str

    def run(self, *cmd: str, **kw) -> str:
        return launch(list(cmd), env=self.env, **kw).stdout

    def sbatch(self, *args: str) -> str:
        """sbatch from the repository root, the job's log in base/logs; returns the job id."""
        cmd = ["sbatch", "--parsable", f"--output={self.base / 'logs'}/%x-%j.out"]
        cmd += [f"--chdir={self.env['TESSERA_ROOT']}", *args]
        return self.run(*cmd).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def log(self, job_id: str) -> str:
        found = list((self.base / "logs").glob(f"*-{job_id}.out"))
        return found[0].read_text() if found else "(no job log)"

    def wait(
        self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    ) -> dict:
        """Poll scontrol (accounting is off here) until the job reaches a final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.get("JobState") in until:
                return job
            time.sleep(1)
        subprocess.run(["scancel", job_id], env=self.env)
        raise AssertionError(
            f"job {job_id} still {job.get('JobState')} after {timeout} s\n{self.log(job_id)[-6000:]}"
        )


def _cluster_missing() -> str | None:
    missing = [b for b in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed: as root, apt-get install slurm-wlm munge (scripts/setup.sh does)"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs jobs as their user)"
    return None


@pytest.fixture(scope="session")
def cluster(request) -> Iterator[Cluster]:
    reason = _cluster_missing()
    if reason:
        if os.environ.get("TESSERA_REQUIRE_SLURM") == "1":
            pytest.fail(f"TESSERA_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="tessera-slurm-", dir="/var/tmp"))
    state = base / "cluster"
    repo, mounted = ROOT, None
    try:
        if ROOT.is_relative_to(
            "/tmp"
        ):  # jobs get a private /tmp: show them the checkout at a path outside it
            mounted = base / "repo"
            mounted.mkdir()
            subprocess.run(["mount", "--bind", str(ROOT), str(mounted)], check=True)
            repo = mounted
        started = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True)
        assert started.returncode == 0, f"{CLUSTER} start failed:\n{started.stdout}\n{started.stderr}"
        shards = shutil.copytree(request.getfixturevalue("digits_shards"), base / "digits_train")
        (
            base / "logs"
        ).mkdir()  # Slurm opens --output before the script runs: a missing folder, no log at all
        env = {
            "SLURM_CONF": str(state / "slurm.conf"),
            "LOG_DIR": str(base / "logs"),
            "TESSERA_ROOT": str(repo),
        }
        yield Cluster(base, env, str(shards))
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True)
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], capture_output=True)
        if mounted is None or not os.path.ismount(mounted):  # never delete through a live bind mount
            shutil.rmtree(base, ignore_errors=True)


def train_args(out: Path, shards: str, *sets: str) -> list[str]:
    args = [CONFIG]
    for s in (f"run.output_dir={out}", f"data.local={shards}", "run.progress=false", *sets):
        args += ["--set", s]
    return args


def model_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / f"step_{step:08d}" / "engine" / "model.pt", map_location="cpu")


@pytest.mark.slurm
def test_two_nodes_train_through_launch_slurm(cluster):
    """`python -m launch.slurm --nodes 2` -> sbatch -> one torchrun per node -> a world of 2 that trains."""
    out = cluster.base / "two_nodes"
    proc = launch(
        [sys.executable, "-m", "launch.slurm", *train_args(out, cluster.shards, "train.max_steps=12")]
        + ["--nodes", "2", "--procs-per-node", "1", "--job-name", "two_nodes"],
        env=cluster.env,
    )
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    job = cluster.wait(job_id, timeout=180)
    log = cluster.log(job_id)
    assert job["JobState"] == "COMPLETED" and job["NodeList"] == "n[1-2]", log[-4000:]
    assert "launcher 0 on node n1" in log and "launcher 1 on node n2" in log, log[-4000:]
    assert "world_size=2 launcher=torchrun" in log
    assert "trainer status finished" in log
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(r["loss"] > 0 for r in rows)
    assert json.loads((out / "checkpoints" / "step_00000012" / "meta.json").read_text())["world_size"] == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_matches_an_uninterrupted_run(cluster):
    """USR1 to the batch shell (what --signal=B:USR1@T sends before a time limit) -> checkpoint at the current
    step, requeue, resume there; the weights at the end equal those of the same job never interrupted.

    The reference is the same two-node job, not `torchrun --nproc-per-node 2` on one node: streaming orders the
    samples by the number of nodes (num_canonical_nodes), so 2 nodes x 1 process and 1 x 2 train on different
    batches. It is queued at once and runs while the preempted job waits to restart.
    """
    steps = 80
    out, reference = cluster.base / "preempted", cluster.base / "reference"
    sets = ("train.max_steps=" + str(steps), "run.log_interval=1", "checkpoint.interval=30")
    job_id = cluster.sbatch("--nodes=2", "slurm/pretrain.sh", *train_args(out, cluster.shards, *sets))
    ref_id = cluster.sbatch("--nodes=2", "slurm/pretrain.sh", *train_args(reference, cluster.shards, *sets))
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out)) < 5:
        state = cluster.job(job_id).get("JobState")
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING"), (
            state,
            cluster.log(job_id)[-4000:],
        )
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    job = cluster.wait(job_id, timeout=300)
    log = cluster.log(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", log[-6000:]
    first = json.loads((cluster.base / "logs" / f"tessera-{job_id}.restart0.status.json").read_text())
    assert first["status"] == "preempted" and first["signal"] == "SIGUSR1" and 5 <= first["step"] < steps, (
        first
    )
    stop = first["step"]
    assert f"checkpointed step {stop}, exiting" in log
    assert f"requeueing job {job_id} (restart 1)" in log and f"job {job_id} restart 1:" in log
    assert f"resumed from {out}/checkpoints/step_{stop:08d} at step {stop}" in log
    second = json.loads((cluster.base / "logs" / f"tessera-{job_id}.restart1.status.json").read_text())
    assert second == {"status": "finished", "step": steps, "signal": None}
    assert [r["step"] for r in read_metrics(out)] == list(range(1, steps + 1))  # every step logged once

    ref = cluster.wait(ref_id, timeout=300)
    assert ref["JobState"] == "COMPLETED" and ref["Restarts"] == "0", cluster.log(ref_id)[-4000:]
    got, want = model_state(out, steps), model_state(reference, steps)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [
        k for k in want if not torch.equal(got[k], want[k])
    ]
