"""MDS shards -> per-rank training batches that resume exactly.

streaming's StreamingDataset does the partitioning (disjoint per rank and worker, deterministic given
`batch_size`) and the mid-epoch resume. This module adds the image decoding, augmentation that is a pure function
of (run seed, epoch, sample index) and an infinite multi-epoch iterator. Shards are made ready first by
`prepare.ensure_shards`; the plain in-order reader for probes is `split.load_split`. Corrupt input (a shard
truncated or deleted mid-run, a sample that does not decode) becomes a named ShardError or a counted skip:
see `robust`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from pretrain.data import robust
from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig, config_error
from pretrain.data.mds import ShardError, read_meta
from pretrain.data.prepare import ensure_shards
from pretrain.data.shm import clean_stale_segments
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

    from streaming.base.dataset import _ShardState  # private, but the only name for the states it keeps

    class ImageStreamingDataset(streaming.StreamingDataset):
        """StreamingDataset yielding {"image": (C, S, S) float, "label": int64, "index": int64}, or, for a sample
        that does not decode, the marker robust.bad_sample(...) that TrainLoader turns into an error or a skip.

        The epoch is a local variable inside StreamingDataset.__iter__; the only hook that sees it, in whichever
        process iterates (DataLoader worker or main), is `_resume_incr_epoch`, which __iter__ calls once at the
        start of every epoch and which returns the *resumed* epoch after load_state_dict. We record it there.

        Shard-level faults (a file missing or truncated since validate_shards, a fetch from `remote` that fails)
        raise ShardError naming the file, in whichever thread streaming meets them; `__iter__` hands them on as
        fatal markers, which reach the training process intact from a DataLoader worker.
        """

        def __init__(self, *, transform: ImageTransform, channels: int, aug_seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.image_transform = transform
            self.image_mode = "L" if channels == 1 else "RGB"
            self.aug_seed = aug_seed
            self.tessera_epoch = 0  # epoch of the iteration in progress in this process
            self.background_error: ShardError | None = None  # what stopped streaming's download threads

        def _resume_incr_epoch(self) -> tuple[int, int]:
            epoch, sample_in_epoch = super()._resume_incr_epoch()
            self.tessera_epoch = epoch
            return epoch, sample_in_epoch

        def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
            sample_id = int(sample_id)
            if self.background_error is not None:
                raise self.background_error
            shard_id, row = self.spanner[sample_id]
            shard = self.shards[shard_id]
            remote = self.streams[self.stream_per_shard[shard_id]].remote
            robust.check_shard_file(shard, remote)  # a stat: deleted or truncated since the run started
            try:
                raw = super().get_item(sample_id, retry)
                pil = raw["image"].convert(self.image_mode)  # PIL decodes the pixels lazily: here
                label = int(raw["label"])
            except ShardError:
                raise
            except robust.DECODE_ERRORS as err:
                robust.check_shard_file(shard, remote)  # a file changed under us is the shard's fault
                message = robust.describe_bad_sample(shard, row, sample_id, err)
                return robust.bad_sample(sample_id, message, fatal=False)
            except Exception as err:
                raise robust.as_shard_error(err, f"{robust.shard_path(shard)}: sample {sample_id}") from err
            gen = torch.Generator().manual_seed(sample_seed(self.aug_seed, self.tessera_epoch, sample_id))
            return {
                "image": self.image_transform(pil, gen),  # (C, S, S)
                "label": torch.tensor(label, dtype=torch.int64),
                "index": torch.tensor(sample_id, dtype=torch.int64),
            }

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            """streaming's fetch (download or unzip), with failures named and never left to hang others."""
            shard = self.shards[shard_id]
            remote = self.streams[self.stream_per_shard[shard_id]].remote
            if remote is None:
                robust.check_shard_file(shard, None)  # nothing to fetch from: say so before streaming tries
            try:
                super().prepare_shard(shard_id, blocking)
            except Exception as err:
                # streaming leaves a shard whose fetch failed PREPARING in shared memory, and every thread, worker
                # and rank of this node waiting for it would spin forever. LOCAL lets each of them go on to read
                # it, miss the file, try to fetch it itself and fail with this named error in bounded time.
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.LOCAL
                if remote is None:
                    robust.check_shard_file(shard, None)
                source = robust.remote_path(remote, shard) or robust.shard_path(shard)
                what = f"{source}: cannot fetch shard {shard_id} into {robust.shard_path(shard)}"
                raise robust.as_shard_error(err, what) from err

        def _prepare_thread(self, it: Any) -> None:
            try:
                super()._prepare_thread(it)
            except BaseException:
                it.on_exit()  # streaming counts a thread as exited only when it returns: exit() would wait forever
                raise

        def _ready_thread(self, it: Any) -> None:
            try:
                super()._ready_thread(it)
            except BaseException:
                it.on_exit()
                raise

        def on_exception(self, future: Any) -> None:
            """Callback on streaming's download threads: keep their error for the yield loop, which stops early
            when the event is set, instead of raising it in the thread, where it only reaches a log."""
            if future.cancelled() or future.exception() is None:
                return
            self.background_error = robust.as_shard_error(future.exception(), "streaming's download thread")
            self._event.set()

        def _each_sample_id(self, it: Any) -> Any:
            yield from super()._each_sample_id(it)
            if self._event.is_set():  # the loop ended early because a download thread failed
                raise self.background_error or ShardError("streaming's download threads stopped: see the log")

        def __iter__(self) -> Any:
            """streaming's iterator, with a shard-level error turned into `batch_size` fatal markers.

            Raised in a DataLoader worker, the error would reach the training process re-wrapped with the
            worker's traceback as its message; a marker arrives as is. A whole batch of them, so that
            drop_last cannot drop the batch that carries it.
            """
            try:
                if self.background_error is not None:
                    raise self.background_error
                yield from super().__iter__()
            except ShardError as err:
                self.background_error = err  # a later epoch in this process fails the same way
                if hasattr(self, "_event"):
                    self._event.set()  # stops this epoch's download threads
                marker = robust.bad_sample(-1, str(err), fatal=True)
                for _ in range(self.batch_size or 1):
                    yield marker

    ImageStreamingDataset.__qualname__ = "ImageStreamingDataset"  # picklable as pretrain.data.stream.<name>
    return ImageStreamingDataset


def _dataset_class() -> type:
    """Define ImageStreamingDataset on first use: its base class needs `import streaming` (and the shim)."""
    cls = globals().get("ImageStreamingDataset")
    if cls is None:
        cls = globals()["ImageStreamingDataset"] = _define_dataset_class()
    return cls


def _loader_class() -> type:
    """StreamingDataLoader that counts every sample a batch consumed, skipped ones too (robust.fetched).

    streaming resumes from the samples its loader counted, and would otherwise take len() of the batch's first
    value: a batch with skipped samples would then count short and a resume would replay them.
    """
    cls = globals().get("_SkipCountingLoader")
    if cls is None:

        class _SkipCountingLoader(import_streaming().StreamingDataLoader):
            def _get_batch_size(self, batch: Any) -> int:
                return robust.fetched(batch)

        cls = globals()["_SkipCountingLoader"] = _SkipCountingLoader
    return cls


def __getattr__(name: str) -> Any:
    if name == "ImageStreamingDataset":
        return _dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- train loader


def _clean_stale_shared_memory(ctx: DistContext) -> None:
    """Unlink streaming segments leaked by killed processes (and only those: pretrain.data.shm). Collective: the
    node's local rank 0 cleans while the others wait, before any of them creates a dataset."""
    if ctx.local_rank == 0:
        clean_stale_segments()
    ctx.barrier()


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

    Undecodable samples (data.bad_samples): "error" raises ShardError; "skip" drops them, so B may be smaller
    than micro_batch_size, and counts them in `bad_samples` (checkpointed). A micro-batch whose samples were all
    skipped is not returned: the next one is. On that rank the stream then runs one batch ahead of the others
    for the rest of the epoch (a resume from a checkpoint taken meanwhile restores one rank's position for all).
    """

    def __init__(
        self,
        dataset: Any,
        loader: Any,
        world_size: int,
        micro_batch_size: int,
        seed: int,
        *,
        bad_samples: str = "error",
        max_bad_samples: int = 0,
        rank: int = 0,
        grad_accum_steps: int = 1,
    ) -> None:
        self.dataset = dataset
        self.loader = loader
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.grad_accum_steps = grad_accum_steps  # a resume must keep the global batch
        self._bad = robust.BadSamplePolicy(bad_samples, max_bad_samples, rank)
        self._it: Any = None  # the current epoch's iterator; None between epochs
        self._epoch = 0
        self._batch_in_epoch = 0
        self._samples_seen = 0
        self._closed = False
        self.classes: list[str] | None = None  # the dataset's class names (shard metadata), for exports

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

    @property
    def bad_samples(self) -> int:
        """Samples skipped on this rank since the run began, resumes included (state_dict()["bad_samples"])."""
        return self._bad.count

    @bad_samples.setter
    def bad_samples(self, count: int) -> None:
        self._bad.count = int(count)

    @property
    def last_bad_samples(self) -> list[int]:
        """Sample ids of the most recent skips on this rank, oldest first (at most robust.LAST_BAD_KEPT)."""
        return list(self._bad.last)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._closed:
            raise RuntimeError("TrainLoader is closed")
        for _ in range(max(1, self.batches_per_epoch) + 1):
            batch = self._next_batch()
            self._bad(batch.pop("bad", []))  # raises ShardError unless skipping (and under the limit)
            if "image" in batch:
                return batch
            # every sample of this micro-batch was skipped: an empty batch would break the step. One rank takes
            # the next; with several that rank would run a batch ahead of the others and, at the epoch's end,
            # wait in streaming's node-wide barrier while they wait for it in the step's all-reduce.
            if self.world_size > 1:
                raise ShardError(
                    f"data.bad_samples: every sample of a micro-batch on rank {self._bad.rank} was undecodable "
                    f"(ids {self.last_bad_samples}); with {self.world_size} ranks the ranks cannot skip a whole "
                    "batch and stay in step. Repair or drop the shard, or raise train.micro_batch_size"
                )
        raise ShardError(
            f"data.bad_samples: rank {self._bad.rank} skipped every sample of more than an epoch of micro-batches "
            f"({self.bad_samples} so far); the data is corrupt throughout"
        )

    def _next_batch(self) -> dict[str, Any]:
        """The next collated batch of the stream, starting the next epoch when one ends."""
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
            "bad_samples": self.bad_samples,  # restore with `loader.bad_samples = state.get("bad_samples", 0)`
            "micro_batch_size": self.micro_batch_size,
            "grad_accum_steps": self.grad_accum_steps,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; call before the first batch (streaming reads the resume point when an epoch starts).

        Elastic: on another world size the run continues the same global sample order (streaming partitions it
        by its saved `num_canonical_nodes`, not by the number of ranks) when every optimizer step still covers
        the same samples: micro_batch_size x grad_accum_steps x world_size must equal the saved run's. Each
        step then trains on the same set of samples as on the old world size, up to the end of the epoch.
        There each world size drops its own remainder (fewer than micro_batch_size x world_size samples), so
        from the next epoch on steps may be cut differently: no sample is repeated or lost within an epoch,
        but the per-step sets stop matching the old world size's.
        """
        if self._it is not None or self._samples_seen:
            raise RuntimeError("load_state_dict must be called before the first batch")
        for key, config_key in (("micro_batch_size", "train.micro_batch_size"), ("seed", "seed")):
            if state[key] != getattr(self, key):
                raise config_error(
                    f"{config_key}: the data-loader state was saved with {state[key]}, this run has "
                    f"{getattr(self, key)}; resume with {config_key}={state[key]} or start a new run"
                )
        # None: a state saved, or a loader built, before the loader knew grad_accum_steps (build_train_loader)
        accum, saved_accum = self.grad_accum_steps, state.get("grad_accum_steps")
        if state["world_size"] != self.world_size or (accum and saved_accum and accum != saved_accum):
            if accum is None or saved_accum is None:
                raise config_error(
                    f"train.grad_accum_steps: the data-loader state of {state['world_size']} ranks does not "
                    "record its global batch (or this loader was built without train.grad_accum_steps), so "
                    f"it cannot continue on {self.world_size} ranks; resume on {state['world_size']} ranks"
                )
            micro, world = self.micro_batch_size, self.world_size
            before, now = micro * saved_accum * state["world_size"], micro * accum * world
            if before != now:
                hint = f"resume on {state['world_size']} ranks"  # micro_batch_size is fixed (checked above)
                if before % (micro * world) == 0:
                    hint = f"use train.grad_accum_steps={before // (micro * world)}"
                raise config_error(
                    "train.grad_accum_steps: the data-loader state was saved with a global batch of "
                    f"{before} samples (train.micro_batch_size {micro} x train.grad_accum_steps {saved_accum} "
                    f"x {state['world_size']} ranks) and this run has {now} ({micro} x {accum} x {world}); "
                    f"{hint}"
                )
            log.info(
                "data-loader state of %d ranks continues on %d ranks: same sample order, %d samples per step",
                state["world_size"],
                world,
                now,
            )
        self.loader.load_state_dict(state["streaming"])
        self._epoch = state["epoch"]
        # batches of this world size that the epoch's samples so far amount to (bookkeeping only)
        self._batch_in_epoch = state["batch_in_epoch"] * state["world_size"] // self.world_size
        self._samples_seen = state["samples_seen"]
        self.bad_samples = state.get("bad_samples", 0)  # .get: states saved before the count existed

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


def build_train_loader(
    cfg: DataConfig, ctx: DistContext, micro_batch_size: int, seed: int, grad_accum_steps: int = 1
) -> TrainLoader:
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
    _clean_stale_shared_memory(ctx)
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
    loader = _loader_class()(
        dataset,
        batch_size=micro_batch_size,
        num_workers=cfg.num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=ctx.device.type == "cuda",
        collate_fn=robust.collate,  # good samples stacked, bad-sample markers listed in batch["bad"]
    )
    train_loader = TrainLoader(
        dataset,
        loader,
        ctx.world_size,
        micro_batch_size,
        seed,
        bad_samples=cfg.bad_samples,
        max_bad_samples=cfg.max_bad_samples,
        rank=ctx.rank,
        grad_accum_steps=grad_accum_steps,
    )
    shard_meta = read_meta(os.path.abspath(cfg.remote or local)) or {}
    train_loader.classes = shard_meta.get("classes")  # (no walk of a source tree here: export falls back)
    if train_loader.batches_per_epoch == 0:
        train_loader.close()
        raise config_error(
            f"train.micro_batch_size: {micro_batch_size} is more than the {len(dataset)} samples each of the "
            f"{ctx.world_size} ranks gets from {local}"
        )
    return train_loader
