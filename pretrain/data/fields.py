"""How each sample field is stored in MDS shards and decoded back into tensors: the one table every modality uses.

    field    column    MDS encoding                              decoded as
    image    image     png (mode L or RGB)                       (C, S, S) float, ImageTransform (seeded)
    label    label     int                                       () int64
    text     tokens    ndarray:uint16 (vocab < 65,536) or int32  (L,) int64, one document: [BOS] ids EOS

A source declares its fields (`Source.fields`); conversion writes their columns, the streaming dataset decodes
them with `SampleDecoder`. Text is tokenized once, at conversion, so shards hold token ids, never strings.
A future field (captions, teacher outputs) adds a row here and a branch in `SampleDecoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pretrain.data.transforms import ImageTransform

COLUMN_OF = {"image": "image", "label": "label", "text": "tokens"}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def columns(fields: Sequence[str], vocab_size: int | None = None) -> dict[str, str]:
    """MDS columns {name: encoding} for a source's fields."""
    out = {}
    for f in fields:
        if f == "image":
            out["image"] = "png"
        elif f == "label":
            out["label"] = "int"
        elif f == "text":
            if vocab_size is None:
                raise ValueError("text fields need the tokenizer's vocab_size to choose the token dtype")
            out["tokens"] = f"ndarray:{token_dtype(vocab_size).name}"
        else:
            raise ValueError(f"unknown sample field {f!r}; known: {sorted(COLUMN_OF)}")
    return out


@dataclass(frozen=True)
class SampleDecoder:
    """A raw MDS sample (streaming's decoded columns) -> the tensors of one training sample. Picklable: it
    travels to DataLoader workers inside the dataset.

    `parse` does everything that can fail on corrupt bytes (the caller turns those errors into bad-sample
    markers); `finish` the deterministic rest (augmentation seeded by (seed, epoch, sample id)).
    """

    modality: str
    transform: ImageTransform | None = None  # image
    image_mode: str = "L"  # image: "L" or "RGB"
    vocab_size: int | None = None  # text: ids must be below it

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        if self.modality == "image":
            return {"image": raw["image"].convert(self.image_mode), "label": int(raw["label"])}
        tokens = np.asarray(raw["tokens"])
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"column 'tokens' holds shape {tokens.shape}, expected a non-empty 1-D array")
        if self.vocab_size is not None and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"column 'tokens' holds id {int(tokens.max())} >= vocab_size {self.vocab_size}")
        return {"tokens": torch.from_numpy(tokens.astype(np.int64))}

    def finish(
        self, parsed: dict[str, Any], sample_id: int, generator: torch.Generator | None
    ) -> dict[str, Any]:
        index = torch.tensor(sample_id, dtype=torch.int64)
        if self.modality == "image":
            return {
                "image": self.transform(parsed["image"], generator),  # (C, S, S)
                "label": torch.tensor(parsed["label"], dtype=torch.int64),
                "index": index,
            }
        return {"tokens": parsed["tokens"], "index": index}  # (L,) int64
