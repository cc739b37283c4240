"""A whole split as two tensors, in shard order and without augmentation: what linear probes and small evals read."""

from __future__ import annotations

import os

import torch

from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig
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
        images.append(transform(sample["image"].convert(mode)))  # (C, S, S)
        labels.append(int(sample["label"]))
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
