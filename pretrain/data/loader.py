"""TrainLoader: the infinite, exactly resumable iterator over per-rank micro-batches, for images and packed text.

It sits above streaming's DataLoader (`stream.build_train_loader` builds both). Images: each DataLoader batch is
a micro-batch. Text: DataLoader batches are batches of documents that a `packing.Packer` turns into rows; the
documents fetched but not yet emitted are part of the state. Kept apart from stream.py so that it can be driven
by any loader-like object (the tests simulate ranks in threads).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pretrain.data import robust
from pretrain.data.config import config_error
from pretrain.data.mds import ShardError
from pretrain.data.packing import Packer, redistribute
from pretrain.data.shm import release_dataset_memory

log = logging.getLogger(__name__)


class TrainLoader:
    """Infinite iterator over epochs of per-rank batches.

    Images: {"image": (B, C, S, S), "label": (B,), "index": (B,), "epoch": (B,)}.
    Image-text pairs: the same ("label" only when the dataset has classes) plus "input_ids" and "attention_mask"
    (B, data.text_len) int64; `truncated_captions` says how many of the shards' captions text_len cuts.
    Text (a `packer`): micro_batch_size rows of exactly seq_len tokens, {"input_ids", "positions", "doc_ids"
    (B, N) int64, "index" (K,) the sample id of each document piece in row order} (pretrain.data.packing).

    `state_dict()` after k batches + `load_state_dict()` on a fresh loader (same config, world size, batch size
    and seed) yields exactly what batch k+1, k+2, ... would have been, across epoch boundaries. Call it on every
    rank at the same time: the state is the same on all of them (streaming counts samples as batches x world
    size; for text, every rank's pending documents are gathered into it).

    Text and several ranks: every rank fetches document batches in lockstep (one all-reduce per fetch asks
    whether any rank still needs documents; if so all fetch), so streaming's count is the same on every rank
    and all ranks reach an epoch's end, and streaming's barrier there, together. A rank that fetched more than
    it needed keeps the rest pending for its next micro-batch.

    Undecodable samples (data.bad_samples): "error" raises ShardError; "skip" drops them, so B may be smaller
    than micro_batch_size, and counts them in `bad_samples` (checkpointed). A micro-batch whose samples were all
    skipped is not returned: the next one is. On that rank the stream then runs one batch ahead of the others
    for the rest of the epoch (a resume from a checkpoint taken meanwhile restores one rank's position for all).
    Text rows are always full: a skipped document is simply not packed.
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
        packer: Packer | None = None,
        docs_per_fetch: int | None = None,
        ctx: Any = None,
    ) -> None:
        self.dataset = dataset
        self.loader = loader
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.grad_accum_steps = grad_accum_steps  # a resume must keep the global batch
        self._bad = robust.BadSamplePolicy(bad_samples, max_bad_samples, rank)
        self.packer = packer  # text: documents -> rows
        self.docs_per_fetch = docs_per_fetch  # text: streaming's batch size (documents per fetch)
        self.ctx = ctx  # the collectives (all_reduce_sum) of lockstep fetching and of state_dict
        self._it: Any = None  # the current epoch's iterator; None between epochs
        self._epoch = 0
        self._batch_in_epoch = 0
        self._samples_seen = 0
        self._closed = False
        self.classes: list[str] | None = None  # the dataset's class names (shard metadata), for exports
        self.tokens_per_epoch: int | None = None  # text: the shards' tokens (for batches_per_epoch)
        self.truncated_captions: int | None = None  # pairs: captions longer than data.text_len (tessera.json)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def samples_seen(self) -> int:
        """Samples (text: rows) consumed by all ranks together."""
        return self._samples_seen

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per rank per epoch (the partial last batch is dropped). Text: an estimate, the shards'
        tokens over the tokens of all ranks' micro-batches (padding makes the true number larger)."""
        if self.packer is not None and self.tokens_per_epoch is not None:
            per_batch = self.micro_batch_size * self.packer.seq_len * self.world_size
            return self.tokens_per_epoch // per_batch
        return len(self.loader)

    @property
    def packing_efficiency(self) -> float:
        """Text: real tokens / row tokens this rank emitted since the run began (checkpointed); 1.0 for images."""
        return 1.0 if self.packer is None else self.packer.efficiency

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
        if self.packer is not None:
            return self._next_packed()
        for _ in range(max(1, self.batches_per_epoch) + 1):
            batch = self._next_batch()
            self._bad(batch.pop("bad", []))  # raises ShardError unless skipping (and under the limit)
            if "image" in batch:
                # each sample's epoch: with its id, what masks are drawn from (models.masking), so a resumed or
                # elastic run masks every sample as the uninterrupted run did
                batch["epoch"] = torch.full_like(batch["index"], self._epoch)
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

    def _next_batch(self, count: bool = True) -> dict[str, Any]:
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
        if count:
            self._samples_seen += self.micro_batch_size * self.world_size
        return batch

    # ------------------------------------------------------------------------------------------ text

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any (one all-reduce; none on one rank)."""
        if self.world_size == 1 or not getattr(self.ctx, "distributed", False):
            return flag
        return self.ctx.all_reduce_sum([float(flag)])[0] > 0

    def _next_packed(self) -> dict[str, torch.Tensor]:
        fetched_empty = 0
        while self._any_rank(not self.packer.can_emit(self.micro_batch_size)):
            batch = self._next_batch(count=False)  # every rank fetches: streaming's count stays in step
            self._bad(batch.pop("bad", []))  # raises ShardError unless skipping (and under the limit)
            if "tokens" not in batch:
                fetched_empty += 1
                if fetched_empty > max(1, len(self.loader)) + 1:
                    raise ShardError(
                        f"data.bad_samples: rank {self._bad.rank} skipped every document of more than an epoch "
                        f"of fetches ({self.bad_samples} so far); the data is corrupt throughout"
                    )
                continue
            fetched_empty = 0
            for sample_id, tokens in zip(batch["index"].tolist(), batch["tokens"]):
                self.packer.add(sample_id, tokens)
        self._samples_seen += self.micro_batch_size * self.world_size
        return self.packer.emit(self.micro_batch_size)

    def _gather(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of ints, on every rank: two all-reduces of float64 (exact below 2**53)."""
        if self.world_size == 1 or not getattr(self.ctx, "distributed", False):
            return [list(values)]
        rank = self._bad.rank
        sizes = [0.0] * self.world_size
        sizes[rank] = float(len(values))
        sizes = [int(n) for n in self.ctx.all_reduce_sum(sizes)]
        offsets = [sum(sizes[:r]) for r in range(self.world_size)]
        flat = [0.0] * sum(sizes)
        flat[offsets[rank] : offsets[rank] + len(values)] = [float(v) for v in values]
        flat = self.ctx.all_reduce_sum(flat)
        return [[int(v) for v in flat[o : o + n]] for o, n in zip(offsets, sizes)]

    def _packing_state(self) -> dict[str, Any]:
        """Every rank's packer state (pending pieces as [sample id, start], counters), gathered: the same dict on
        every rank, so that rank 0's state alone can resume any world size."""
        mine = self.packer.state()
        flat = [mine["real_tokens"], mine["row_tokens"], mine["splits"]] + [
            x for p in mine["pending"] for x in p
        ]
        ranks = []
        for f in self._gather(flat):
            pending = [f[i : i + 2] for i in range(3, len(f), 2)]
            ranks.append({"pending": pending, "real_tokens": f[0], "row_tokens": f[1], "splits": f[2]})
        return {"seq_len": self.packer.seq_len, "docs_per_fetch": self.docs_per_fetch, "ranks": ranks}

    def _check_packing(self, state: dict[str, Any]) -> None:
        packing = state.get("packing")
        if (packing is None) != (self.packer is None):
            saved, now = ("text", "images") if self.packer is None else ("images", "text")
            raise config_error(
                f"data.dataset: the data-loader state was saved by a run reading {saved}, this run reads {now}"
            )
        if packing is None:
            return
        for key, value in (("seq_len", self.packer.seq_len), ("docs_per_fetch", self.docs_per_fetch)):
            if packing[key] != value:
                raise config_error(
                    f"data.{key}: the data-loader state was saved with {packing[key]}, this run has {value}; "
                    f"resume with data.{key}={packing[key]} or start a new run"
                )

    def _load_packing(self, packing: dict[str, Any]) -> None:
        """This rank's pending documents (re-read from the shards) and counters; on another world size the old
        ranks' pending pieces are dealt out anew (packing.redistribute)."""
        ranks = packing["ranks"]
        mine = (
            ranks[self._bad.rank]
            if len(ranks) == self.world_size
            else redistribute(ranks, self.world_size)[self._bad.rank]
        )
        for sample_id, start in mine["pending"]:
            sample = self.dataset[sample_id]
            if "error" in sample:
                self._bad([sample])  # raises, unless skipping: then the document is dropped and counted
                continue
            self.packer.add(sample_id, sample["tokens"], start)
        self.packer.real_tokens = mine["real_tokens"]
        self.packer.row_tokens = mine["row_tokens"]
        self.packer.splits = mine["splits"]

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and lists only: fits in any checkpoint format."""
        state = {
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
        if self.packer is not None:
            state["packing"] = self._packing_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; call before the first batch (streaming reads the resume point when an epoch starts).

        Elastic: on another world size the run continues the same global sample order (streaming partitions it
        by its saved `num_canonical_nodes`, not by the number of ranks) when every optimizer step still covers
        the same samples: micro_batch_size x grad_accum_steps x world_size must equal the saved run's. Each
        step then trains on the same set of samples as on the old world size, up to the end of the epoch.
        There each world size drops its own remainder (fewer than micro_batch_size x world_size samples), so
        from the next epoch on steps may be cut differently: no sample is repeated or lost within an epoch,
        but the per-step sets stop matching the old world size's. Text: the documents the old ranks had
        fetched but not packed are dealt to the new ranks, so no token is lost or repeated; rows are packed
        anew from there on.
        """
        if self._it is not None or self._samples_seen:
            raise RuntimeError("load_state_dict must be called before the first batch")
        for key, config_key in (("micro_batch_size", "train.micro_batch_size"), ("seed", "seed")):
            if state[key] != getattr(self, key):
                raise config_error(
                    f"{config_key}: the data-loader state was saved with {state[key]}, this run has "
                    f"{getattr(self, key)}; resume with {config_key}={state[key]} or start a new run"
                )
        self._check_packing(state)
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
        if self.packer is not None:
            self._load_packing(state["packing"])

    def close(self) -> None:
        """Stop workers and threads and free streaming's shared memory; the loader cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        if self._it is not None:
            self._it.close()  # drops the DataLoader iterator, which joins its worker processes
            self._it = None
        if self.dataset is not None and hasattr(self.dataset, "_locals_shm"):
            release_dataset_memory(self.dataset)

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
