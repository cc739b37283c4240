"""MDS shards -> per-rank training batches that resume exactly: the one loader of every modality.

streaming's StreamingDataset does the partitioning (disjoint per rank and worker, deterministic given
`batch_size`), the mixing of data.streams and the mid-epoch resume. This module adds the decoding of each field
(`fields.SampleDecoder`: images with augmentation that is a pure function of (run seed, epoch, sample index),
token ids for text, both for image-text pairs, their captions cut or padded to data.text_len), packing of
documents into rows for text (`packing.Packer`, above streaming's DataLoader),
and an infinite multi-epoch iterator. Shards are made ready first by `prepare.ensure_all_shards`; the plain
in-order readers for probes and evals are `split.load_split` and `tokens.load_token_split`. Corrupt input (a
shard truncated or deleted mid-run, a sample that does not decode) becomes a named ShardError or a counted skip:
see `robust`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from pretrain.data import robust
from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig, config_error
from pretrain.data.fields import SampleDecoder
from pretrain.data.image_text import truncated_captions
from pretrain.data.loader import TrainLoader
from pretrain.data.mds import ShardError, read_meta
from pretrain.data.packing import Packer
from pretrain.data.prepare import ensure_all_shards
from pretrain.data.shm import clean_stale_segments, prefix_lock
from pretrain.data.sources import get_dataset
from pretrain.data.tokenizer import TokenizerInfo, tokenizer_info
from pretrain.data.transforms import ImageTransform
from pretrain.dist import DistContext

log = logging.getLogger(__name__)
data_log = logging.getLogger("tessera.data")  # a child of the run's logger: shown in the run's log
_MASK64 = (1 << 64) - 1
MAX_DOCS_PER_FETCH = 4096
__all__ = ["TrainLoader", "build_train_loader", "sample_seed"]


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

    class TesseraStreamingDataset(streaming.StreamingDataset):
        """StreamingDataset yielding what `decoder` makes of a sample: {"image": (C, S, S) float, "label": int64,
        "index": int64} for images, {"tokens": (L,) int64, "index": int64} for a text document, the image's plus
        {"input_ids", "attention_mask": (text_len,) int64} (and "label" if any) for a pair; or, for a sample
        that does not decode, the marker robust.bad_sample(...) that TrainLoader turns into an error or a skip.

        The epoch is a local variable inside StreamingDataset.__iter__; the only hook that sees it, in whichever
        process iterates (DataLoader worker or main), is `_resume_incr_epoch`, which __iter__ calls once at the
        start of every epoch and which returns the *resumed* epoch after load_state_dict. We record it there.

        Shard-level faults (a file missing or truncated since validate_shards, a fetch from `remote` that fails)
        raise ShardError naming the file, in whichever thread streaming meets them; `__iter__` hands them on as
        fatal markers, which reach the training process intact from a DataLoader worker.
        """

        def __init__(self, *, decoder: SampleDecoder, aug_seed: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.decoder = decoder
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
                parsed = self.decoder.parse(raw)  # PIL decodes the pixels lazily: here
            except ShardError:
                raise
            except robust.DECODE_ERRORS as err:
                robust.check_shard_file(shard, remote)  # a file changed under us is the shard's fault
                message = robust.describe_bad_sample(shard, row, sample_id, err)
                return robust.bad_sample(sample_id, message, fatal=False)
            except Exception as err:
                raise robust.as_shard_error(err, f"{robust.shard_path(shard)}: sample {sample_id}") from err
            gen = None
            if self.decoder.modality != "text":
                gen = torch.Generator().manual_seed(sample_seed(self.aug_seed, self.tessera_epoch, sample_id))
            return self.decoder.finish(parsed, sample_id, gen)

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

    # picklable as pretrain.data.stream.<name>
    TesseraStreamingDataset.__qualname__ = "TesseraStreamingDataset"
    return TesseraStreamingDataset


def _dataset_class() -> type:
    """Define TesseraStreamingDataset on first use: its base class needs `import streaming` (and the shim)."""
    cls = globals().get("TesseraStreamingDataset")
    if cls is None:
        cls = globals()["TesseraStreamingDataset"] = _define_dataset_class()
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
    if name in ("TesseraStreamingDataset", "ImageStreamingDataset"):  # the latter: its name before text came
        return _dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- train loader


def _clean_stale_shared_memory(ctx: DistContext) -> None:
    """Unlink streaming segments leaked by killed processes (and only those: pretrain.data.shm). Collective: the
    node's local rank 0 cleans while the others wait, before any of them creates a dataset."""
    if ctx.local_rank == 0:
        clean_stale_segments()
    ctx.barrier()


def _docs_per_fetch(cfg: DataConfig, metas: list[dict], micro_batch_size: int) -> int:
    """data.docs_per_fetch, or enough documents for one micro-batch of rows on average (from the shards' counts)."""
    if cfg.docs_per_fetch is not None:
        return cfg.docs_per_fetch
    docs = sum(m.get("documents") or 0 for m in metas)
    tokens = sum(m.get("tokens") or 0 for m in metas)
    if not docs or not tokens:
        return micro_batch_size  # shards from another tool: no counts
    return max(1, min(MAX_DOCS_PER_FETCH, math.ceil(micro_batch_size * cfg.seq_len * docs / tokens)))


def sample_decoder(cfg: DataConfig, tok: TokenizerInfo | None) -> SampleDecoder:
    """How the loader decodes cfg's samples (`split.load_pairs` uses it too, with data.augment off)."""
    info = get_dataset(cfg.dataset)
    if info.modality == "text":
        return SampleDecoder("text", vocab_size=tok.vocab_size)
    transform = ImageTransform(
        image_size=cfg.image_size,
        mean=tuple(cfg.mean or info.mean),
        std=tuple(cfg.std or info.std),
        augment=cfg.augment,
        crop_scale_min=cfg.crop_scale_min,
        hflip=cfg.hflip,
    )
    mode = "L" if info.channels == 1 else "RGB"
    if info.modality == "image_text":
        return SampleDecoder(
            "image_text",
            transform=transform,
            image_mode=mode,
            vocab_size=tok.vocab_size,
            text_len=cfg.text_len,
            pad_id=tok.padding_id,
        )
    return SampleDecoder("image", transform=transform, image_mode=mode)


def _report_truncation(cfg: DataConfig, metas: list[dict], ctx: DistContext) -> int | None:
    """Captions longer than data.text_len in the shards (tessera.json's caption lengths), logged once by rank 0."""
    counts = truncated_captions(metas, cfg.text_len)
    if counts is None:
        return None
    longer, total = counts
    if ctx.is_main:
        data_log.log(
            logging.WARNING if longer else logging.INFO,
            "%d of %d captions are longer than data.text_len=%d and are truncated",
            longer,
            total,
            cfg.text_len,
        )
    return longer


def build_train_loader(
    cfg: DataConfig, ctx: DistContext, micro_batch_size: int, seed: int, grad_accum_steps: int = 1
) -> TrainLoader:
    """Shards ready on every rank -> a resumable loader of `micro_batch_size` samples (text: rows of
    data.seq_len tokens) per rank, shuffled by `seed`."""
    if micro_batch_size <= 0:
        raise config_error(f"train.micro_batch_size: must be > 0, got {micro_batch_size}")
    if seed < 0:
        raise config_error(f"seed: streaming needs a non-negative shuffle seed, got {seed}")
    dirs = ensure_all_shards(cfg, ctx)
    # streaming finds rank and world size in RANK/WORLD_SIZE/LOCAL_*: they must agree with the launch context.
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    if (env_world, env_rank) != (ctx.world_size, ctx.rank):
        raise RuntimeError(
            f"streaming reads RANK={env_rank} WORLD_SIZE={env_world} from the environment but the "
            f"launch context says rank {ctx.rank} of {ctx.world_size}; export them before building"
        )
    streams = cfg.stream_configs()
    metas = [read_meta(os.path.abspath(s.remote or d)) or {} for s, d in zip(streams, dirs)]
    tok = tokenizer_info(cfg)  # trained by now (ensure_all_shards)
    text = get_dataset(cfg.dataset).modality == "text"  # packed into rows; images and pairs are batched as is
    fetch = _docs_per_fetch(cfg, metas, micro_batch_size) if text else micro_batch_size
    if cfg.streams:
        stream_cls = import_streaming().Stream
        where = {
            "streams": [
                stream_cls(
                    local=os.path.abspath(d),
                    remote=os.path.abspath(s.remote) if s.remote else None,
                    proportion=c.proportion,
                    repeat=c.repeat,
                )
                for s, d, c in zip(streams, dirs, cfg.streams)
            ]
        }
    else:
        where = {
            "local": os.path.abspath(dirs[0]),
            "remote": os.path.abspath(cfg.remote) if cfg.remote else None,
        }
    # One job at a time per node picks a shared-memory prefix (pretrain.data.shm.prefix_lock); inside the lock,
    # so no other Tessera job is registering while the leftovers of killed ones are cleaned.
    with prefix_lock(ctx.local_rank == 0):
        # ends in a barrier: the other ranks walk the prefixes only once it is held
        _clean_stale_shared_memory(ctx)
        dataset = _dataset_class()(
            decoder=sample_decoder(cfg, tok),
            aug_seed=seed,
            **where,
            shuffle=cfg.shuffle,
            shuffle_seed=seed,
            batch_size=fetch,  # streaming needs it to partition batches deterministically across workers
        )
    loader = _loader_class()(
        dataset,
        batch_size=fetch,
        num_workers=cfg.num_workers,
        drop_last=not text,  # text: the last documents of an epoch are packed too, never dropped
        persistent_workers=False,
        pin_memory=ctx.device.type == "cuda" and not text,  # text batches are packed on the CPU first
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
        packer=Packer(cfg.seq_len, tok.padding_id) if text else None,
        docs_per_fetch=fetch if text else None,
        ctx=ctx,
    )
    train_loader.classes = metas[0].get("classes")  # (no walk of a source tree here: export falls back)
    if text:
        train_loader.tokens_per_epoch = sum(m.get("tokens") or 0 for m in metas) or None
    elif tok is not None:
        train_loader.truncated_captions = _report_truncation(cfg, metas, ctx)
    if len(train_loader.loader) == 0:
        train_loader.close()
        if text:
            raise config_error(f"data.dataset: no documents for {ctx.world_size} ranks in {', '.join(dirs)}")
        raise config_error(
            f"train.micro_batch_size: {micro_batch_size} is more than the {len(dataset)} samples each of the "
            f"{ctx.world_size} ranks gets from {', '.join(dirs)}"
        )
    return train_loader
