"""Stored teacher outputs: write them once, check them.

    python -m pretrain.distill save-teacher CONFIG [--epochs E] [--check] [--set key=value ...]
    python -m pretrain.distill check CONFIG [--samples N] [--set key=value ...]

CONFIG is the student's config: objective `distill` with `teacher` (+ `teacher_weights`) and `teacher_outputs: DIR`.
`save-teacher` runs the teacher over E epochs (default `objective.save_epochs`, else the epochs `train.steps` x the
global batch need; `train.max_steps`) of exactly the augmented views the student's loader will make ((seed, epoch, sample id) fix each
one: pretrain.data.stream.sample_seed), and stores each sample's top-`objective.topk` probabilities at
`objective.temperature` (pretrain/teacher_store.py). Under torchrun / accelerate each rank runs a share of fixed
chunks of sample ids; rank 0 writes each epoch atomically once all shares are in. Epochs already complete are kept
(a killed save resumes at the first missing epoch); a store made by another teacher, data, augmentation, seed,
temperature or k is refused, naming the field. The bytes written do not depend on the world size, the worker count
or the epoch it started from.

`check` recomputes the records of N random (epoch, sample) pairs and prints the mean absolute error of the stored
probabilities and the rate of class indices that differ.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.errors import ConfigError

CHUNK = 256  # sample ids per teacher forward: fixed, so the teacher sees the same batches on any world size


class _Views(torch.utils.data.Dataset):
    """Chunk c -> (ids (n,), views (n, C, S, S)): the student's augmented views of epoch `epoch`."""

    def __init__(self, shard_dir: str, decoder, seed: int, epoch: int, chunks: list[int], count: int):
        self.shard_dir, self.decoder, self.seed, self.epoch = shard_dir, decoder, seed, epoch
        self.chunks, self.count = chunks, count
        self._reader = None

    def __len__(self) -> int:
        return len(self.chunks)

    def view(self, sample_id: int) -> torch.Tensor:
        """What TesseraStreamingDataset.get_item gives the student for this sample in this epoch."""
        from pretrain.data.compat import import_streaming
        from pretrain.data.stream import sample_seed

        if self._reader is None:
            self._reader = import_streaming().LocalDataset(self.shard_dir)
        parsed = self.decoder.parse(self._reader[sample_id])
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, sample_id))
        return self.decoder.finish(parsed, sample_id, gen)["image"]

    def __getitem__(self, i: int):
        c = self.chunks[i]
        ids = list(range(c * CHUNK, min((c + 1) * CHUNK, self.count)))
        return torch.tensor(ids, dtype=torch.int64), torch.stack([self.view(j) for j in ids])


def load_student_config(path: str, overrides: list[str]):
    """The student's config, validated, without building its objective (its store may not exist yet)."""
    from pretrain import config as config_tree
    from pretrain.build import from_dict

    cfg = from_dict(config_tree.read_tree(path, overrides))
    cfg.validate()
    from pretrain.objectives.distill import DistillConfig

    od = cfg.objective
    if not isinstance(od, DistillConfig):
        raise ConfigError(f"objective.name: save-teacher reads a distill config, got {type(od).__name__}")
    if not od.teacher or not od.teacher_outputs:
        raise ConfigError(
            "objective.teacher_outputs: save-teacher needs objective.teacher and objective.teacher_outputs"
        )
    if cfg.data.streams:
        raise ConfigError(
            "data.streams: stored teacher outputs are keyed by one dataset's sample ids; use one dataset"
        )
    if od.feature_weight > 0:
        raise ConfigError("objective.feature_weight: stored outputs hold top-k probabilities only")
    return cfg


def needed_epochs(cfg, count: int, world_size: int) -> int:
    """Epochs a student run of train.steps x the global batch goes through (at least one)."""
    t = cfg.train
    global_batch = t.global_batch_size or t.micro_batch_size * t.grad_accum_steps * world_size
    per_epoch = max(1, count // global_batch)
    return max(1, math.ceil(t.max_steps / per_epoch))


class Saver:
    """Everything save-teacher and check share: the teacher, the shards, the views, the store's identity."""

    def __init__(self, cfg, ctx):
        from pretrain.data import ensure_shards
        from pretrain.data.compat import import_streaming
        from pretrain.data.stream import sample_decoder
        from pretrain.objectives.distill import load_configured_teacher, teacher_identity
        from pretrain.teacher_store import FORMAT, data_identity, index_dtype

        self.cfg, self.ctx, od = cfg, ctx, cfg.objective
        self.root = Path(od.teacher_outputs)
        self.teacher = load_configured_teacher(od, cfg.data).to(ctx.device)
        c = self.teacher.num_classes
        if c == 0:
            raise ConfigError(
                f"objective.teacher: {self.teacher.description} has no classifier head to store"
            )
        if od.topk > c:
            raise ConfigError(f"objective.topk: {od.topk} is more than the teacher's {c} classes")
        self.shard_dir = ensure_shards(cfg.data, ctx)
        self.count = len(import_streaming().LocalDataset(self.shard_dir))
        self.decoder = sample_decoder(cfg.data, None)
        from pretrain.objectives.distill import student_input

        self.student = student_input(cfg.data)
        self.meta = {
            "format": FORMAT,
            "teacher": teacher_identity(od, self.teacher),
            "data": data_identity(cfg.data, self.shard_dir, self.count),
            "seed": cfg.seed,
            "temperature": od.temperature,
            "k": od.topk,
            "num_classes": c,
            "value_dtype": "float16",
            "index_dtype": index_dtype(c).name,
        }

    def records(self, epoch: int, chunks: list[int], num_workers: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), records (n, R)) of `chunks` in `epoch`."""
        from pretrain.teacher_store import encode, seed32

        views = _Views(self.shard_dir, self.decoder, self.cfg.seed, epoch, chunks, self.count)
        loader = torch.utils.data.DataLoader(views, batch_size=None, num_workers=num_workers)
        all_ids, all_recs = [], []
        od = self.cfg.objective
        for ids, x in loader:
            logits = self.teacher(x.to(self.ctx.device), self.student)["logits"]  # (n, C) fp32
            probs = F.softmax(logits / od.temperature, dim=-1)
            top = probs.topk(od.topk, dim=-1)  # sorted, largest first
            seeds = np.array([seed32(self.cfg.seed, epoch, int(i)) for i in ids], dtype=np.uint32)
            all_ids.append(ids.numpy())
            all_recs.append(encode(seeds, top.values, top.indices, self.teacher.num_classes))
        if not all_ids:
            return np.empty(0, np.int64), np.empty((0, 0), np.uint8)
        return np.concatenate(all_ids), np.concatenate(all_recs)


def save_teacher(cfg, ctx, epochs: int | None = None, log=print) -> Path:
    from pretrain.teacher_store import STORE_META, compare, epoch_dir, read_meta, write_epoch, write_meta

    saver = Saver(cfg, ctx)
    od, root = cfg.objective, saver.root
    e_total = epochs or od.save_epochs or needed_epochs(cfg, saver.count, ctx.world_size)
    meta = dict(saver.meta)
    if (root / STORE_META).is_file():
        old = read_meta(root)
        compare(old, saver.meta, f"{root}/{STORE_META}")  # same teacher, data, views, seed, T, k: or refuse
        meta["epochs"] = [e for e in old.get("epochs", []) if (epoch_dir(root, e) / "index.json").is_file()]
    else:
        meta["epochs"] = []
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        write_meta(root, meta)
    ctx.barrier()
    n_chunks = math.ceil(saver.count / CHUNK)
    for epoch in range(e_total):
        if epoch in meta["epochs"]:
            continue
        t0 = time.time()
        mine = list(range(ctx.rank, n_chunks, ctx.world_size))
        ids, recs = saver.records(epoch, mine, cfg.data.num_workers)
        parts = root / f"epoch_{epoch:04d}.parts"
        if ctx.is_main:
            shutil.rmtree(parts, ignore_errors=True)
            parts.mkdir(parents=True)
        ctx.barrier()
        tmp = parts / f"rank{ctx.rank}.tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, recs=recs)
        os.replace(tmp, parts / f"rank{ctx.rank}.npz")
        ctx.barrier()
        if ctx.is_main:
            loaded = [np.load(parts / f"rank{r}.npz") for r in range(ctx.world_size)]
            all_ids = np.concatenate([p["ids"] for p in loaded])
            all_recs = np.concatenate([p["recs"] for p in loaded if p["recs"].size])
            order = np.argsort(all_ids, kind="stable")
            if not np.array_equal(all_ids[order], np.arange(saver.count)):
                raise RuntimeError(f"{parts}: the ranks' shares do not cover samples 0..{saver.count - 1}")
            write_epoch(root, epoch, all_recs[order])
            meta["epochs"] = sorted({*meta["epochs"], epoch})
            write_meta(root, meta)
            shutil.rmtree(parts, ignore_errors=True)
            log(
                f"[save-teacher] epoch {epoch + 1}/{e_total}: {saver.count} records of {all_recs.shape[1]} bytes "
                f"in {time.time() - t0:.1f} s -> {epoch_dir(root, epoch)}"
            )
        meta["epochs"] = sorted({*meta["epochs"], epoch})
        ctx.barrier()
    return root


def check(cfg, ctx, samples: int = 256, seed: int = 0) -> dict:
    """Recompute `samples` random (epoch, id) records; mean |stored - recomputed| probability and the rate of
    class indices that differ."""
    from pretrain.teacher_store import TeacherStore, compare, decode, epoch_dir, read_epoch

    saver = Saver(cfg, ctx)
    store = TeacherStore(saver.root, cfg.seed)
    compare(store.meta, saver.meta, f"{saver.root}/store.json")
    epochs = store.epochs
    if not epochs:
        raise ConfigError(f"objective.teacher_outputs: {saver.root} has no complete epoch")
    g = np.random.default_rng(seed)
    picks = sorted({(int(g.choice(epochs)), int(g.integers(saver.count))) for _ in range(samples)})
    err, mismatched, total, n = 0.0, 0, 0, 0
    for epoch in sorted({e for e, _ in picks}):
        ids = [i for e, i in picks if e == epoch]
        stored = read_epoch(saver.root, epoch, store.record_size)[ids]
        views = _Views(saver.shard_dir, saver.decoder, cfg.seed, epoch, [], saver.count)
        x = torch.stack([views.view(i) for i in ids]).to(ctx.device)
        probs = F.softmax(saver.teacher(x, saver.student)["logits"] / cfg.objective.temperature, dim=-1)
        top = probs.topk(store.k, dim=-1)
        _, p, c = decode(stored, store.k, store.num_classes)
        err += float((torch.from_numpy(p.astype(np.float32)) - top.values.cpu()).abs().sum())
        mismatched += int((torch.from_numpy(c.astype(np.int64)) != top.indices.cpu()).sum())
        total += p.size
        n += len(ids)
        if not (epoch_dir(saver.root, epoch) / "index.json").is_file():
            raise RuntimeError(f"{epoch_dir(saver.root, epoch)} vanished while checking")
    return {"records": n, "mean_abs_error": err / total, "index_mismatch_rate": mismatched / total}


def _print_check(out: dict, ctx) -> None:
    if ctx.is_main:
        print(
            f"[check] {out['records']} records: mean |stored - recomputed| probability "
            f"{out['mean_abs_error']:.2e}, class indices differing {out['index_mismatch_rate']:.2%}"
        )


def main(argv: list[str] | None = None) -> int:
    from launch.accelerate import LaunchError, merge_overrides
    from pretrain.dist import init_distributed, shutdown
    from pretrain.logger import setup_logging

    p = argparse.ArgumentParser(prog="python -m pretrain.distill", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser(
        "save-teacher", help="store the teacher's top-k outputs for E epochs of augmented views"
    )
    s.add_argument("config")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--check", action="store_true", help="then recompute a sample of records (as `check`)")
    s.add_argument("--samples", type=int, default=256, help="records --check recomputes")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c = sub.add_parser("check", help="recompute a sample of stored records and report the error")
    c.add_argument("config")
    c.add_argument("--samples", type=int, default=256)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        overrides, _ = merge_overrides(args.set)
        cfg = load_student_config(args.config, overrides)
        if getattr(args, "epochs", None) is not None and args.epochs < 1:
            raise ConfigError(f"--epochs: must be >= 1, got {args.epochs}")
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ctx = init_distributed()
    setup_logging(ctx)
    from pretrain.data import ShardError, SourceError

    try:
        torch.set_grad_enabled(False)
        if args.cmd == "save-teacher":
            t0 = time.time()
            root = save_teacher(cfg, ctx, args.epochs, log=print if ctx.is_main else (lambda *_: None))
            if ctx.is_main:
                print(f"[save-teacher] {root} complete in {time.time() - t0:.1f} s")
            if args.check:
                _print_check(check(cfg, ctx, args.samples), ctx)
        else:
            _print_check(check(cfg, ctx, args.samples), ctx)
        return 0
    except (ConfigError, ShardError, SourceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
