"""Shards ready before anyone reads them: rank 0 converts (first use) and validates, every rank learns the outcome.

Used by the train loader on every rank and by `load_split` in a single process (a default `DistContext()`: one
rank, so no collective is ever entered, whatever process group the caller may have).
"""

from __future__ import annotations

import logging
import os

from pretrain.data.config import DataConfig
from pretrain.data.mds import ShardError, convert, read_meta, validate_shards
from pretrain.dist import DistContext

log = logging.getLogger(__name__)


def _check_meta(shard_dir: str, cfg: DataConfig, subset_ok: bool = False) -> None:
    """Shards converted for another dataset, split or subset size must not be read silently as this one.

    With cfg.max_samples None whatever the directory holds is used. subset_ok: the reader takes the first
    cfg.max_samples itself, so shards holding more are fine; the train loader reads all, so sizes must match.
    """
    meta = read_meta(shard_dir)
    if meta is None:
        return  # shards from another tool: nothing to compare
    want = {"dataset": cfg.dataset, "split": cfg.split, "max_samples": cfg.max_samples}
    have = {k: meta.get(k) for k in want}
    converted = have["max_samples"]
    if cfg.max_samples is None or (subset_ok and (converted is None or converted >= cfg.max_samples)):
        have["max_samples"] = cfg.max_samples
    if have != want:
        raise ShardError(
            f"{os.path.join(shard_dir, 'tessera.json')}: shards hold {have} but the config asks for {want}; "
            "point data.local/remote elsewhere or delete the directory"
        )


def _prepare(cfg: DataConfig, subset_ok: bool) -> str:
    """Rank 0's part of ensure_shards: convert if needed, validate, return the directory to read."""
    if cfg.remote:
        if not os.path.exists(os.path.join(cfg.remote, "index.json")):
            raise ShardError(
                f"{cfg.remote}: no index.json; convert into it first with: python -m pretrain.data convert "
                f"{cfg.dataset} --split {cfg.split} --out {cfg.remote}"
                + (f" --source {cfg.source}" if cfg.source else "")
                + (f" --max-samples {cfg.max_samples}" if cfg.max_samples else "")
            )
        validate_shards(cfg.remote)
        _check_meta(cfg.remote, cfg, subset_ok)
        return cfg.local_dir()
    local = cfg.local_dir()
    if not os.path.exists(os.path.join(local, "index.json")):
        log.info("no shards at %s: converting %s/%s there (first use)", local, cfg.dataset, cfg.split)
        try:
            convert(cfg.dataset, cfg.split, local, source=cfg.source, max_samples=cfg.max_samples)
        except FileExistsError as err:  # files but no index.json: not ours to overwrite
            raise ShardError(f"data.local: {err}") from err
    validate_shards(local)
    _check_meta(local, cfg, subset_ok)
    return local


def ensure_shards(cfg: DataConfig, ctx: DistContext, subset_ok: bool = False) -> str:
    """Make sure shards exist and are whole before any rank streams them; returns the local dir to read.

    Rank 0 converts and validates; the others wait in the broadcast of its outcome (a collective, so it is the
    barrier), which carries rank 0's error too: a failed conversion raises on every rank instead of leaving
    the others blocked forever. `local` must be visible to every rank (one node, or a shared filesystem);
    multi-node jobs with node-local disks should set `remote`.
    """
    cfg.validate()
    if ctx.world_size > 1 and not ctx.distributed:  # rank 1 would otherwise go on with no directory at all
        raise RuntimeError(
            f"rank {ctx.rank} of {ctx.world_size} has no process group to learn rank 0's shards from; "
            "join it first (pretrain.dist.init_distributed)"
        )
    local, error = None, None
    if ctx.is_main:
        try:
            local = _prepare(cfg, subset_ok)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            ctx.broadcast_object((None, error))
            raise
    local, error = ctx.broadcast_object((local, error))
    if error is not None:
        raise ShardError(f"rank 0 could not prepare the shards: {error}")
    if not cfg.remote and not os.path.exists(os.path.join(local, "index.json")):
        raise ShardError(
            f"{local}: rank {ctx.rank} cannot see the shards rank 0 wrote (not a shared filesystem?)"
        )
    return local
