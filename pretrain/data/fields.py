"""How each sample field is stored in MDS shards and decoded back into tensors: the one table every modality uses.

    field    column    MDS encoding                              decoded as
    image    image     png (mode L or RGB)                       (C, S, S) float, ImageTransform (seeded)
    label    label     int                                       () int64
    text     tokens    ndarray:uint16 (vocab < 65,536) or int32  text: (L,) int64, one document: [BOS] ids EOS
                                                                 image_text: "input_ids" + "attention_mask"
                                                                 (data.text_len,) int64, `fit_caption`
             caption   str (image_text only)                     not decoded; the raw caption, for evals

A source declares its fields (`Source.fields`) and modality; conversion writes their columns, the streaming dataset
decodes them with `SampleDecoder`. Text is tokenized once, at conversion, so shards hold token ids: a caption's
whole [BOS] ids EOS sequence, cut to data.text_len only when decoded (so text_len is a load-time choice).
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


def columns(fields: Sequence[str], vocab_size: int | None = None, modality: str = "image") -> dict[str, str]:
    """MDS columns {name: encoding} for a source's fields (image_text keeps the raw caption next to its tokens)."""
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
            if modality == "image_text":
                out["caption"] = "str"
        else:
            raise ValueError(f"unknown sample field {f!r}; known: {sorted(COLUMN_OF)}")
    return out


def fit_caption(tokens: torch.Tensor, text_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A caption's [BOS] ids EOS (n,) int64 -> (input_ids (text_len,), attention_mask (text_len,)) int64.

    CLIP's rule: longer captions keep their first text_len - 1 tokens and end with their EOS (EOS pooling finds
    it); shorter ones are padded with `pad_id` (mask 0)."""
    n = tokens.numel()
    if n > text_len:
        ids = torch.cat([tokens[: text_len - 1], tokens[-1:]])  # (L,), EOS kept last
        return ids, torch.ones(text_len, dtype=torch.int64)
    ids = torch.full((text_len,), pad_id, dtype=torch.int64)
    ids[:n] = tokens
    mask = torch.zeros(text_len, dtype=torch.int64)
    mask[:n] = 1
    return ids, mask


@dataclass(frozen=True)
class SampleDecoder:
    """A raw MDS sample (streaming's decoded columns) -> the tensors of one training sample. Picklable: it
    travels to DataLoader workers inside the dataset.

    `parse` does everything that can fail on corrupt bytes (the caller turns those errors into bad-sample
    markers); `finish` the deterministic rest (augmentation seeded by (seed, epoch, sample id)).
    Modalities: "image", "text", "image_text" (the image path plus a caption fitted to `text_len`).
    """

    modality: str
    transform: ImageTransform | None = None  # image, image_text
    image_mode: str = "L"  # image, image_text: "L" or "RGB"
    vocab_size: int | None = None  # text, image_text: ids must be below it
    text_len: int | None = None  # image_text: L, data.text_len
    pad_id: int | None = None  # image_text: the tokenizer's padding id

    def _tokens(self, raw: dict[str, Any]) -> torch.Tensor:
        tokens = np.asarray(raw["tokens"])
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"column 'tokens' holds shape {tokens.shape}, expected a non-empty 1-D array")
        if self.vocab_size is not None and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"column 'tokens' holds id {int(tokens.max())} >= vocab_size {self.vocab_size}")
        return torch.from_numpy(tokens.astype(np.int64))

    def parse(self, raw: dict[str, Any]) -> dict[str, Any]:
        if self.modality == "text":
            return {"tokens": self._tokens(raw)}
        out = {"image": raw["image"].convert(self.image_mode)}
        if "label" in raw:
            out["label"] = int(raw["label"])
        if self.modality == "image_text":
            out["tokens"] = self._tokens(raw)
        return out

    def finish(
        self, parsed: dict[str, Any], sample_id: int, generator: torch.Generator | None
    ) -> dict[str, Any]:
        index = torch.tensor(sample_id, dtype=torch.int64)
        if self.modality == "text":
            return {"tokens": parsed["tokens"], "index": index}  # (L,) int64
        out = {"image": self.transform(parsed["image"], generator), "index": index}  # (C, S, S)
        if "label" in parsed:
            out["label"] = torch.tensor(parsed["label"], dtype=torch.int64)
        if self.modality == "image_text":
            out["input_ids"], out["attention_mask"] = fit_caption(
                parsed["tokens"], self.text_len, self.pad_id
            )
        return out
