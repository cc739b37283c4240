"""Text -> MDS token shards (one sample per document), and the in-order readers of a token split for evals.

Conversion tokenizes once with the run's tokenizer (tokenizers' batch encoder, parallel in Rust), appends EOS to
every document (and prepends BOS with data.add_bos), and records in tessera.json the tokenizer (path, sha256),
vocabulary, document and token counts and what was skipped: empty documents always, unreadable ones (not UTF-8,
not JSON) with data.bad_samples=skip. The shard directory is written atomically by `mds.convert`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig
from pretrain.data.fields import columns, token_dtype
from pretrain.data.packing import Packer
from pretrain.data.sources import SourceError, get_dataset
from pretrain.data.tokenizer import TokenizerInfo, ensure_tokenizer, load_tokenizer

log = logging.getLogger(__name__)
ENCODE_BATCH = 1000  # documents per call of the batch encoder


def _readable_documents(cfg: DataConfig, stats: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The split's documents, minus empty ones and (skip mode) unreadable ones, counted in stats["skipped"]."""
    info = get_dataset(cfg.dataset)
    for doc in info.documents(cfg.split, cfg.source, cfg):
        if cfg.max_samples is not None and stats["documents"] >= cfg.max_samples:
            return
        if "error" in doc:
            if cfg.bad_samples != "skip":
                raise SourceError(f"{doc['error']}; data.bad_samples=skip skips and counts such documents")
            log.warning("skipped an unreadable document: %s", doc["error"])
            stats["skipped"][doc["kind"]] = stats["skipped"].get(doc["kind"], 0) + 1
            continue
        if not doc["text"].strip():
            stats["skipped"]["empty"] += 1
            continue
        stats["documents"] += 1
        yield doc


def write_token_rows(writer: Any, cfg: DataConfig, tok: TokenizerInfo) -> dict[str, Any]:
    """Tokenize cfg's split into `writer` (an MDSWriter with `token_columns`); returns the counts for tessera.json."""
    tok.require(["eos"], "packing (an EOS closes every document)")
    if cfg.add_bos:
        tok.require(["bos"], "data.add_bos")
    tokenizer = load_tokenizer(tok.path)
    dtype = token_dtype(tok.vocab_size)
    labeled = "label" in get_dataset(cfg.dataset).fields
    stats: dict[str, Any] = {
        "documents": 0,
        "tokens": 0,
        "longest": 0,
        "skipped": {"empty": 0},
        "labels": set(),
    }
    head = [tok.bos_id] if cfg.add_bos else []
    batch: list[dict[str, Any]] = []

    def flush() -> None:
        encodings = tokenizer.encode_batch([d["text"] for d in batch], add_special_tokens=False)
        for doc, enc in zip(batch, encodings):
            ids = np.asarray(head + enc.ids + [tok.eos_id], dtype=dtype)
            row = {"tokens": ids}
            if labeled:
                row["label"] = int(doc["label"])
                stats["labels"].add(int(doc["label"]))
            writer.write(row)
            stats["tokens"] += len(ids)
            stats["longest"] = max(stats["longest"], len(ids))
        batch.clear()

    for doc in _readable_documents(cfg, stats):
        batch.append(doc)
        if len(batch) == ENCODE_BATCH:
            flush()
    if batch:
        flush()
    return stats


def token_columns(cfg: DataConfig, tok: TokenizerInfo) -> dict[str, str]:
    return columns(get_dataset(cfg.dataset).fields, tok.vocab_size)


def text_meta(cfg: DataConfig, tok: TokenizerInfo, stats: dict[str, Any]) -> dict[str, Any]:
    labels = stats["labels"]
    classes = get_dataset(cfg.dataset).class_names(cfg.split, cfg.source)
    return {
        "modality": "text",
        "count": stats["documents"],
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "longest_document": stats["longest"],
        "skipped": stats["skipped"],
        "tokenizer": {"path": tok.path, "sha256": tok.sha256, "trained": tok.trained},
        "vocab_size": tok.vocab_size,
        "token_dtype": token_dtype(tok.vocab_size).name,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id if cfg.add_bos else None,
        "add_bos": cfg.add_bos,
        "split_by": cfg.split_by,
        "text_field": cfg.text_field,
        "num_classes": len(classes) if classes else (max(labels) + 1 if labels else None),
        "classes": classes,
    }


# ---------------------------------------------------------------------------------------------- eval readers


def _split_config(
    data: DataConfig, split: str | None, local: str | None, max_samples: int | None, source: str | None
) -> DataConfig:
    """The single-dataset config of `split` (the first stream's dataset with data.streams)."""
    first = data.stream_configs()[0]
    split = split or first.split
    if split == first.split and local is None and source is None:  # the run's own shards (or fewer of them)
        return first if max_samples is None else dataclasses.replace(first, max_samples=max_samples)
    return dataclasses.replace(
        first, split=split, local=local, remote=None, max_samples=max_samples, source=source or first.source
    )


def _documents(
    data: DataConfig, split: str | None, local: str | None, max_samples: int | None, source: str | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(sample id, tokens) of every document of the split, in shard order; converted first if missing, with
    the run's tokenizer (shards of another tokenizer are refused)."""
    from pretrain.data.prepare import ensure_shards
    from pretrain.dist import DistContext

    tok = ensure_tokenizer(data)
    if tok is None:
        raise ValueError(f"data.dataset: {data.dataset!r} holds images, not text")
    cfg = _split_config(data, split, local, max_samples, source)
    shard_dir = ensure_shards(cfg, DistContext(), subset_ok=True, tokenizer=tok)
    reader = import_streaming().LocalDataset(shard_dir)
    n = len(reader) if cfg.max_samples is None else min(len(reader), cfg.max_samples)
    for i in range(n):
        yield i, torch.from_numpy(np.asarray(reader[i]["tokens"]).astype(np.int64))


def load_token_split(
    data: DataConfig,
    split: str | None = None,
    seq_len: int | None = None,
    max_rows: int | None = None,
    local: str | None = None,
    max_samples: int | None = None,
    source: str | None = None,
) -> dict[str, torch.Tensor]:
    """A text split packed into rows, in shard order, no shuffle: {"input_ids", "positions", "doc_ids" (R, N),
    "index" (K,)} as the train loader yields them (the last row padded). For held-out perplexity.

    `data` is the run's DataConfig (its dataset and tokenizer); `split` defaults to its split, `seq_len` to
    data.seq_len. `local`: the split's shard dir (default data/shards/<dataset>/<split>[-first<N>]),
    converted on first use, from `source` for datasets that read each split from its own files (default
    data.source). One process: call it from one rank.
    """
    packer = Packer(seq_len or data.seq_len, ensure_tokenizer(data).padding_id)
    rows: list[dict[str, torch.Tensor]] = []
    limit = max_rows if max_rows is not None else float("inf")
    count = 0
    for sample_id, tokens in _documents(data, split, local, max_samples, source):
        packer.add(sample_id, tokens)
        while count < limit and packer.can_emit(1):
            rows.append(packer.emit(1))
            count += 1
        if count >= limit:
            break
    while count < limit and (last := packer.emit(1, final=True)) is not None:
        rows.append(last)
        count += 1
    if not rows:
        raise ValueError(f"data.split: {split or data.split!r} of {data.dataset!r} has no documents")
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def token_counts(
    data: DataConfig,
    split: str | None = None,
    local: str | None = None,
    max_samples: int | None = None,
    source: str | None = None,
) -> torch.Tensor:
    """(vocab_size,) int64: how often each id occurs in the split's documents (EOS/BOS included), e.g. for a
    unigram baseline's perplexity."""
    tok = ensure_tokenizer(data)
    counts = torch.zeros(tok.vocab_size, dtype=torch.int64)
    for _, tokens in _documents(data, split, local, max_samples, source):
        counts += torch.bincount(tokens, minlength=tok.vocab_size)
    return counts
