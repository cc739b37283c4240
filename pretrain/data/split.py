"""A whole split as tensors, in shard order and without augmentation: what linear probes, small evals and held-out
retrieval / zero-shot read (`load_split` for labelled images, `load_pairs` for image-text pairs)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig
from pretrain.data.mds import read_meta
from pretrain.data.prepare import ensure_shards
from pretrain.data.sources import get_dataset
from pretrain.data.transforms import ImageTransform
from pretrain.dist import DistContext


def load_split(
    dataset: str,
    split: str,
    image_size: int,
    max_samples: int | None = None,
    local: str | None = None,
    source: str | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in shard order, no augmentation -> (images (N, C, S, S) normalized, labels (N,) int64).

    For linear probes and small evals, in one process: reads the MDS shards directly (no shared memory, no
    workers), converting them first if missing. Without `local`, the full split's default directory (what a
    training run converts) is read when it exists, rather than converting a separate first-N subset.
    It prepares shards as a one-rank job (no collectives), so in a multi-rank job call it from one rank only.
    Image-text datasets with classes work too (their images and labels); captions: `load_pairs`.
    """
    if local is None and max_samples is not None:
        full = DataConfig(dataset=dataset, split=split).local_dir()
        local = full if os.path.exists(os.path.join(full, "index.json")) else None
    cfg = DataConfig(
        dataset=dataset,
        split=split,
        source=source,
        local=local,
        image_size=image_size,
        max_samples=max_samples,
        mean=mean,
        std=std,
        augment=False,
    )
    shard_dir = ensure_shards(cfg, DistContext(), subset_ok=True)
    info = get_dataset(dataset)
    transform = ImageTransform(image_size, tuple(mean or info.mean), tuple(std or info.std), augment=False)
    mode = "L" if info.channels == 1 else "RGB"
    reader = import_streaming().LocalDataset(shard_dir)
    n = len(reader) if max_samples is None else min(len(reader), max_samples)
    images, labels = [], []
    for i in range(n):
        sample = reader[i]
        if "label" not in sample:
            raise ValueError(
                f"data.dataset: {dataset!r} has no labels in {shard_dir}; load_split reads labelled images "
                "(image-text pairs: load_pairs)"
            )
        images.append(transform(sample["image"].convert(mode)))  # (C, S, S)
        labels.append(int(sample["label"]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


@dataclass
class PairSplit:
    """An image-text split in shard order, as the loader decodes it without augmentation."""

    images: torch.Tensor  # (N, C, S, S) float, normalized
    input_ids: torch.Tensor  # (N, L) int64, L = data.text_len
    attention_mask: torch.Tensor  # (N, L) int64, 1 = real token
    labels: torch.Tensor | None  # (N,) int64, None when the dataset has no classes
    class_names: list[str] | None  # the dataset's classes (zero-shot), from tessera.json
    captions: list[str]  # the raw captions


def load_pairs(
    data: DataConfig,
    split: str | None = None,
    max_samples: int | None = None,
    local: str | None = None,
    source: str | None = None,
) -> PairSplit:
    """An image-text split of the run's data (its dataset, tokenizer, image_size, mean/std, text_len; the first
    stream's with data.streams), in shard order, without augmentation: for held-out retrieval and zero-shot.

    `split` defaults to data.split; `local` is the split's shard dir (default data/shards/<dataset>/<split>...,
    converted on first use from `source`, default data.source). Each sample is decoded exactly as the train loader
    decodes it (its SampleDecoder, with data.augment off). One process: call it from one rank at a time.
    """
    from pretrain.data.stream import sample_decoder
    from pretrain.data.tokenizer import ensure_tokenizer

    if get_dataset(data.dataset).modality != "image_text":
        raise ValueError(
            f"data.dataset: {data.dataset!r} holds {get_dataset(data.dataset).modality}, not pairs"
        )
    tok = ensure_tokenizer(data)
    first = data.stream_configs()[0]
    split = split or first.split
    if split == first.split and local is None and source is None:  # the run's own shards (or fewer of them)
        cfg = dataclasses.replace(first, max_samples=max_samples or first.max_samples, augment=False)
    else:
        cfg = dataclasses.replace(
            first,
            split=split,
            local=local,
            remote=None,
            max_samples=max_samples,
            source=source or first.source,
        )
        cfg.augment = False
    shard_dir = ensure_shards(cfg, DistContext(), subset_ok=True, tokenizer=tok)
    decoder = sample_decoder(cfg, tok)
    reader = import_streaming().LocalDataset(shard_dir)
    n = len(reader) if cfg.max_samples is None else min(len(reader), cfg.max_samples)
    rows, captions = [], []
    for i in range(n):
        raw = reader[i]
        rows.append(decoder.finish(decoder.parse(raw), i, None))
        captions.append(raw["caption"])
    if not rows:
        raise ValueError(f"data.split: {split!r} of {data.dataset!r} has no pairs in {shard_dir}")
    labels = torch.stack([r["label"] for r in rows]) if "label" in rows[0] else None
    classes = (read_meta(shard_dir) or {}).get("classes") if labels is not None else None
    return PairSplit(
        images=torch.stack([r["image"] for r in rows]),
        input_ids=torch.stack([r["input_ids"] for r in rows]),
        attention_mask=torch.stack([r["attention_mask"] for r in rows]),
        labels=labels,
        class_names=classes,
        captions=captions,
    )
