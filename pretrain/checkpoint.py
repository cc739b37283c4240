"""Atomic, exact checkpoints: engine state + step + samples seen + data-loader position + RNG + config.

Layout under <run.output_dir>/checkpoints/:
    step_00000100/            one complete checkpoint
        engine/               the engine's own files (model + optimizer; sharded under ZeRO)
        rank_state/rank_00000.pt   per-rank RNG states and data-loader state
        config.yaml           the resolved config
        meta.json             written last: step, samples seen, engine, world size
    latest                    name of the newest complete checkpoint
Every rank writes into step_XXXXXXXX.tmp/; only when all have finished does rank 0 write meta.json and rename
the folder into place, then repoint `latest`. A crash mid-write leaves a .tmp folder that is never read (and
is removed at the next start), so the previous checkpoint stays loadable.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from pretrain.config import ConfigError
from pretrain.dist import DistContext
from pretrain.engine import Engine

log = logging.getLogger("tessera")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and folder.suffix not in (".tmp", ".old") and (folder / "meta.json").is_file()


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (a run's checkpoints/ folder), or None.

    Found by scanning, not from the `latest` pointer (written for people and tools): a crash between the
    rename and the pointer update must not hide the newest complete checkpoint.
    """
    done = sorted(p for p in Path(root).glob("step_*") if is_complete(p))  # zero-padded names sort by step
    return done[-1] if done else None


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder`, then the folders themselves, so a rename publishes whole files."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [*sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True), folder, folder.parent]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Keys a run cannot change and continue: the weights' shapes, what they learn, how they are sharded, and which
# samples come in which order. Anything else (lr, intervals, output options, max_steps) may change on resume.
FROZEN_KEYS = (
    "model",
    "objective",
    "engine.backend",
    "engine.zero_stage",
    "engine.precision",
    "seed",
    "data.dataset",
    "data.split",
    "data.max_samples",
    "data.image_size",
    "data.shuffle",
    "data.augment",
    "train.micro_batch_size",
)


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_resumable(folder: Path, config_yaml: str, world_size: int | None = None) -> None:
    """Refuse to resume what cannot continue: another model, objective, engine layout, data order or global batch.

    The world size may change (elastic resume) when the global batch stays the same: micro_batch_size x
    grad_accum_steps x world_size, so that every step still covers the same samples in the same order.
    """
    old, new = yaml.safe_load((Path(folder) / "config.yaml").read_text()), yaml.safe_load(config_yaml)
    for key in FROZEN_KEYS:
        a, b = _get(old, key), _get(new, key)
        if a != b:
            raise ConfigError(
                f"{key}: differs from checkpoint {folder} ({a} there, {b} now); resume with the "
                "same value, or use a new run.output_dir to start over"
            )
    if world_size is None:
        return
    old_world = read_meta(folder).get("world_size", world_size)
    accum, micro = _get(old, "train.grad_accum_steps"), _get(old, "train.micro_batch_size")
    before = micro * accum * old_world
    now = _get(new, "train.micro_batch_size") * _get(new, "train.grad_accum_steps") * world_size
    if before != now:
        hint = ""
        if before % (micro * world_size) == 0:
            hint = f"; with {world_size} ranks use train.grad_accum_steps={before // (micro * world_size)}"
        raise ConfigError(
            f"train.grad_accum_steps: checkpoint {folder} was trained with a global batch of {before} "
            f"({micro} x {accum} x {old_world} ranks) and this run has {now}{hint} (or set "
            f"train.global_batch_size={before}, which derives it from the world size)"
        )
    for key in ("train.max_steps", "optim"):
        if _get(old, key) != _get(new, key):
            log.warning("resuming with a changed %s (%s -> %s)", key, _get(old, key), _get(new, key))


def read_meta(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {folder} has no readable meta.json ({e})") from e


class Checkpointer:
    def __init__(self, root: Path, ctx: DistContext, keep_last: int):
        self.root, self.ctx, self.keep_last = Path(root), ctx, keep_last
        if ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in [*self.root.glob("step_*.tmp"), *self.root.glob("step_*.old")]:  # a crash mid-write
                log.warning("removing incomplete checkpoint %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
        ctx.barrier()

    def latest(self) -> Path | None:
        return find_latest(self.root)

    def save(
        self,
        step: int,
        engine: Engine,
        meta: dict,
        rank_state: dict,
        config_yaml: str,
        before_publish: Callable[[], None] | None = None,
    ) -> Path:
        """Write step_XXXXXXXX.tmp/ on every rank, then publish it by rename. `before_publish` runs on every
        rank once its files are written (a fault-injection window: pretrain.faults)."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rank_state").mkdir(parents=True)
        self.ctx.barrier()
        t0 = time.time()
        engine.save(tmp / "engine")
        torch.save({**rank_state, "rng": rng_state()}, tmp / "rank_state" / f"rank_{self.ctx.rank:05d}.pt")
        if before_publish is not None:
            before_publish()
        self.ctx.barrier()  # every rank's files are on disk
        if self.ctx.is_main:
            (tmp / "config.yaml").write_text(config_yaml)
            meta = {**meta, "step": step, "world_size": self.ctx.world_size, "saved_at": time.time()}
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
            _fsync_tree(tmp)
            if final.exists():  # same step saved again: move the old copy aside, never leave the step empty
                old = final.with_name(final.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            write_atomic(self.root / "latest", final.name + "\n")
            self._prune()
            log.info("checkpoint %s written in %.1fs", final, time.time() - t0)
        self.ctx.barrier()
        return final

    def _prune(self) -> None:
        """Delete all but the newest keep_last complete checkpoints. Each is unpublished first (renamed to
        .old): a kill -9 mid-delete leaves an .old folder, removed at the next start, never a half-deleted
        checkpoint whose meta.json still says it is complete."""
        done = sorted(p for p in self.root.glob("step_*") if is_complete(p))
        for old in done[: -self.keep_last]:
            trash = old.with_name(old.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def load(self, folder: Path, engine: Engine) -> tuple[dict, dict]:
        """Restore engine state into `engine`; return (meta, this rank's state) and restore RNG.

        Elastic: a checkpoint written by another number of ranks is resharded by the engine, and every rank
        takes rank 0's state. The loader state is the same on every rank; RNG state is not restored then (a
        new rank has none, and `pretrain.loop.seed_step` reseeds every step from (seed, step, rank) anyway).
        """
        meta = read_meta(folder)
        saved_world = meta.get("world_size", self.ctx.world_size)
        if saved_world == self.ctx.world_size:
            engine.load(folder / "engine")
            state = torch.load(folder / "rank_state" / f"rank_{self.ctx.rank:05d}.pt", weights_only=False)
            set_rng_state(state.pop("rng"))
            return meta, state
        t0 = time.time()
        engine.load_resharded(folder / "engine")
        state = torch.load(folder / "rank_state" / f"rank_{0:05d}.pt", weights_only=False)
        state.pop("rng")
        if self.ctx.is_main:
            log.info(
                "elastic resume: %s was written by %d ranks, loaded on %d in %.1fs",
                folder,
                saved_world,
                self.ctx.world_size,
                time.time() - t0,
            )
        return meta, state
