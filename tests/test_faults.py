"""Runs that survive faults: stop signals, kill -9 at random steps and mid-checkpoint, NaN and loss spikes.

Every faulted run is compared with an uninterrupted one: the final weights must be bit-identical, and the
per-sample log (run.sample_log) must show the same samples at every step, each at most once per epoch.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pretrain.checkpoint import is_complete
from pretrain.faults import Faults
from pretrain.preempt import EXIT_REQUEUE
from pretrain.samplelog import SampleLog, effective_steps, epoch_counts
from pretrain.train import main
from tests.conftest import ROOT, read_metrics, torchrun, torchrun_cmd

CLASSIFY = str(ROOT / "configs" / "classify_tiny.yaml")


def cls_args(out, shards, *extra: str) -> list[str]:
    args = [CLASSIFY, "--set", f"run.output_dir={out}", "--set", f"data.local={shards}"]
    for e in ("run.progress=false", "run.sample_log=true", "run.tensorboard=false", *extra):
        args += ["--set", e]
    return args


def final_weights(out, step: int) -> dict:
    return torch.load(Path(out) / "checkpoints" / f"step_{step:08d}" / "engine" / "model.pt")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def assert_exactly_once(out, ref_out=None) -> dict:
    """Every epoch of the final trajectory trains each sample at most once; with `ref_out`, on the same steps."""
    steps = effective_steps(Path(out) / "samples")
    assert list(steps) == list(range(1, len(steps) + 1)), "a step is missing from the sample log"
    for epoch, counts in epoch_counts(steps).items():
        repeated = {i: n for i, n in counts.items() if n > 1}
        assert not repeated, f"epoch {epoch}: samples trained more than once: {repeated}"
    if ref_out is not None:
        ref = effective_steps(Path(ref_out) / "samples")
        assert steps == ref, "the faulted run trained on other samples than the uninterrupted one"
    return steps


# ---------------------------------------------------------------------------------------------- units


def test_sample_log_replays_segments(tmp_path):
    a = SampleLog(tmp_path, rank=0, segment=0, resume_step=0)
    a.step(1, 0, [3, 1])
    a.step(2, 0, [5, 4])
    a.step(3, 0, [9, 8])  # died after this; step 3 is redone from checkpoint step 2
    a.close()
    with open(tmp_path / "seg_0000_rank_00000.jsonl", "a") as f:
        f.write('{"step": 4, "epo')  # a line cut by kill -9
    b = SampleLog(tmp_path, rank=0, segment=1, resume_step=2)
    b.skipped(3, 0, [9, 8])
    b.step(3, 0, [7, 6])
    b.close()
    steps = effective_steps(tmp_path)
    assert steps == {
        1: {"epoch": 0, "index": [1, 3], "skipped": [], "by_epoch": {0: [1, 3]}},
        2: {"epoch": 0, "index": [4, 5], "skipped": [], "by_epoch": {0: [4, 5]}},
        3: {"epoch": 0, "index": [6, 7], "skipped": [8, 9], "by_epoch": {0: [6, 7]}},
    }
    assert epoch_counts(steps) == {0: {1: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}}
    c = SampleLog(tmp_path, rank=0, segment=2, resume_step=3)  # a step that straddles an epoch's end
    c.step(4, 0, [2])
    c.step(4, 1, [1])
    c.close()
    straddle = effective_steps(tmp_path)[4]
    assert straddle["by_epoch"] == {0: [2], 1: [1]} and straddle["index"] == [1, 2]
    assert epoch_counts(effective_steps(tmp_path))[1] == {1: 1}  # sample 1 once in epoch 0, once in epoch 1


def test_faults_parse_and_refuse():
    f = Faults.from_env("nan=5,17; spike=3; ckpt_pause=6:2.5")
    assert f.nan == {5, 17} and f.spike == {3} and f.ckpt_pause == {6: 2.5}
    assert Faults.from_env("") == Faults()
    with pytest.raises(ValueError, match="TESSERA_FAULTS.*boom"):
        Faults.from_env("boom=1")
    batch = {"image": torch.ones(3, 1, 2, 2), "index": torch.tensor([4, 5, 3])}
    out = f.poison(batch)
    assert torch.isnan(out["image"][1]).all() and not torch.isnan(out["image"][[0, 2]]).any()
    assert not torch.isnan(batch["image"]).any()  # the loader's tensor is not modified in place
    assert f.spike_loss([batch], 2.0) == 2e4 and f.spike_loss([{"index": torch.tensor([4])}], 2.0) == 2.0


# ---------------------------------------------------------------------------------------------- loss guard


def test_nan_rolls_back_skips_the_batch_deterministically(tmp_path, digits_shards, monkeypatch, capsys):
    steps = ("train.max_steps=30", "checkpoint.interval=4")
    monkeypatch.setenv("TESSERA_FAULTS", "nan=5")  # sample 5 poisons whichever batch it lands in (step 25)
    assert main(cls_args(tmp_path / "a", digits_shards, *steps)) == 0
    record = json.loads((tmp_path / "a" / "guard.json").read_text())
    ((bad_step, n),) = record["skips"].items()
    assert n == 1 and record["events"][0]["why"] == "non-finite"
    bad_step = int(bad_step)
    events = [json.loads(line) for line in (tmp_path / "a" / "events.jsonl").read_text().splitlines()]
    (rb,) = [e for e in events if e["event"] == "rollback"]
    assert rb["step"] == bad_step and rb["to"] == f"step_{(bad_step - 1) // 4 * 4:08d}"
    assert "rolling back" in capsys.readouterr().out
    log = assert_exactly_once(tmp_path / "a")
    assert 5 in log[bad_step]["skipped"] and all(5 not in e["index"] for e in log.values())
    rows = read_metrics(tmp_path / "a")
    assert [r["step"] for r in rows] == list(range(1, 31))  # the redone steps are logged once
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN reached the metrics

    # The same skip list without the fault: the batch is skipped up front and nothing else changes. This is
    # what a restart from an older checkpoint does, and it proves the rollback's replay was exact.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "guard.json").write_text((tmp_path / "a" / "guard.json").read_text())
    monkeypatch.delenv("TESSERA_FAULTS")
    assert main(cls_args(tmp_path / "b", digits_shards, *steps)) == 0
    assert_same_weights(final_weights(tmp_path / "a", 30), final_weights(tmp_path / "b", 30))
    assert not (tmp_path / "b" / "events.jsonl").read_text().count("rollback")
    assert effective_steps(tmp_path / "b" / "samples") == log


def test_spike_rolls_back(tmp_path, digits_shards, monkeypatch):
    monkeypatch.setenv("TESSERA_FAULTS", "spike=31")
    sets = ("train.max_steps=40", "checkpoint.interval=5", "guard.spike_factor=3", "guard.spike_warmup=5")
    assert main(cls_args(tmp_path / "r", digits_shards, *sets)) == 0
    events = json.loads((tmp_path / "r" / "guard.json").read_text())["events"]
    assert len(events) == 1 and events[0]["why"].startswith("spike:"), events
    log = assert_exactly_once(tmp_path / "r")
    assert 31 in log[events[0]["step"]]["skipped"]
    # without the guard's spike check the same run trains on the spiked batch and logs the spike
    assert main(cls_args(tmp_path / "off", digits_shards, *sets[:2])) == 0
    assert not (tmp_path / "off" / "guard.json").exists()
    step = events[0]["step"]
    assert 31 in effective_steps(tmp_path / "off" / "samples")[step]["index"]
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "off")}
    assert losses[step] > 1000 * losses[step - 1]


def test_divergence_gives_up_with_a_clear_error(tmp_path, digits_shards, capsys):
    run = tmp_path / "r"
    sets = ("train.max_steps=30", "checkpoint.interval=2", "optim.lr=1e4", "guard.max_retries=2")
    assert main(cls_args(run, digits_shards, *sets)) == 3
    err = capsys.readouterr().err
    assert "guard.max_retries=2" in err and "Last good checkpoint: step_00000002" in err
    record = json.loads((run / "guard.json").read_text())
    assert len(record["events"]) == 3 and record["retries"] == 3
    assert (run / "checkpoints" / "step_00000002" / "meta.json").is_file()  # the good checkpoint is intact


def test_nan_before_any_checkpoint_is_a_clear_error(tmp_path, digits_shards, capsys):
    assert main(cls_args(tmp_path / "r", digits_shards, "optim.lr=1e4", "checkpoint.interval=50")) == 3
    assert "no checkpoint to roll back to" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- processes


def start(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Run `cmd` in its own process group (so a test can signal all of it, as Slurm does a job step)."""
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full, start_new_session=True
        )


def logged_steps(out) -> int:
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def wait_until(cond, proc: subprocess.Popen, log_path: Path, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} too early:\n{log_path.read_text()[-4000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"timed out:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.05)


def workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The training processes (ranks) under a launcher, rank order unknown."""
    kids = psutil.Process(proc.pid).children(recursive=True)
    return [k for k in kids if "pretrain.train" in " ".join(k.cmdline()) and k.pid != proc.pid]


def test_sigusr1_checkpoints_exits_75_and_resumes_exactly(tmp_path, digits_shards):
    steps = ("train.max_steps=150", "checkpoint.interval=100", "data.num_workers=2")
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    status = tmp_path / "status.json"
    # the reference runs as a subprocess too: the same thread count, so the same float results
    subprocess.run(
        [sys.executable, "-m", "pretrain.train", *cls_args(ref, digits_shards, *steps)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    cmd = [sys.executable, "-m", "pretrain.train", *cls_args(cut, digits_shards, *steps)]
    proc = start(cmd, tmp_path / "cut.log", {"TESSERA_STATUS_FILE": str(status)})
    wait_until(lambda: logged_steps(cut) >= 20, proc, tmp_path / "cut.log")
    os.killpg(
        proc.pid, signal.SIGUSR1
    )  # the whole group, data-loader workers included, as Slurm signals a step
    assert proc.wait(timeout=120) == EXIT_REQUEUE
    got = json.loads(status.read_text())
    assert got["status"] == "preempted" and got["signal"] == "SIGUSR1"
    stopped = got["step"]
    assert 20 <= stopped < 100 and (cut / "checkpoints" / f"step_{stopped:08d}" / "meta.json").is_file()
    assert "stop requested (SIGUSR1)" in (tmp_path / "cut.log").read_text()
    proc = start(cmd, tmp_path / "cut.log", {"TESSERA_STATUS_FILE": str(status)})
    assert proc.wait(timeout=300) == 0
    assert json.loads(status.read_text()) == {"status": "finished", "step": 150, "signal": None}
    assert f"resumed from {cut}/checkpoints/step_{stopped:08d}" in (tmp_path / "cut.log").read_text()
    assert_same_weights(final_weights(ref, 150), final_weights(cut, 150))
    assert_exactly_once(cut, ref)


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, digits_shards):
    out, status = tmp_path / "run", tmp_path / "status.json"
    args = cls_args(out, digits_shards, "train.max_steps=2000", "checkpoint.interval=1000")
    proc = start(torchrun_cmd(2, args), tmp_path / "run.log", {"TESSERA_STATUS_FILE": str(status)})
    wait_until(lambda: logged_steps(out) >= 10 and len(workers(proc)) == 2, proc, tmp_path / "run.log")
    victim = random.Random(0).choice(workers(proc))
    victim.send_signal(signal.SIGTERM)  # only one rank hears it; the per-step vote stops both
    assert (
        proc.wait(timeout=120) != 0
    )  # torchrun reports the workers' 75 as a failure: the status file says why
    got = json.loads(status.read_text())
    assert got["status"] == "preempted", got
    log = (tmp_path / "run.log").read_text()
    assert log.count(f"checkpoint {out}/checkpoints/step_{got['step']:08d} written") == 1
    meta = json.loads((out / "checkpoints" / f"step_{got['step']:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and len(list((out / "checkpoints").glob("step_*/rank_state/*.pt"))) == 2


def kill_trials(tmp_path, shards, n_kills: int, seed: int, extra: tuple[str, ...] = ()) -> dict:
    """Reference run, then the same run killed -9 (one random rank, at a random step) n_kills times and relaunched
    until it finishes. Returns the figures the note reports."""
    max_steps = 60
    sets = (f"train.max_steps={max_steps}", "checkpoint.interval=3", "checkpoint.keep_last=2", *extra)
    ref, run = tmp_path / "ref", tmp_path / "run"
    torchrun(2, cls_args(ref, shards, *sets))
    rng = random.Random(seed)
    figures = {"kills": 0, "mid_checkpoint": 0, "steps_redone": 0, "launches": 0}
    log_path = tmp_path / "run.log"
    while True:
        proc = start(torchrun_cmd(2, cls_args(run, shards, *sets)), log_path)
        figures["launches"] += 1
        if figures["kills"] == n_kills:
            assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
            break
        # after the first checkpoint (step 3 is saved before step 4 is logged), then anywhere
        target = min(max_steps - 1, max(4, logged_steps(run) + rng.randint(1, 12)))
        wait_until(lambda p=proc, t=target: logged_steps(run) >= t and len(workers(p)) == 2, proc, log_path)
        time.sleep(rng.random() * 0.2)  # anywhere in the step, checkpoint writes included
        victim = rng.choice(workers(proc))
        victim.kill()  # SIGKILL: no handler, no cleanup
        figures["kills"] += 1
        at = logged_steps(run)
        proc.wait(timeout=120)  # torchrun notices and stops the other rank
        ckpts = run / "checkpoints"
        figures["mid_checkpoint"] += len(list(ckpts.glob("step_*.tmp")))
        latest = max(int(p.name[5:]) for p in ckpts.glob("step_*") if is_complete(p))
        figures["steps_redone"] += at - latest
        # every published checkpoint loads
        for p in ckpts.glob("step_*"):
            if is_complete(p):
                torch.load(p / "engine" / "model.pt")
                torch.load(p / "engine" / "optimizer.pt")
    assert_same_weights(final_weights(ref, max_steps), final_weights(run, max_steps))
    steps = assert_exactly_once(run, ref)
    figures["epochs"] = max(e["epoch"] for e in steps.values()) + 1
    figures["resumes"] = (log_path.read_text()).count("resumed from")
    assert figures["resumes"] == n_kills
    return figures


@pytest.mark.slow
def test_kill_9_at_random_steps_loses_and_repeats_nothing(tmp_path, digits_shards):
    figures = kill_trials(tmp_path, digits_shards, n_kills=5, seed=int(os.environ.get("KILL_SEED", "1")))
    print("kill -9 figures:", json.dumps(figures))
    assert figures["epochs"] >= 2  # the run crosses an epoch boundary


def test_kill_9_during_checkpoint_write_keeps_the_previous_one(tmp_path, digits_shards):
    sets = ("train.max_steps=12", "checkpoint.interval=4")
    ref, run = tmp_path / "ref", tmp_path / "run"
    torchrun(2, cls_args(ref, digits_shards, *sets))
    log_path = tmp_path / "run.log"
    cmd = torchrun_cmd(2, cls_args(run, digits_shards, *sets))
    proc = start(cmd, log_path, {"TESSERA_FAULTS": "ckpt_pause=8:6"})
    tmp_ckpt = run / "checkpoints" / "step_00000008.tmp"
    wait_until(lambda: "inside the checkpoint write of step 8" in log_path.read_text(), proc, log_path)
    assert tmp_ckpt.is_dir() and not (tmp_ckpt / "meta.json").exists()
    random.Random(2).choice(workers(proc)).kill()
    proc.wait(timeout=120)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    proc = start(cmd, log_path)
    assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    text = log_path.read_text()
    assert f"removing incomplete checkpoint {tmp_ckpt}" in text and "at step 4" in text
    assert_same_weights(final_weights(ref, 12), final_weights(run, 12))
    assert_exactly_once(run, ref)


def test_only_unmapped_streaming_segments_are_cleaned():
    from multiprocessing import shared_memory

    from pretrain.data.compat import import_streaming
    from pretrain.data.shm import _STREAMING_NAME, clean_stale_segments

    names = import_streaming().base.constant.SHM_TO_CLEAN
    assert all(_STREAMING_NAME.match(f"000123_{n}") for n in names)
    live = shared_memory.SharedMemory("999998_locals", create=True, size=64)  # mapped by this process
    try:
        Path("/dev/shm/999997_locals").write_bytes(b"\0" * 64)  # what a kill -9 leaves behind
        Path("/dev/shm/999997_not_streaming").write_bytes(b"\0")
        removed = clean_stale_segments()
        assert "999997_locals" in removed and "999998_locals" not in removed
        assert Path("/dev/shm/999998_locals").exists() and Path("/dev/shm/999997_not_streaming").exists()
    finally:
        live.close()
        live.unlink()
        Path("/dev/shm/999997_not_streaming").unlink(missing_ok=True)


def test_global_batch_size_derives_accumulation_and_resume_checks_it(tmp_path, digits_shards, capsys):
    from pretrain.build import load_config
    from pretrain.config import ConfigError, resolve_batch

    cfg = load_config(CLASSIFY, ["train.global_batch_size=64"])
    resolve_batch(cfg, 2)
    assert cfg.train.grad_accum_steps == 2  # 64 = 16 x 2 x 2 ranks
    with pytest.raises(ConfigError, match="train.global_batch_size: 64 is not a multiple"):
        resolve_batch(load_config(CLASSIFY, ["train.global_batch_size=64"]), 3)
    run = tmp_path / "r"
    assert main(cls_args(run, digits_shards, "train.max_steps=2", "train.global_batch_size=32")) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(cls_args(run, digits_shards, "train.max_steps=4")) == 2  # 16 per step now, 32 before
    err = capsys.readouterr().err
    assert "global batch of 32" in err and "train.grad_accum_steps=2" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # refused, nothing touched


_RACE_JOB = r"""
import os, sys, time
from pathlib import Path

from pretrain.data import DataConfig, build_train_loader
from pretrain.data.compat import import_streaming
from pretrain.dist import DistContext

streaming = import_streaming()
prefix = streaming.base.shared.prefix
walk = prefix._check_and_find
last = streaming.base.constant.SHM_TO_CLEAN[-1]  # the walks go name by name; then `<prefix>_locals` is created


def slow_walk(local, remote, shm_name):  # widen streaming's window between finding a prefix and creating it
    found = walk(local, remote, shm_name)
    if shm_name == last:
        time.sleep(1.0)
    return found


prefix._check_and_find = slow_walk
work, me, shards = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
(work / f"ready-{me}").touch()
while not (work / "go").exists():
    time.sleep(0.01)
cfg = DataConfig(dataset="digits", local=shards, image_size=8, num_workers=0)
with build_train_loader(cfg, DistContext(), micro_batch_size=8, seed=1) as loader:
    next(iter(loader.loader))
print("prefix", loader.dataset._shm_prefix_int)
"""


def test_jobs_starting_together_on_one_node_all_get_a_streaming_prefix(tmp_path, digits_shards):
    """Three runs start at the same instant (a job array, or gpu_check's A/B/C): streaming alone would hand
    them one prefix, and all but one would die with FileExistsError on `<prefix>_locals`."""
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_JOB, str(tmp_path), str(i), digits_shards],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("ready-*"))) < 3:
            assert time.monotonic() < deadline and all(j.poll() is None for j in jobs), [
                j.communicate()[0][-2000:] for j in jobs if j.poll() is not None
            ]
            time.sleep(0.05)
        (tmp_path / "go").touch()
        outs = [j.communicate(timeout=120)[0] for j in jobs]
    finally:
        for j in jobs:
            if j.poll() is None:
                j.kill()
    assert [j.returncode for j in jobs] == [0, 0, 0], [o[-2000:] for o in outs]
    assert all("prefix " in o for o in outs), outs
