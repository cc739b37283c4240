"""MDS shards -> per-rank training batches that resume exactly.

streaming's StreamingDataset does the partitioning (disjoint per rank and worker, deterministic given
`batch_size`) and the mid-epoch resume. This module adds the image decoding, augmentation that is a pure function
of (run seed, epoch, sample index) and an infinite multi-epoch iterator. Shards are made ready first by
`prepare.ensure_shards`; the plain in-order reader for probes is `split.load_split`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig, config_error
from pretrain.data.prepare import ensure_shards
from pretrain.data.sources import get_dataset
from pretrain.data.transforms import ImageTransform
from pretrain.dist import DistContext

log = logging.getLogger(__name__)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, sample index): not on worker, rank or resume."""
    h = _splitmix64(int(seed) & _MASK64)  # int(): streaming hands out numpy int64 sample ids
    h = _splitmix64(h ^ (int(epoch) & _MASK64))
    return _splitmix64(h ^ (int(index) & _MASK64)) >> 1


def _define_dataset_class() -> type:
    streaming = import_streaming()

    class ImageStreamingDataset(streaming.StreamingDataset):
        """StreamingDataset yielding {"image": (C, S, S) float, "label": int64, "index": int64}.

        The epoch is a local variable inside StreamingDataset.__iter__; the only hook that sees it, in whichever
        process iterates (DataLoader worker or main), is `_resume_incr_epoch`, which __iter__ calls once at the
        start of every epoch and which returns the *resumed* epoch after load_state_dict. We record it there.
        """

        def __init__(self, *, transform: ImageTransform, channels: int, aug_seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.image_transform = transform
            self.image_mode = "L" if channels == 1 else "RGB"
            self.aug_seed = aug_seed
            self.tessera_epoch = 0  # epoch of the iteration in progress in this process

        def _resume_incr_epoch(self) -> tuple[int, int]:
            epoch, sample_in_epoch = super()._resume_incr_epoch()
            self.tessera_epoch = epoch
            return epoch, sample_in_epoch

        def get_item(self, sample_id: int, retry: int = 7) -> dict[str, torch.Tensor]:
            sample_id = int(sample_id)
            raw = super().get_item(sample_id, retry)
            gen = torch.Generator().manual_seed(sample_seed(self.aug_seed, self.tessera_epoch, sample_id))
            image = self.image_transform(raw["image"].convert(self.image_mode), gen)  # (C, S, S)
            return {
                "image": image,
                "label": torch.tensor(int(raw["label"]), dtype=torch.int64),
                "index": torch.tensor(sample_id, dtype=torch.int64),
            }

    ImageStreamingDataset.__qualname__ = "ImageStreamingDataset"  # picklable as pretrain.data.stream.<name>
    return ImageStreamingDataset


def _dataset_class() -> type:
    """Define ImageStreamingDataset on first use: its base class needs `import streaming` (and the shim)."""
    cls = globals().get("ImageStreamingDataset")
    if cls is None:
        cls = globals()["ImageStreamingDataset"] = _define_dataset_class()
    return cls


def __getattr__(name: str) -> Any:
    if name == "ImageStreamingDataset":
        return _dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- train loader


_SHM_CLEANED = False  # streaming's cleanup must run once per process, before its first dataset (see below)


def _clean_stale_shared_memory_once() -> None:
    """Remove shared memory leaked by crashed runs. Collective: every rank must call it (rank 0 alone hangs).

    Only once per process: it unlinks *every* streaming segment from prefix 0 up, live ones included, so running
    it while another loader of this process is alive would pull that loader's segments from under it.
    """
    global _SHM_CLEANED
    if not _SHM_CLEANED:
        import_streaming().base.util.clean_stale_shared_memory()
        _SHM_CLEANED = True


def _release_shared_memory(ds: Any) -> None:
    """Free what a StreamingDataset holds in this process, so its `local` dir can be used again right away.

    streaming frees its segments only at interpreter exit; until then a second dataset on the same local dir
    (with a remote) is refused. We stop its prefetch threads, mark its local dirs free (what its __del__ does)
    and unlink the segments this process created.
    """
    it = getattr(ds, "_iterator", None)
    if it is not None:
        it.exit()  # num_workers=0: the prefetch threads run in this process
    executor = getattr(ds, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True)
    handles = [
        ds._locals_shm,
        ds._next_epoch.arr.shm,
        ds._cache_usage.arr.shm,
        ds._shard_states.shm,
        ds._shard_access_times.shm,
        ds._shared_barrier._arr.shm,
        getattr(ds, "_resume_shm", None),
    ]
    try:
        ds._locals_shm.buf[:4] = bytes(4)
    except (ValueError, TypeError, BufferError):
        pass
    for handle in handles:
        if handle is not None:
            try:
                handle.cleanup()
            except (BufferError, OSError):  # a live view or an already-gone segment: exit will finish the job
                pass


class TrainLoader:
    """Infinite iterator over epochs of per-rank batches {"image": (B, C, S, S), "label": (B,), "index": (B,)}.

    `state_dict()` after k batches + `load_state_dict()` on a fresh loader (same config, world size, batch size
    and seed) yields exactly what batch k+1, k+2, ... would have been, across epoch boundaries. Call it on every
    rank: the state is the same on all of them (streaming counts samples as batches x world size).
    """

    def __init__(self, dataset: Any, loader: Any, world_size: int, micro_batch_size: int, seed: int) -> None:
        self.dataset = dataset
        self.loader = loader
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self._it: Any = None  # the current epoch's iterator; None between epochs
        self._epoch = 0
        self._batch_in_epoch = 0
        self._samples_seen = 0
        self._closed = False

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def samples_seen(self) -> int:
        """Samples consumed by all ranks together."""
        return self._samples_seen

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per rank per epoch (the partial last batch is dropped)."""
        return len(self.loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        empty_epochs = 0
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
                break
            except StopIteration:
                # One empty epoch is normal right after resuming at an epoch's end; two in a row is a bug.
                self._it = None
                self._epoch += 1
                self._batch_in_epoch = 0
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError("the data loader produced no batch in a whole epoch") from None
        self._batch_in_epoch += 1
        self._samples_seen += self.micro_batch_size * self.world_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain ints only: fits in any checkpoint format."""
        return {
            "streaming": self.loader.state_dict(),  # {epoch, sample_in_epoch, num_canonical_nodes, shuffle_seed, ...}
            "epoch": self._epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "samples_seen": self._samples_seen,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; call before the first batch (streaming reads the resume point when an epoch starts)."""
        if self._it is not None or self._samples_seen:
            raise RuntimeError("load_state_dict must be called before the first batch")
        for key, config_key in (("micro_batch_size", "train.micro_batch_size"), ("seed", "seed")):
            if state[key] != getattr(self, key):
                raise config_error(
                    f"{config_key}: the data-loader state was saved with {state[key]}, this run has "
                    f"{getattr(self, key)}; resume with {config_key}={state[key]} or start a new run"
                )
        if state["world_size"] != self.world_size:
            log.warning(
                "resuming %d-rank data state on %d ranks: sample order continues elastically, not "
                "batch for batch",
                state["world_size"],
                self.world_size,
            )
        self.loader.load_state_dict(state["streaming"])
        self._epoch = state["epoch"]
        self._batch_in_epoch = state["batch_in_epoch"]
        self._samples_seen = state["samples_seen"]

    def close(self) -> None:
        """Stop workers and threads and free streaming's shared memory; the loader cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._it is not None:
            self._it.close()  # drops the DataLoader iterator, which joins its worker processes
            self._it = None
        _release_shared_memory(self.dataset)

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_train_loader(cfg: DataConfig, ctx: DistContext, micro_batch_size: int, seed: int) -> TrainLoader:
    """Shards ready on every rank -> a resumable loader of `micro_batch_size` samples per rank, shuffled by `seed`."""
    if micro_batch_size <= 0:
        raise config_error(f"train.micro_batch_size: must be > 0, got {micro_batch_size}")
    if seed < 0:
        raise config_error(f"seed: streaming needs a non-negative shuffle seed, got {seed}")
    local = ensure_shards(cfg, ctx)
    # streaming finds rank and world size in RANK/WORLD_SIZE/LOCAL_*: they must agree with the launch context.
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    if (env_world, env_rank) != (ctx.world_size, ctx.rank):
        raise RuntimeError(
            f"streaming reads RANK={env_rank} WORLD_SIZE={env_world} from the environment but the "
            f"launch context says rank {ctx.rank} of {ctx.world_size}; export them before building"
        )
    streaming = import_streaming()
    _clean_stale_shared_memory_once()
    info = get_dataset(cfg.dataset)
    transform = ImageTransform(
        image_size=cfg.image_size,
        mean=tuple(cfg.mean or info.mean),
        std=tuple(cfg.std or info.std),
        augment=cfg.augment,
        crop_scale_min=cfg.crop_scale_min,
        hflip=cfg.hflip,
    )
    dataset = _dataset_class()(
        transform=transform,
        channels=info.channels,
        aug_seed=seed,
        local=os.path.abspath(local),
        remote=os.path.abspath(cfg.remote) if cfg.remote else None,
        shuffle=cfg.shuffle,
        shuffle_seed=seed,
        batch_size=micro_batch_size,  # streaming needs it to partition batches deterministically across workers
    )
    loader = streaming.StreamingDataLoader(
        dataset,
        batch_size=micro_batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=ctx.device.type == "cuda",
    )
    train_loader = TrainLoader(dataset, loader, ctx.world_size, micro_batch_size, seed)
    if train_loader.batches_per_epoch == 0:
        train_loader.close()
        raise config_error(
            f"train.micro_batch_size: {micro_batch_size} is more than the {len(dataset)} samples each of the "
            f"{ctx.world_size} ranks gets from {local}"
        )
    return train_loader
