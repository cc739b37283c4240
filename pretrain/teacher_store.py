"""Stored sparse teacher outputs (TinyViT's fast pretraining distillation), exact and resumable.

Layout of a store DIR (`objective.teacher_outputs`):
    DIR/store.json            what produced it: teacher (spec, weights, fingerprint, input), data (dataset, split,
                              source, sample count, shards' index.json sha256), augmentation (image size, crop,
                              flip, mean, std), seed, temperature, k, classes, dtypes; and the complete epochs
    DIR/epoch_0000/           MDS shards (index.json + shard.*.mds), written to a temp dir and renamed into
    DIR/epoch_0001/ ...       place whole; row i is sample id i of the data (streaming's global sample id)

One record (one sample in one epoch) is the MDS column `r` of fixed size 4 + k * (2 + index bytes):
    uint32   the low 32 bits of the sample's augmentation seed, pretrain.data.stream.sample_seed(seed, epoch, id):
             the view the teacher saw is a pure function of (seed, epoch, id), so the student's loader makes the
             same one; the stored seed checks it at every lookup
    float16  x k the teacher's top-k probabilities softmax(logits / T), largest first
    int16/32 x k their class indices (int16 when the classes fit, else int32)
all little-endian. Records do not depend on the epoch the saver started from, its world size or worker count:
each is a function of (teacher, seed, epoch, id), and the teacher always sees the same fixed chunks of ids.

The student spreads the probability mass outside the top k evenly over the other classes (`dense_targets`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pretrain.errors import ConfigError

STORE_META = "store.json"
FORMAT = "tessera-teacher-topk-v1"
SEED_BYTES = 4


def epoch_dir(root: str | Path, epoch: int) -> Path:
    return Path(root) / f"epoch_{epoch:04d}"


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype("<i2") if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype("<i4")


def record_bytes(k: int, num_classes: int) -> int:
    """Bytes of one record: 4 + k * (2 + index bytes)."""
    return SEED_BYTES + k * (2 + index_dtype(num_classes).itemsize)


def seed32(seed: int, epoch: int, index: int) -> int:
    from pretrain.data.stream import sample_seed

    return sample_seed(seed, epoch, index) & 0xFFFFFFFF


def encode(seeds: np.ndarray, probs: torch.Tensor, indices: torch.Tensor, num_classes: int) -> np.ndarray:
    """(N,) uint32 seeds, (N, k) probabilities and class indices -> (N, record_bytes) uint8 records."""
    n, k = probs.shape
    out = np.empty((n, record_bytes(k, num_classes)), dtype=np.uint8)
    out[:, :SEED_BYTES] = seeds.astype("<u4").view(np.uint8).reshape(n, SEED_BYTES)
    v = probs.to(torch.float16).cpu().numpy().astype("<f2")
    out[:, SEED_BYTES : SEED_BYTES + 2 * k] = v.view(np.uint8).reshape(n, 2 * k)
    i = indices.cpu().numpy().astype(index_dtype(num_classes))
    out[:, SEED_BYTES + 2 * k :] = i.view(np.uint8).reshape(n, -1)
    return out


def decode(records: np.ndarray, k: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, record_bytes) uint8 -> (seeds (N,) uint32, probs (N, k) float16, indices (N, k) int)."""
    n = len(records)
    seeds = np.ascontiguousarray(records[:, :SEED_BYTES]).view("<u4").reshape(n)
    probs = np.ascontiguousarray(records[:, SEED_BYTES : SEED_BYTES + 2 * k]).view("<f2").reshape(n, k)
    idx = np.ascontiguousarray(records[:, SEED_BYTES + 2 * k :]).view(index_dtype(num_classes)).reshape(n, k)
    return seeds, probs, idx


def dense_targets(probs: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) top-k probabilities + indices -> (B, C) distributions: the k stored, the rest of the mass
    (1 - sum, never below 0) spread evenly over the C - k other classes. fp32."""
    probs = probs.float()
    b, k = probs.shape
    if k >= num_classes:
        out = torch.zeros(b, num_classes, device=probs.device)
    else:
        rest = (1.0 - probs.sum(1, keepdim=True)).clamp_min(0.0) / (num_classes - k)  # (B, 1)
        out = rest.expand(b, num_classes).clone()
    return out.scatter_(1, indices.long(), probs)


# --- provenance ------------------------------------------------------------------------------------------


def data_identity(data, shard_dir: str | Path, count: int) -> dict:
    """What fixes the samples and their views: dataset, split, source, the shards' index.json, the transform."""
    from pretrain.data.sources import get_dataset

    info = get_dataset(data.dataset)
    index = Path(shard_dir) / "index.json"
    return {
        "dataset": data.dataset,
        "split": data.split,
        "source": os.path.abspath(data.source) if data.source else None,
        "max_samples": data.max_samples,
        "samples": int(count),
        "shards_index_sha256": hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None,
        "image_size": data.image_size,
        "augment": data.augment,
        "crop_scale_min": data.crop_scale_min,
        "hflip": data.hflip,
        "mean": list(data.mean or info.mean),
        "std": list(data.std or info.std),
    }


def read_meta(root: str | Path) -> dict:
    path = Path(root) / STORE_META
    if not path.is_file():
        raise ConfigError(
            f"objective.teacher_outputs: {str(root)!r} holds no {STORE_META}: not a store of teacher outputs "
            "(write one with: python -m pretrain.distill save-teacher CONFIG)"
        )
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"objective.teacher_outputs: {path}: bad JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"objective.teacher_outputs: {path}: format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    return meta


def write_meta(root: str | Path, meta: dict) -> None:
    """store.json replaced atomically (tmp + rename)."""
    path = Path(root) / STORE_META
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, path)


def compare(stored: dict, want: dict, where: str) -> None:
    """ConfigError naming the first field whose value differs between a store and this run."""
    for key, value in want.items():
        if key not in stored:
            raise ConfigError(f"objective.teacher_outputs: {where} records no {key!r}")
        got = stored[key]
        if isinstance(value, dict):
            compare(got, value, f"{where} [{key}]")
        elif _norm(got) != _norm(value):
            raise ConfigError(
                f"objective.teacher_outputs: {where} was made with {key}={got!r}, this run has {key}={value!r}; "
                "stored outputs from another teacher, dataset, augmentation or seed would be wrong targets"
            )


def _norm(v):
    if isinstance(v, float | int) and not isinstance(v, bool):
        return round(float(v), 9)
    if isinstance(v, list | tuple):
        return [_norm(x) for x in v]
    return v


# --- writing ---------------------------------------------------------------------------------------------


def write_epoch(root: str | Path, epoch: int, records: np.ndarray) -> Path:
    """One epoch's (N, R) uint8 records as MDS shards under root/epoch_XXXX, atomically (tmp dir + rename)."""
    from pretrain.data.compat import import_streaming

    streaming = import_streaming()
    out = epoch_dir(root, epoch)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    n, r = records.shape
    try:
        with streaming.MDSWriter(
            out=str(tmp), columns={"r": f"ndarray:uint8:{r}"}, size_limit=64 << 20
        ) as writer:
            for row in records:
                writer.write({"r": row})
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_epoch(root: str | Path, epoch: int, record_size: int) -> np.ndarray:
    """All records of one epoch, (N, R) uint8, read straight from the MDS shard files (uncompressed, one
    fixed-size column: each sample is exactly its record)."""
    folder = epoch_dir(root, epoch)
    index_file = folder / "index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder}: no index.json")
    index = json.loads(index_file.read_text())
    parts = []
    for shard in index["shards"]:
        raw = shard["raw_data"]
        path = folder / raw["basename"]
        data = np.fromfile(path, dtype=np.uint8)
        if len(data) != raw["bytes"]:
            raise ValueError(f"{path}: {len(data)} bytes, index.json says {raw['bytes']} (truncated?)")
        n = int(shard["samples"])
        header = data[:4].view("<u4")[0]
        if header != n:
            raise ValueError(f"{path}: header says {header} samples, index.json says {n}")
        offsets = data[4 : 4 + 4 * (n + 1)].view("<u4").astype(np.int64)
        sizes = np.diff(offsets)
        if n and not (sizes == record_size).all():
            raise ValueError(f"{path}: records of {set(sizes.tolist())} bytes, expected {record_size}")
        parts.append(data[offsets[0] : offsets[-1]].reshape(n, record_size))
    return np.concatenate(parts) if parts else np.empty((0, record_size), np.uint8)


# --- reading for training --------------------------------------------------------------------------------


@dataclass
class Lookup:
    """Top-k targets for a batch: `probs` (B, k) fp32, `indices` (B, k) int64."""

    probs: torch.Tensor
    indices: torch.Tensor


class TeacherStore:
    """Read side of a store, for the student: `lookup(index, epoch)` -> the batch's top-k targets. Keeps the last
    two epochs' records in memory (a few bytes per sample). Every lookup checks the sample has a record and that
    the stored augmentation seed is the one this run's loader used."""

    def __init__(self, root: str | Path, seed: int):
        self.root = Path(root)
        self.meta = read_meta(root)
        self.seed = seed
        self.k = int(self.meta["k"])
        self.num_classes = int(self.meta["num_classes"])
        self.samples = int(self.meta["data"]["samples"])
        self.record_size = record_bytes(self.k, self.num_classes)
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def epochs(self) -> list[int]:
        return sorted(int(e) for e in self.meta.get("epochs", []))

    def _records(self, epoch: int) -> np.ndarray:
        if epoch in self._epochs:
            self._epochs.move_to_end(epoch)
            return self._epochs[epoch]
        if epoch not in self.epochs:
            done = self.epochs
            have = f"epochs {done[0]}..{done[-1]}" if done else "no complete epoch"
            raise RuntimeError(
                f"objective.teacher_outputs: {self.root} has no stored outputs for epoch {epoch} ({have}); run "
                f"python -m pretrain.distill save-teacher CONFIG --epochs {epoch + 1}"
            )
        try:
            recs = read_epoch(self.root, epoch, self.record_size)
        except (OSError, ValueError, KeyError) as e:
            raise RuntimeError(f"objective.teacher_outputs: {epoch_dir(self.root, epoch)}: {e}") from e
        self._epochs[epoch] = recs
        while len(self._epochs) > 2:
            self._epochs.popitem(last=False)
        return recs

    def lookup(self, index: torch.Tensor, epoch: torch.Tensor) -> Lookup:
        idx = index.detach().cpu().numpy().astype(np.int64)
        ep = epoch.detach().cpu().numpy().astype(np.int64)
        probs = np.empty((len(idx), self.k), np.float16)
        classes = np.empty((len(idx), self.k), np.int64)
        for e in np.unique(ep):
            rows = np.nonzero(ep == e)[0]
            recs = self._records(int(e))
            ids = idx[rows]
            bad = ids[(ids < 0) | (ids >= len(recs))]
            if len(bad):
                raise RuntimeError(
                    f"objective.teacher_outputs: sample id {int(bad[0])} has no record in "
                    f"{epoch_dir(self.root, int(e))} ({len(recs)} records): the store was made from other data"
                )
            seeds, p, c = decode(recs[ids], self.k, self.num_classes)
            want = np.array([seed32(self.seed, int(e), int(i)) for i in ids], dtype=np.uint32)
            wrong = np.nonzero(seeds != want)[0]
            if len(wrong):
                i = int(ids[wrong[0]])
                raise RuntimeError(
                    f"objective.teacher_outputs: sample {i} of epoch {int(e)} was stored for augmentation seed "
                    f"{int(seeds[wrong[0]])}, this run draws {int(want[wrong[0]])}: another seed or sample order"
                )
            if (c < 0).any() or (c >= self.num_classes).any():
                raise RuntimeError(
                    f"objective.teacher_outputs: {epoch_dir(self.root, int(e))} holds class indices outside "
                    f"[0, {self.num_classes})"
                )
            probs[rows], classes[rows] = p, c
        dev = index.device
        return Lookup(torch.from_numpy(probs.astype(np.float32)).to(dev), torch.from_numpy(classes).to(dev))
