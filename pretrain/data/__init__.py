"""Tessera's data layer: registered datasets -> MDS shards -> resumable per-rank streaming batches.

`ImageStreamingDataset` is resolved lazily: defining it imports mosaicml-streaming (and its torchvision shim),
which importing this package must not do.
"""

from typing import Any

from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig
from pretrain.data.mds import ShardError, convert, read_meta, validate_shards
from pretrain.data.prepare import ensure_shards
from pretrain.data.sources import (
    DATASETS,
    ImageSource,
    SourceError,
    get_dataset,
    list_datasets,
    register_dataset,
)
from pretrain.data.split import load_split
from pretrain.data.stream import TrainLoader, build_train_loader, sample_seed
from pretrain.data.transforms import (
    ImageTransform,
    hflip,
    normalize,
    random_resized_crop,
    resize,
    to_tensor,
)

__all__ = [
    "DATASETS",
    "DataConfig",
    "ImageSource",
    "ImageStreamingDataset",
    "ImageTransform",
    "ShardError",
    "SourceError",
    "TrainLoader",
    "build_train_loader",
    "convert",
    "ensure_shards",
    "get_dataset",
    "hflip",
    "import_streaming",
    "list_datasets",
    "load_split",
    "normalize",
    "random_resized_crop",
    "read_meta",
    "register_dataset",
    "resize",
    "sample_seed",
    "to_tensor",
    "validate_shards",
]


def __getattr__(name: str) -> Any:
    if name == "ImageStreamingDataset":
        from pretrain.data import stream

        return stream.ImageStreamingDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
