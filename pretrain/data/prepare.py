"""Shards ready before anyone reads them: rank 0 converts (first use) and validates, every rank learns the outcome.

Used by the train loader on every rank and by `load_split`/`load_token_split` in a single process (a default
`DistContext()`: one rank, so no collective is ever entered, whatever process group the caller may have).
With data.streams every stream is prepared the same way; an error names the stream (`data.streams[i]`).
Text and image-text shards must have been tokenized with the run's tokenizer (same sha256), else they are
refused.
"""

from __future__ import annotations

import logging
import os

from pretrain.data.config import DataConfig
from pretrain.data.mds import ShardError, convert, read_meta, validate_shards
from pretrain.data.sources import get_dataset
from pretrain.data.tokenizer import TokenizerInfo, ensure_tokenizer, shard_dir
from pretrain.dist import DistContext

log = logging.getLogger(__name__)


def _check_meta(
    shard_dir: str, cfg: DataConfig, subset_ok: bool = False, tok: TokenizerInfo | None = None
) -> None:
    """Shards converted for another dataset, split, subset size or tokenizer must not be read silently as this one.

    With cfg.max_samples None whatever the directory holds is used. subset_ok: the reader takes the first
    cfg.max_samples itself, so shards holding more are fine; the train loader reads all, so sizes must match.
    """
    meta = read_meta(shard_dir)
    if meta is None:
        return  # shards from another tool: nothing to compare
    path = os.path.join(shard_dir, "tessera.json")
    want = {"dataset": cfg.dataset, "split": cfg.split, "max_samples": cfg.max_samples}
    have = {k: meta.get(k) for k in want}
    converted = have["max_samples"]
    if cfg.max_samples is None or (subset_ok and (converted is None or converted >= cfg.max_samples)):
        have["max_samples"] = cfg.max_samples
    if tok is not None:  # text: how the documents were cut and tokenized; pairs: where they were read from
        info = get_dataset(cfg.dataset)
        keys = ("add_bos", "split_by", "text_field") if info.modality == "text" else info.option_keys
        for key in keys:
            want[key], have[key] = getattr(cfg, key), meta.get(key)
    if have != want:
        raise ShardError(
            f"{path}: shards hold {have} but the config asks for {want}; "
            "point data.local/remote elsewhere or delete the directory"
        )
    if tok is not None:
        theirs = meta.get("tokenizer") or {}
        if theirs.get("sha256") != tok.sha256:
            raise ShardError(
                f"{path}: shards were tokenized with {theirs.get('path')} (sha256 {str(theirs.get('sha256'))[:12]}) "
                f"but this run's tokenizer is {tok.describe()}; convert them again with this tokenizer (delete the "
                "directory), or set data.tokenizer to theirs"
            )


def _prepare(cfg: DataConfig, subset_ok: bool, tok: TokenizerInfo | None) -> str:
    """Rank 0's part of ensure_shards for one dataset: convert if needed, validate, return the directory to read."""
    if cfg.remote:
        if not os.path.exists(os.path.join(cfg.remote, "index.json")):
            raise ShardError(
                f"{cfg.remote}: no index.json; convert into it first with: python -m pretrain.data convert "
                f"{cfg.dataset} --split {cfg.split} --out {cfg.remote}"
                + (f" --source {cfg.source}" if cfg.source else "")
                + (f" --max-samples {cfg.max_samples}" if cfg.max_samples else "")
                + (f" --tokenizer {tok.path}" if tok is not None else "")
            )
        validate_shards(cfg.remote)
        _check_meta(cfg.remote, cfg, subset_ok, tok)
        return shard_dir(cfg, tok)
    local = shard_dir(cfg, tok)
    if not os.path.exists(os.path.join(local, "index.json")):
        log.info("no shards at %s: converting %s/%s there (first use)", local, cfg.dataset, cfg.split)
        try:
            convert(
                cfg.dataset,
                cfg.split,
                local,
                source=cfg.source,
                max_samples=cfg.max_samples,
                data=cfg,
                tokenizer=tok,
            )
        except FileExistsError as err:  # files but no index.json: not ours to overwrite
            raise ShardError(f"data.local: {err}") from err
    validate_shards(local)
    _check_meta(local, cfg, subset_ok, tok)
    return local


def _prepare_all(cfg: DataConfig, subset_ok: bool, tok: TokenizerInfo | None) -> list[str]:
    tok = tok or ensure_tokenizer(cfg)
    if not cfg.streams:
        return [_prepare(cfg, subset_ok, tok)]
    dirs = []
    for i, stream in enumerate(cfg.stream_configs()):
        try:
            dirs.append(_prepare(stream, subset_ok, tok))
        except (ValueError, OSError) as err:  # ShardError, SourceError, ConfigError, a missing file...
            message = f"data.streams[{i}] ({stream.dataset}/{stream.split}): {err}"
            try:
                named = type(err)(message)
            except TypeError:  # an error class that takes other arguments
                named = ShardError(message)
            raise named from err
    return dirs


def ensure_all_shards(
    cfg: DataConfig, ctx: DistContext, subset_ok: bool = False, tokenizer: TokenizerInfo | None = None
) -> list[str]:
    """Make sure shards exist and are whole before any rank streams them; returns the local dir of each stream
    (one without data.streams).

    Rank 0 trains the tokenizer (text, first use), converts and validates; the others wait in the broadcast of
    its outcome (a collective, so it is the barrier), which carries rank 0's error too: a failed conversion
    raises on every rank instead of leaving the others blocked forever. `local` must be visible to every rank
    (one node, or a shared filesystem); multi-node jobs with node-local disks should set `remote`.
    `tokenizer`: the run's, when `cfg` is another split of the run's data (default: cfg's own).
    """
    cfg.validate()
    if ctx.world_size > 1 and not ctx.distributed:  # rank 1 would otherwise go on with no directory at all
        raise RuntimeError(
            f"rank {ctx.rank} of {ctx.world_size} has no process group to learn rank 0's shards from; "
            "join it first (pretrain.dist.init_distributed)"
        )
    dirs, error = None, None
    if ctx.is_main:
        try:
            dirs = _prepare_all(cfg, subset_ok, tokenizer)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
            ctx.broadcast_object((None, error))
            raise
    dirs, error = ctx.broadcast_object((dirs, error))
    if error is not None:
        raise ShardError(f"rank 0 could not prepare the shards: {error}")
    for stream, local in zip(cfg.stream_configs(), dirs):
        if not stream.remote and not os.path.exists(os.path.join(local, "index.json")):
            raise ShardError(
                f"{local}: rank {ctx.rank} cannot see the shards rank 0 wrote (not a shared filesystem?)"
            )
    return dirs


def ensure_shards(
    cfg: DataConfig, ctx: DistContext, subset_ok: bool = False, tokenizer: TokenizerInfo | None = None
) -> str:
    """ensure_all_shards for a config without streams: the one local dir to read."""
    if cfg.streams:
        raise ValueError("data.streams: ensure_shards reads one dataset; use ensure_all_shards")
    return ensure_all_shards(cfg, ctx, subset_ok, tokenizer)[0]
