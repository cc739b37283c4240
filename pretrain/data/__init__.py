"""Tessera's data layer: registered datasets -> MDS shards -> resumable per-rank streaming batches, for every
modality (images, text, image-text pairs).

A registered dataset declares its fields (sources.py; text sources in text_sources.py, image-text pairs in
image_text.py); conversion writes them as MDS columns (fields.py; text and captions are tokenized once,
tokenizer.py, tokens.py, clip_bpe.py for the CLIP BPE); the ONE loader (stream.py, loader.py)
streams them with exact and elastic resume, bad-sample handling and remote shards, packing text documents into
rows (packing.py) and mixing data.streams. `TesseraStreamingDataset` (alias `ImageStreamingDataset`) is resolved
lazily: defining it imports mosaicml-streaming (and its torchvision shim), which importing this package must not
do; `datasets`, `tokenizers` and `transformers` are imported only when text is read.
"""

import importlib
from typing import Any

# name -> the module defining it. Resolved on first use (PEP 562), so that importing one light module of the
# package (pretrain.data.config, which the config tree imports) does not import the whole data layer.
_EXPORTS = {
    "import_streaming": "compat",
    "CLIP_BPE_DIR": "clip_bpe",
    "DataConfig": "config",
    "StreamConfig": "config",
    "TrainLoader": "loader",
    "ShardError": "mds",
    "convert": "mds",
    "read_meta": "mds",
    "validate_shards": "mds",
    "EmojiEntry": "image_text",
    "ImageTextSource": "image_text",
    "emoji_entries": "image_text",
    "emoji_split": "image_text",
    "tokenize_captions": "image_text",
    "Packer": "packing",
    "ensure_all_shards": "prepare",
    "ensure_shards": "prepare",
    "DATASETS": "sources",
    "ImageSource": "sources",
    "Source": "sources",
    "SourceError": "sources",
    "get_dataset": "sources",
    "list_datasets": "sources",
    "register_dataset": "sources",
    "PairSplit": "split",
    "load_pairs": "split",
    "load_split": "split",
    "build_train_loader": "stream",
    "sample_seed": "stream",
    "TesseraStreamingDataset": "stream",
    "ImageStreamingDataset": "stream",
    "TextSource": "text_sources",
    "TokenizerInfo": "tokenizer",
    "ensure_tokenizer": "tokenizer",
    "hf_tokenizer": "tokenizer",
    "tokenizer_info": "tokenizer",
    "load_token_split": "tokens",
    "token_counts": "tokens",
    "ImageTransform": "transforms",
    "hflip": "transforms",
    "normalize": "transforms",
    "random_resized_crop": "transforms",
    "resize": "transforms",
    "to_tensor": "transforms",
}

__all__ = [
    "CLIP_BPE_DIR",
    "DATASETS",
    "DataConfig",
    "EmojiEntry",
    "ImageSource",
    "ImageStreamingDataset",
    "ImageTextSource",
    "ImageTransform",
    "Packer",
    "PairSplit",
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
    "emoji_entries",
    "emoji_split",
    "ensure_all_shards",
    "ensure_shards",
    "ensure_tokenizer",
    "get_dataset",
    "hf_tokenizer",
    "hflip",
    "import_streaming",
    "list_datasets",
    "load_pairs",
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
    "tokenize_captions",
    "tokenizer_info",
    "validate_shards",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
