"""Raw dataset -> MDS shards (written atomically), and a check that a shard directory is whole.

Images are stored as PNG + label; text as token ids (pretrain.data.tokens), one sample per document; image-text
pairs as PNG + caption token ids + caption (+ label) (pretrain.data.image_text).

Shards are what every rank streams from; a half-written directory must never look like a dataset, so `convert`
writes into `<out>.tmp-<pid>` and renames it into place only after `index.json` and `tessera.json` exist.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

from pretrain.data import image_text, tokens
from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig
from pretrain.data.sources import SourceError, get_dataset
from pretrain.data.tokenizer import TokenizerInfo, ensure_tokenizer

log = logging.getLogger(__name__)

# ~4 MB shards: Fashion-MNIST train (~60k PNGs of ~330 bytes) becomes several shards, so partitioning and
# remote streaming are exercised even on the small sets.
SHARD_SIZE_LIMIT = 4 << 20
COLUMNS = {"image": "png", "label": "int"}
META_NAME = "tessera.json"


class ShardError(ValueError):
    """A shard directory is missing, incomplete or corrupt; the message names the file and what is wrong."""


def convert(
    dataset_name: str,
    split: str,
    out_dir: str,
    source: str | None = None,
    max_samples: int | None = None,
    size_limit: int = SHARD_SIZE_LIMIT,
    overwrite: bool = False,
    data: DataConfig | None = None,
    tokenizer: TokenizerInfo | None = None,
) -> dict[str, Any]:
    """Write `dataset_name/split` as MDS shards into `out_dir`; returns the tessera.json metadata.

    Text datasets are tokenized on the way (pretrain.data.tokens), image-text captions too
    (pretrain.data.image_text): `data` carries the options (tokenizer, vocab_size, text_field, image_field,
    split_by, add_bos, bad_samples; default DataConfig()), `tokenizer` the run's tokenizer (default: data's,
    trained first if needed).
    """
    info = get_dataset(dataset_name)
    streaming = import_streaming()
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        what = "shards" if os.path.exists(os.path.join(out_dir, "index.json")) else "files but no index.json"
        raise FileExistsError(f"{out_dir} already holds {what}; delete it or pass overwrite/--overwrite")
    text = None
    if info.modality in ("text", "image_text"):
        base = data or DataConfig(dataset=dataset_name)
        cfg = dataclasses.replace(
            base,
            dataset=dataset_name,
            split=split,
            source=source,
            max_samples=max_samples,
            local=out_dir,
            streams=[],
        )
        tok = tokenizer or ensure_tokenizer(base if data else cfg)
        text = (cfg, tok)

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an earlier, interrupted call
    log.info("converting %s/%s -> %s (shards of <= %d bytes)", dataset_name, split, out_dir, size_limit)
    count, labels, extra = 0, set(), {}
    try:
        if info.modality == "image_text":
            with streaming.MDSWriter(
                out=tmp, columns=image_text.pair_columns(*text), size_limit=size_limit
            ) as writer:
                stats = image_text.write_pair_rows(writer, *text)
            count, extra = stats["pairs"], image_text.pair_meta(*text, stats)
        elif text is None:
            mode = "L" if info.channels == 1 else "RGB"
            with streaming.MDSWriter(out=tmp, columns=COLUMNS, size_limit=size_limit) as writer:
                for sample in info.samples(split, source, max_samples):
                    writer.write({"image": sample["image"].convert(mode), "label": int(sample["label"])})
                    labels.add(int(sample["label"]))
                    count += 1
        else:
            with streaming.MDSWriter(
                out=tmp, columns=tokens.token_columns(*text), size_limit=size_limit
            ) as writer:
                stats = tokens.write_token_rows(writer, *text)
            count, extra = stats["documents"], tokens.text_meta(*text, stats)
        if count == 0:
            raise SourceError(f"{dataset_name}/{split} produced no samples")
        meta = {
            "dataset": dataset_name,
            "split": split,
            "count": count,
            "available": info.count(split, source) if info.modality != "text" else None,
            "max_samples": max_samples,
            "channels": getattr(info, "channels", None),
            "num_classes": max(labels) + 1 if labels else None,
            "classes": info.class_names(split, source),
            "source": os.path.abspath(source) if source else None,
            **extra,
        }
        with open(os.path.join(tmp, META_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d samples of %s/%s to %s", count, dataset_name, split, out_dir)
    return meta


def _move_into_place(tmp: str, out_dir: str) -> None:
    """rename() is atomic within a filesystem: readers see either no index.json or the complete dataset."""
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    if os.path.isdir(out_dir) and os.listdir(out_dir):  # overwrite: swap the old one out first
        old = f"{out_dir}.old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty directory: rename() onto it works on POSIX, not everywhere else
        os.rename(tmp, out_dir)


def read_meta(shard_dir: str) -> dict[str, Any] | None:
    """tessera.json next to index.json, or None for shards written by other tools."""
    path = os.path.join(shard_dir, META_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise ShardError(f"{path}: bad JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shard_files(shard: Any, where: str) -> list[dict[str, Any]]:
    """The files one index.json entry describes (raw, plus zip when compressed), each with a basename and a
    byte size; `where` names the entry in errors."""
    if not isinstance(shard, dict):
        raise ShardError(f"{where}: expected an object, got {type(shard).__name__}")
    if not _is_count(shard.get("samples")):
        raise ShardError(f"{where}: 'samples' must be an integer >= 0, got {shard.get('samples')!r}")
    # A compressed shard may be present raw (already decompressed) or zipped; either copy will do.
    keys = ["raw_data"] + (["zip_data"] if shard.get("compression") else [])
    files = []
    for key in keys:
        entry = shard.get(key)
        if entry is None:
            continue
        if not isinstance(entry, dict):
            raise ShardError(f"{where}: '{key}' must be an object with 'basename' and 'bytes', got {entry!r}")
        if not isinstance(entry.get("basename"), str) or not entry["basename"]:
            raise ShardError(f"{where}: '{key}' has no 'basename' file name (got {entry.get('basename')!r})")
        if not _is_count(entry.get("bytes")):
            raise ShardError(f"{where}: '{key}.bytes' must be an integer >= 0, got {entry.get('bytes')!r}")
        files.append(entry)
    if not files:
        raise ShardError(f"{where}: no 'raw_data' (or 'zip_data') entry")
    return files


def validate_shards(shard_dir: str) -> dict[str, Any]:
    """Check index.json and every shard it lists (present, exact byte size); returns the parsed index.

    Cheap (stat calls only) so every run can afford it before training starts rather than failing mid-epoch.
    Anything wrong, including a malformed index.json, raises ShardError naming the file and the entry.
    """
    index_path = os.path.join(shard_dir, "index.json")
    if not os.path.isdir(shard_dir):
        raise ShardError(f"{shard_dir}: shard directory does not exist")
    if not os.path.exists(index_path):
        raise ShardError(f"{index_path}: missing (not converted, or an interrupted conversion)")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        raise ShardError(f"{index_path}: bad JSON ({err})") from err
    shards = index.get("shards") if isinstance(index, dict) else None
    if not isinstance(shards, list):
        raise ShardError(f"{index_path}: no 'shards' list (got {type(shards).__name__})")
    if not shards:
        raise ShardError(f"{index_path}: lists no shards")
    for i, shard in enumerate(shards):
        files = _shard_files(shard, f"{index_path}: shards[{i}]")
        present = [c for c in files if os.path.exists(os.path.join(shard_dir, c["basename"]))]
        if not present:
            raise ShardError(
                f"{os.path.join(shard_dir, files[0]['basename'])}: missing shard file "
                f"(listed in {index_path})"
            )
        path = os.path.join(shard_dir, present[0]["basename"])
        expected, got = present[0]["bytes"], os.path.getsize(path)
        if got != expected:
            what = "truncated" if got < expected else "wrong size"
            raise ShardError(f"{path}: {what}: expected {expected} bytes, got {got}")
    read_meta(shard_dir)
    return index


def num_samples(index: dict[str, Any]) -> int:
    return sum(int(s["samples"]) for s in index["shards"])
