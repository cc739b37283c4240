"""Corrupt inputs -> a named ShardError or a counted skip, never a hang or an opaque struct/PIL error.

Two kinds of fault, two policies:
- shard-level (a shard file missing, truncated or changed size after the run started; a remote that cannot
  deliver a shard): always a ShardError naming the file. Skipping would silently drop a whole shard.
- sample-level (the shard file is intact but one sample's bytes do not decode): `data.bad_samples` decides,
  "error" raises ShardError naming the shard file, sample id, column and the decoder's message; "skip" drops
  the sample from its micro-batch and TrainLoader counts it (BadSamplePolicy).

Both travel from the dataset to the training process as *data* (a marker sample, collated into the batch's "bad"
list), not as exceptions: a DataLoader worker's exception reaches the main process re-wrapped with its worker
traceback as the message, and a marker crosses the process boundary with its message intact.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import deque
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import default_collate

from pretrain.data.compat import import_streaming
from pretrain.data.config import config_error
from pretrain.data.mds import ShardError

# "tessera.data", not __name__: a child of the run's "tessera" logger, so skips show in the run's log on every rank.
log = logging.getLogger("tessera.data")

BAD_SAMPLE_MODES = ("error", "skip")
LAST_BAD_KEPT = 16  # how many of the most recent skipped sample ids TrainLoader keeps for the logs

# What reading or decoding a corrupt sample raises: PIL (UnidentifiedImageError and "broken data stream" are
# OSError, "broken PNG file" is SyntaxError, a bomb is its own class), numpy (ValueError on a short buffer),
# streaming (IndexError when the offsets point past the data), zlib/struct/EOF from the PNG plugin.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    IndexError,
    SyntaxError,
    EOFError,
    zlib.error,
    struct.error,
    Image.DecompressionBombError,
)


# ---------------------------------------------------------------------------------------------- shard files


def shard_path(shard: Any) -> str:
    """The local file of one streaming MDS reader (`dataset.shards[i]`)."""
    return os.path.join(shard.dirname, shard.split or "", shard.raw_data.basename)


def remote_path(remote: str | None, shard: Any) -> str | None:
    return None if remote is None else os.path.join(remote, shard.split or "", shard.raw_data.basename)


def check_shard_file(shard: Any, remote: str | None) -> None:
    """Raise ShardError if the shard's local file is gone (with nothing to fetch it from) or not its indexed size.

    One stat per sample: validate_shards checked every file at start, this catches what changed since (a file
    deleted, truncated or rewritten mid-run; a truncated copy fetched from a remote). With a remote, an absent
    local file is normal: streaming fetches it (and `prepare_shard` names the remote if that fails).
    """
    path = shard_path(shard)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        zipped = shard.zip_data is not None and os.path.exists(
            os.path.join(os.path.dirname(path), shard.zip_data.basename)
        )
        if remote is not None or zipped:
            return
        raise ShardError(
            f"{path}: missing shard file (listed in {os.path.join(os.path.dirname(path), 'index.json')}; "
            "deleted after the run started?)"
        ) from None
    expected = shard.raw_data.bytes
    if size != expected:
        what = "truncated" if size < expected else "wrong size"
        source = remote_path(remote, shard)
        hint = (
            f" (the local copy of {source}; delete it to fetch it again)"
            if source
            else " (changed after the run started?)"
        )
        raise ShardError(f"{path}: {what}: expected {expected} bytes, got {size}{hint}")


# ---------------------------------------------------------------------------------------------- bad samples


def bad_sample(index: int, error: str, fatal: bool) -> dict[str, Any]:
    """The marker a dataset yields in place of a sample: plain types, so it pickles out of a worker as is."""
    return {"index": int(index), "error": error, "fatal": fatal}


def find_bad_column(shard: Any, row: int) -> str | None:
    """Re-read row `row` of an MDS shard and decode it column by column: the first column that fails, or None.

    Only called after a failure, to name the column: streaming decodes a whole sample at once. Raises
    ShardError if the file cannot be read at all.
    """
    try:
        data = shard.get_sample_data(row)
    except OSError as err:  # the file itself cannot be read: the shard's fault, not this sample's
        raise ShardError(f"{shard_path(shard)}: cannot read row {row}: {type(err).__name__}: {err}") from err
    except DECODE_ERRORS:  # offsets pointing outside the data
        return None
    sizes, at = [], 0
    for size in shard.column_sizes:  # variable-size columns (None) store their size up front as uint32
        if size is None:
            if len(data) < at + 4:
                return None
            size = int(np.frombuffer(data[at : at + 4], np.uint32)[0])
            at += 4
        sizes.append(size)
    import_streaming()
    from streaming.base.format.mds.encodings import mds_decode

    for name, encoding, size in zip(shard.column_names, shard.column_encodings, sizes):
        try:
            value = mds_decode(encoding, data[at : at + size])
            if isinstance(value, Image.Image):
                value.load()  # PIL decodes pixels lazily: a corrupt pixel stream fails only here
        except DECODE_ERRORS:
            return name
        at += size
    return None


def describe_bad_sample(shard: Any, row: int, sample_id: int, err: BaseException) -> str:
    column = find_bad_column(shard, row)
    where = f"column {column!r}" if column else "its bytes"
    return (
        f"{shard_path(shard)}: sample {sample_id} (row {row} of the shard), {where}: cannot decode: "
        f"{type(err).__name__}: {err}"
    )


RAGGED = ("tokens",)  # fields of varying length per sample: collated as a list of tensors, not stacked


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples (ragged fields, a document's tokens, as a list); the markers of bad ones go to
    batch["bad"] (a list, possibly empty).

    The batch may be smaller than asked, or hold no "image"/"tokens" at all when every sample was bad.
    """
    good = [s for s in samples if "error" not in s]
    ragged = [k for k in RAGGED if good and k in good[0]]
    if ragged:
        batch: dict[str, Any] = default_collate(
            [{k: v for k, v in s.items() if k not in ragged} for s in good]
        )
        batch.update({k: [s[k] for s in good] for k in ragged})
    else:
        batch = default_collate(good) if good else {}
    batch["bad"] = [s for s in samples if "error" in s]
    return batch


def fetched(batch: dict[str, Any]) -> int:
    """Samples a collated batch consumed from the stream, good and bad: what streaming must count to resume."""
    index = batch.get("index")
    return (0 if index is None else len(index)) + len(batch["bad"])


class BadSamplePolicy:
    """Turns a batch's bad-sample markers into a ShardError or a count, per `data.bad_samples`.

    Runs in the training process (TrainLoader), so the count is per rank, whatever the number of workers.
    """

    def __init__(self, mode: str = "error", limit: int = 0, rank: int = 0) -> None:
        if mode not in BAD_SAMPLE_MODES:
            raise config_error(f"data.bad_samples: must be one of {list(BAD_SAMPLE_MODES)}, got {mode!r}")
        self.mode, self.limit, self.rank = mode, limit, rank
        self.count = 0  # samples skipped on this rank over the whole run (checkpointed by TrainLoader)
        self.last: deque[int] = deque(maxlen=LAST_BAD_KEPT)

    def __call__(self, bad: list[dict[str, Any]]) -> None:
        fatal = [b for b in bad if b["fatal"]]
        if fatal:
            raise ShardError(fatal[0]["error"])
        if not bad:
            return
        if self.mode == "error":
            more = f" (and {len(bad) - 1} more bad samples in this batch)" if len(bad) > 1 else ""
            raise ShardError(f"{bad[0]['error']}{more}; data.bad_samples=skip skips and counts such samples")
        for b in bad:
            self.count += 1
            self.last.append(b["index"])
            log.warning(
                "rank %d skipped bad sample %d (%d so far): %s", self.rank, b["index"], self.count, b["error"]
            )
        if self.count > self.limit:
            raise ShardError(
                f"data.max_bad_samples: rank {self.rank} has skipped {self.count} bad samples, more than the "
                f"limit of {self.limit}; the last: {bad[-1]['error']}"
            )


def as_shard_error(err: BaseException, what: str) -> ShardError:
    """`err` as a ShardError whose message says where it came from (`what`), unless it already is one."""
    if isinstance(err, ShardError):
        return err
    return ShardError(f"{what}: {type(err).__name__}: {err}")
