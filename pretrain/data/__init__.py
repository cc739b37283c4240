"""Tessera's data layer: registered datasets -> MDS shards -> resumable per-rank streaming batches, for every
modality.

A registered dataset declares its fields (sources.py; text sources in text_sources.py); conversion writes them as
MDS columns (fields.py; text is tokenized once, tokenizer.py and tokens.py); the ONE loader (stream.py, loader.py)
streams them with exact and elastic resume, bad-sample handling and remote shards, packing text documents into
rows (packing.py) and mixing data.streams. `TesseraStreamingDataset` (alias `ImageStreamingDataset`) is resolved
lazily: defining it imports mosaicml-streaming (and its torchvision shim), which importing this package must not
do; `datasets`, `tokenizers` and `transformers` are imported only when text is read.
"""

from typing import Any

from pretrain.data.compat import import_streaming
from pretrain.data.config import DataConfig, StreamConfig
from pretrain.data.loader import TrainLoader
from pretrain.data.mds import ShardError, convert, read_meta, validate_shards
from pretrain.data.packing import Packer
from pretrain.data.prepare import ensure_all_shards, ensure_shards
from pretrain.data.sources import (
    DATASETS,
    ImageSource,
    Source,
    SourceError,
    get_dataset,
    list_datasets,
    register_dataset,
)
from pretrain.data.split import load_split
from pretrain.data.stream import build_train_loader, sample_seed
from pretrain.data.text_sources import TextSource
from pretrain.data.tokenizer import TokenizerInfo, ensure_tokenizer, hf_tokenizer, tokenizer_info
from pretrain.data.tokens import load_token_split, token_counts
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
    "Packer",
    "ShardError",
    "Source",
    "SourceError",
    "StreamConfig",
    "TesseraStreamingDataset",
    "TextSource",
    "TokenizerInfo",
    "TrainLoader",
    "build_train_loader",
    "convert",
    "ensure_all_shards",
    "ensure_shards",
    "ensure_tokenizer",
    "get_dataset",
    "hf_tokenizer",
    "hflip",
    "import_streaming",
    "list_datasets",
    "load_split",
    "load_token_split",
    "normalize",
    "random_resized_crop",
    "read_meta",
    "register_dataset",
    "resize",
    "sample_seed",
    "to_tensor",
    "token_counts",
    "tokenizer_info",
    "validate_shards",
]


def __getattr__(name: str) -> Any:
    if name in ("TesseraStreamingDataset", "ImageStreamingDataset"):
        from pretrain.data import stream

        return stream.TesseraStreamingDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
