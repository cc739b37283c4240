"""Corrupt inputs: a sample that does not decode, a shard truncated or deleted mid-run, a remote missing a shard.

Each must give a ShardError naming the file (or, with data.bad_samples=skip, a counted skip), within seconds and
with the same message from DataLoader worker processes; end to end, `pretrain.train` exits 2 with `error: ...`.
Corrupt copies are made from the session's digits shards (one shard of 1437 PNG samples) by editing bytes in
place, so validate_shards (sizes only) still passes and only decoding can notice.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.config import ConfigError
from pretrain.data import DataConfig, ShardError, build_train_loader, validate_shards
from pretrain.dist import DistContext
from tests.conftest import ROOT

CLASSIFY = str(ROOT / "configs" / "classify_tiny.yaml")


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging the suite if the block takes longer than `seconds`."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _shard(shard_dir: Path) -> tuple[Path, dict]:
    entry = json.loads((shard_dir / "index.json").read_text())["shards"][0]
    return shard_dir / entry["raw_data"]["basename"], entry


def _png_span(shard_dir: Path, row: int) -> tuple[int, int]:
    """(offset, length) of the PNG bytes of `row` in the first shard, from the MDS layout: a uint32 sample count,
    count + 1 uint32 sample offsets, then per sample a uint32 size per variable-size column and the columns'
    bytes in index order ("image" first)."""
    path, entry = _shard(shard_dir)
    assert entry["column_names"][0] == "image" and entry["column_sizes"][0] is None
    data = path.read_bytes()
    begin = int(np.frombuffer(data, np.uint32, count=1, offset=4 * (1 + row))[0])
    variable = sum(size is None for size in entry["column_sizes"])
    length = int(np.frombuffer(data, np.uint32, count=1, offset=begin)[0])
    start = begin + 4 * variable
    assert data[start : start + 8] == b"\x89PNG\r\n\x1a\n"
    return start, length


def corrupt(shard_dir: Path, rows: list[int], how: str = "header") -> Path:
    """Flip bytes of the PNGs of `rows` in place: "header" breaks the signature (Image.open fails), "pixels"
    the compressed pixel stream (decoding fails only when the pixels are loaded). Same size: validate passes."""
    path, _ = _shard(shard_dir)
    data = bytearray(path.read_bytes())
    for row in rows:
        start, length = _png_span(shard_dir, row)
        span = range(start, start + 8) if how == "header" else range(start + length // 2, start + length - 12)
        for i in span:
            data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    validate_shards(str(shard_dir))
    return path


@pytest.fixture
def shards(digits_shards, tmp_path) -> Path:
    """A private copy of the digits shards, to damage."""
    copy = tmp_path / "shards"
    shutil.copytree(digits_shards, copy)
    return copy


def _cfg(local: Path, **kw) -> DataConfig:
    base = dict(dataset="digits", local=str(local), image_size=8, num_workers=0, shuffle=False, augment=False)
    return DataConfig(**{**base, **kw})


def _error_within(loader, batches: int) -> ShardError:
    """The ShardError the loader raises within `batches` batches (fails if none)."""
    with pytest.raises(ShardError) as err:
        for _ in range(batches):
            next(loader)
    return err.value


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bad_samples": "ignore"}, "data.bad_samples: must be 'error' or 'skip', got 'ignore'"),
        ({"max_bad_samples": -1}, "data.max_bad_samples: must be >= 0, got -1"),
    ],
)
def test_config_keys_validated(kwargs, message):
    DataConfig(bad_samples="skip", max_bad_samples=0).validate()
    with pytest.raises(ConfigError) as err:
        DataConfig(**kwargs).validate()
    assert str(err.value) == message


# ---------------------------------------------------------------------------------------------- undecodable sample


@pytest.mark.parametrize(
    "num_workers, how, decoder",
    [
        (0, "header", "UnidentifiedImageError: cannot identify image file"),
        (0, "pixels", "OSError: broken data stream"),
        (2, "header", "UnidentifiedImageError: cannot identify image file"),
    ],
)
def test_undecodable_image_names_shard_sample_and_column(shards, num_workers, how, decoder):
    path = corrupt(shards, [21], how)
    with (
        deadline(60),
        build_train_loader(_cfg(shards, num_workers=num_workers), DistContext(), 8, 0) as loader,
    ):
        if num_workers == 0:  # in order: batches 0 and 1 (samples 0-15) are whole, batch 2 holds sample 21
            next(loader), next(loader)
        message = str(_error_within(loader, loader.batches_per_epoch))
    expected = f"{path}: sample 21 (row 21 of the shard), column 'image': cannot decode: {decoder}"
    assert message.startswith(expected), message  # the same text from a worker process as from the main one
    assert message.endswith("; data.bad_samples=skip skips and counts such samples")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_drops_counts_and_resumes_exactly(shards, num_workers):
    bad = [5, 6, 40]
    corrupt(shards, bad, "header")
    cfg = _cfg(shards, num_workers=num_workers, bad_samples="skip", shuffle=True, augment=True)
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 3) as loader:
        epoch = [next(loader) for _ in range(loader.batches_per_epoch)]
        assert loader.epoch == 0 and loader.bad_samples == 3 and sorted(loader.last_bad_samples) == bad
        assert all("bad" not in b for b in epoch)
    seen = torch.cat([b["index"] for b in epoch]).tolist()
    sizes = [len(b["index"]) for b in epoch]
    assert len(seen) == len(set(seen)) == 1432 - 3  # 1437 // 8 * 8 = 1432 fetched, the partial batch dropped
    assert not set(seen) & set(bad) and sum(s < 8 for s in sizes) in (2, 3)  # 5 and 6 may share a batch
    assert all(len(b["image"]) == len(b["label"]) == s for b, s in zip(epoch, sizes))

    # The resume position counts skipped samples as consumed: the tail after a resume is the same, bit for bit.
    k = 200  # into the second epoch (179 batches each), past all three skips of the first
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 3) as loader:
        head = [next(loader)["index"] for _ in range(k)]
        state = json.loads(json.dumps(loader.state_dict()))
        ref = [next(loader) for _ in range(20)]
    assert state["bad_samples"] >= 3 and state["samples_seen"] == 8 * k
    assert torch.equal(torch.cat(head[: len(epoch)]), torch.cat([b["index"] for b in epoch]))
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 3) as loader:
        loader.load_state_dict(state)
        tail = [next(loader) for _ in range(20)]
    for a, b in zip(ref, tail):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])


def test_bad_sample_count_survives_resume(shards):
    """TrainLoader.load_state_dict restores state["bad_samples"]: data.max_bad_samples counts the whole run."""
    corrupt(shards, [3, 9, 20], "header")
    cfg = _cfg(shards, bad_samples="skip", max_bad_samples=2)
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 0) as loader:
        next(loader), next(loader)  # samples 0-15: 3 and 9 skipped, at the limit
        state = loader.state_dict()
    assert state["bad_samples"] == 2
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 0) as loader:
        loader.load_state_dict(state)
        assert loader.bad_samples == 2
        message = str(_error_within(loader, 1))  # samples 16-23: 20 is the third
    assert message.startswith("data.max_bad_samples: rank 0 has skipped 3 bad samples"), message


def test_skip_limit_is_a_named_error(shards):
    path = corrupt(shards, [2, 11, 12], "pixels")
    cfg = _cfg(shards, bad_samples="skip", max_bad_samples=2)
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 0) as loader:
        assert len(next(loader)["index"]) == 7  # sample 2 skipped: 1 of 2 allowed
        message = str(_error_within(loader, 1))  # samples 11 and 12: 3 > 2
        assert loader.bad_samples == 3 and loader.last_bad_samples == [2, 11, 12]
    assert message.startswith(
        "data.max_bad_samples: rank 0 has skipped 3 bad samples, more than the limit of 2; the last: "
        f"{path}: sample 12 (row 12 of the shard), column 'image': cannot decode: OSError"
    ), message


def test_batch_of_only_bad_samples_is_replaced_by_the_next(shards):
    corrupt(shards, [4, 5, 6, 7], "header")  # all of batch 1 (shuffle off, 4 per batch)
    cfg = _cfg(shards, bad_samples="skip")
    with deadline(60), build_train_loader(cfg, DistContext(), 4, 0) as loader:
        got = [next(loader)["index"].tolist() for _ in range(3)]
        state = loader.state_dict()
        assert loader.bad_samples == 4 and loader.last_bad_samples == [4, 5, 6, 7]
    assert got == [[0, 1, 2, 3], [8, 9, 10, 11], [12, 13, 14, 15]]
    # four batches were consumed: streaming resumes after sample 15, TrainLoader counted 4 batches
    assert state["streaming"]["sample_in_epoch"] == 16 and state["batch_in_epoch"] == 4
    with deadline(60), build_train_loader(cfg, DistContext(), 4, 0) as loader:
        loader.load_state_dict(state)
        assert next(loader)["index"].tolist() == [16, 17, 18, 19]


def test_batch_of_only_bad_samples_is_an_error_with_several_ranks(shards):
    """With several ranks, the rank that skipped a whole batch would run one batch ahead of the others and meet
    them in different collectives (a hang at the epoch's end): it stops with a named error instead."""
    corrupt(shards, [4, 5, 6, 7], "header")
    with deadline(60), build_train_loader(_cfg(shards, bad_samples="skip"), DistContext(), 4, 0) as loader:
        loader.world_size = (
            2  # the decision depends on the world size only; the partitioning is not exercised
        )
        message = str(_error_within(loader, 3))
    assert "every sample of a micro-batch on rank 0 was undecodable (ids [4, 5, 6, 7])" in message, message


def test_every_batch_bad_is_an_error_not_a_spin(shards):
    corrupt(shards, list(range(1437)), "header")
    cfg = _cfg(shards, bad_samples="skip", max_bad_samples=10**6)
    with deadline(60), build_train_loader(cfg, DistContext(), 16, 0) as loader:
        message = str(_error_within(loader, 1))
    assert message.startswith("data.bad_samples: rank 0 skipped every sample of more than an epoch"), message


# ---------------------------------------------------------------------------------------------- shard files


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_shard_damaged_mid_run(shards, num_workers, damage):
    path, entry = _shard(shards)
    cfg = _cfg(shards, num_workers=num_workers, bad_samples="skip")  # never skipped: a shard-level error
    t0 = time.perf_counter()
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 0) as loader:
        next(loader)
        if damage == "truncate":
            with open(path, "r+b") as f:
                f.truncate(1000)
        else:
            path.unlink()
        message = str(_error_within(loader, loader.batches_per_epoch))
    assert time.perf_counter() - t0 < 30
    if damage == "truncate":
        assert message == (
            f"{path}: truncated: expected {entry['raw_data']['bytes']} bytes, got 1000 (changed after the run started?)"
        )
    else:
        assert message == (
            f"{path}: missing shard file (listed in {shards / 'index.json'}; deleted after the run started?)"
        )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_remote_missing_or_truncated_shard(shards, tmp_path, num_workers):
    """The remote passes validate_shards at start, then loses a shard (or has it cut) before it is fetched."""
    path, entry = _shard(shards)
    cache = tmp_path / "cache"
    cfg = DataConfig(
        dataset="digits", remote=str(shards), local=str(cache), image_size=8, num_workers=num_workers
    )
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 0) as loader:
        saved = path.read_bytes()
        path.unlink()  # streaming fetches nothing before the first batch is asked for
        message = str(_error_within(loader, 2))
    assert message.startswith(
        f"{path}: cannot fetch shard 0 into {cache / path.name}: FileNotFoundError: [Errno 2] No such file"
    ), message

    path.write_bytes(saved)
    shutil.rmtree(cache)
    with deadline(60), build_train_loader(cfg, DistContext(), 8, 0) as loader:
        path.write_bytes(saved[:5000])  # cut after validate_shards passed: the cache gets a truncated copy
        message = str(_error_within(loader, 2))
    assert message == (
        f"{cache / path.name}: truncated: expected {entry['raw_data']['bytes']} bytes, got 5000 "
        f"(the local copy of {path}; delete it to fetch it again)"
    )


# ---------------------------------------------------------------------------------------------- end to end


def _train(out: Path, shards: Path, *sets: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """classify_tiny on `shards` read in order (sample k at step k // 16 + 1 on one rank), 120 s at most."""
    run = [sys.executable, "-m", "pretrain.train"]
    if nproc > 1:
        run = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *run[1:],
        ]
    args = [
        f"run.output_dir={out}",
        f"data.local={shards}",
        "run.progress=false",
        "data.shuffle=false",
        *sets,
    ]
    cmd = [*run, CLASSIFY] + [a for s in args for a in ("--set", s)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_train_exits_2_naming_the_shard(shards, tmp_path):
    path = corrupt(shards, [40], "header")  # step 3 of classify_tiny (16 per step, in order)
    proc = _train(tmp_path / "run", shards)
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = f"error: {path}: sample 40 (row 40 of the shard), column 'image': cannot decode: UnidentifiedImageError"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-3000:]  # one line, no traceback
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_train_skip_mode_trains_to_the_end(shards, tmp_path):
    corrupt(shards, [40, 41, 200], "pixels")
    out = tmp_path / "run"
    proc = _train(out, shards, "data.bad_samples=skip", "data.num_workers=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    skips = [line for line in proc.stdout.splitlines() if "skipped bad sample" in line]
    assert len(skips) == 3 and "rank 0 skipped bad sample 200 (3 so far)" in skips[-1], proc.stdout[-3000:]
    state = torch.load(
        out / "checkpoints" / "step_00000020" / "rank_state" / "rank_00000.pt", weights_only=False
    )
    assert state["loader"]["bad_samples"] == 3


@pytest.mark.parametrize("sample", [40, 41])  # unshuffled, rank r reads samples 2k + r: each rank in turn
def test_two_ranks_one_bad_sample_exits_in_bounded_time(shards, tmp_path, sample):
    """Only one rank reads the bad sample; the other waits in a collective. The run must end, not hang."""
    path = corrupt(shards, [sample], "header")
    t0 = time.perf_counter()
    proc = _train(tmp_path / "run", shards, nproc=2)
    assert proc.returncode != 0
    tail = proc.stderr[-4000:]
    assert f"error: {path}: sample {sample} (row {sample} of the shard), column 'image'" in proc.stderr, tail
    print(f"2-rank run ended with exit {proc.returncode} after {time.perf_counter() - t0:.1f} s")
