"""Image-text pairs: the sources (emoji renders, a folder of captioned images, a `datasets` table), their conversion
to MDS shards, and the caption tokenization that the loader and zero-shot prompts share.

A pair source yields `{"image": PIL RGB, "text": caption, "where": file/row}` plus `"label"` where it has
classes, through `pairs()`; an input it cannot read becomes a marker `{"error": message, "kind": ...}` (an error,
or with data.bad_samples=skip a skip counted in tessera.json), and an item the source leaves out by design (an
emoji the font cannot draw as one glyph) `{"excluded": kind}`, always counted. An empty caption is bad input too.

Conversion (`write_pair_rows`, called by `mds.convert`) stores the image as PNG, the caption's [BOS] ids EOS
(tokenized once, like text documents) and the raw caption string, and counts caption lengths in tessera.json so
that the loader can say how many captions data.text_len truncates (`truncated_captions`). The decoder
(`fields.SampleDecoder`) cuts or pads the ids to data.text_len; `tokenize_captions` does the same to any strings.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pretrain.data.config import DataConfig, config_error
from pretrain.data.fields import columns, fit_caption, token_dtype
from pretrain.data.sources import ImageSource, Sample, SourceError, get_dataset, register_dataset
from pretrain.data.text_sources import HFDisk, HFParquet, bad_document, decode_utf8, import_datasets
from pretrain.data.tokenizer import TokenizerInfo, load_tokenizer

log = logging.getLogger(__name__)
ENCODE_BATCH = 256  # pairs per call of the batch encoder (their decoded images are held meanwhile)
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


class ImageTextSource(ImageSource):
    """An image-text dataset: `pairs()` yields {"image", "text", "where", ["label"]} or markers; RGB images."""

    modality = "image_text"
    fields: tuple[str, ...] = ("image", "text")
    channels = 3
    mean = (0.485, 0.456, 0.406)  # ImageNet statistics: a sane default for photos
    std = (0.229, 0.224, 0.225)
    # DataConfig keys that change what conversion writes: shards record them and refuse a config that differs.
    option_keys: tuple[str, ...] = ()

    def pairs(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        """Pairs and markers in a fixed order; `options` is the DataConfig (image_field, text_field)."""
        raise NotImplementedError

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        """The captions alone, {"text": ...} (what a tokenizer trained here learns from)."""
        for pair in self.pairs(split, source, options):
            if "excluded" not in pair and "error" not in pair:
                yield {"text": pair["text"]}

    def samples(
        self, split: str, source: str | None = None, max_samples: int | None = None, options: Any = None
    ) -> Iterator[Sample]:
        """The first max_samples pairs; an unreadable one or an empty caption raises SourceError."""
        pairs = (p for p in self.pairs(split, source, options or DataConfig()) if "excluded" not in p)
        for pair in islice(pairs, max_samples):
            if "error" in pair:
                raise SourceError(pair["error"])
            if not pair["text"].strip():
                raise SourceError(f"{pair['where']}: empty caption")
            yield pair


def open_image(data: bytes | str | os.PathLike, where: str) -> Image.Image | Sample:
    """A fully decoded RGB image from bytes or a file, or the bad-input marker naming `where` and the problem."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            return img.convert("RGB")  # decodes every pixel now, so a broken file fails here
    except FileNotFoundError:
        return bad_document(f"{where}: image {data} not found", "bad_image")
    except IMAGE_ERRORS as err:
        what = f"image {data}" if not isinstance(data, bytes) else "image bytes"
        return bad_document(f"{where}: {what} does not decode ({type(err).__name__}: {err})", "bad_image")


# ---------------------------------------------------------------------------------------------- emoji


EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian fonts-noto-color-emoji
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"  # Debian unicode-data
EMOJI_FONT_SIZE = 109  # the only size this bitmap (CBDT) font loads at
EMOJI_SIZE = 64  # native side of the stored renders


@dataclass(frozen=True)
class EmojiEntry:
    text: str  # the emoji itself: its code points as a string
    name: str  # CLDR name: "grinning face", "thumbs up: medium skin tone"
    group: str  # "Smileys & Emotion", ...


def emoji_entries(path: str | os.PathLike = EMOJI_TEST) -> list[EmojiEntry]:
    """The fully-qualified emoji of emoji-test.txt in file order, each with its `# group:`."""
    if not os.path.isfile(path):
        raise SourceError(
            f"{path} not found: install the Unicode data with `apt-get install unicode-data` (or "
            "`bash scripts/setup.sh`), or point data.source at a folder holding emoji-test.txt and "
            "NotoColorEmoji.ttf"
        )
    entries, group = [], None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            if line.startswith("#") or ";" not in line:
                continue
            # 1F600  ; fully-qualified  # 😀 E1.0 grinning face
            codes, rest = line.split(";", 1)
            status, _, comment = rest.partition("#")
            if status.strip() != "fully-qualified":
                continue
            try:
                text = "".join(chr(int(c, 16)) for c in codes.split())
                name = comment.strip().split(" ", 2)[2]
            except (ValueError, IndexError) as err:
                raise SourceError(f"{path}:{number}: not an emoji-test.txt data line ({err})") from err
            entries.append(EmojiEntry(text, name, group or ""))
    return entries


def emoji_base_name(name: str) -> str:
    """The name before ':' ("thumbs up: medium skin tone" -> "thumbs up"): one per emoji and its variants."""
    return name.split(":", 1)[0]


def emoji_split(name: str) -> str:
    """'test' when the UTF-8 CRC-32 of the base name is a multiple of 5, else 'train': skin-tone and other
    variants of one emoji share a base name, so they never straddle the split."""
    return "test" if zlib.crc32(emoji_base_name(name).encode("utf-8")) % 5 == 0 else "train"


def render_emoji(font: Any, text: str, size: int = EMOJI_SIZE) -> Image.Image | None:
    """The emoji drawn in color, cropped to its pixels, centered on a white square and resized to size x size
    (RGB); None when the font cannot draw it as one glyph (laid out wider than one glyph, or blank)."""
    from PIL import ImageDraw

    if font.getlength(text) > 1.5 * font.getlength("\U0001f600"):  # several glyphs side by side
        return None
    canvas = Image.new("RGBA", (160, 136))  # one glyph is 136 x 128 at size 109
    ImageDraw.Draw(canvas).text((4, 4), text, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2), glyph)  # alpha over white
    return square.resize((size, size), Image.Resampling.LANCZOS)


@register_dataset("emoji")
class Emoji(ImageTextSource):
    """Noto Color Emoji renders with their CLDR names: 3,655 fully-qualified emoji of Unicode 15 (Debian
    fonts-noto-color-emoji + unicode-data), 64x64 RGB on white, caption = name, label = `# group:` (9 classes).
    Fixed split by base name (`emoji_split`): 3,065 train, 590 test. An emoji the font cannot draw as one glyph
    is left out and counted. `source`: a folder holding emoji-test.txt and NotoColorEmoji.ttf (default: Debian's).
    """

    description = "Noto Color Emoji renders + CLDR names, label = group (9); split by base name"
    fields = ("image", "text", "label")
    splits = ("train", "test")
    image_size = EMOJI_SIZE
    mean = (0.7679, 0.7122, 0.6663)  # measured on the train split's 64x64 renders
    std = (0.3081, 0.3078, 0.3513)

    def _paths(self, source: str | None) -> tuple[str, str]:
        if source:
            return os.path.join(source, "emoji-test.txt"), os.path.join(source, "NotoColorEmoji.ttf")
        return EMOJI_TEST, EMOJI_FONT

    def _font(self, source: str | None) -> Any:
        from PIL import ImageFont

        path = self._paths(source)[1]
        if not os.path.isfile(path):
            raise SourceError(
                f"{path} not found: install the font with `apt-get install fonts-noto-color-emoji` "
                "(or `bash scripts/setup.sh`)"
            )
        try:
            return ImageFont.truetype(path, EMOJI_FONT_SIZE)
        except OSError as err:
            raise SourceError(f"{path}: cannot load at size {EMOJI_FONT_SIZE} ({err})") from err

    def entries(self, split: str, source: str | None = None) -> list[EmojiEntry]:
        return [e for e in emoji_entries(self._paths(source)[0]) if emoji_split(e.name) == split]

    def class_names(self, split: str, source: str | None = None) -> list[str]:
        """The groups holding fully-qualified emoji, in file order (the same for both splits)."""
        return list(dict.fromkeys(e.group for e in emoji_entries(self._paths(source)[0])))

    def count(self, split: str, source: str | None = None) -> int:
        font = self._font(source)
        single = 1.5 * font.getlength("\U0001f600")
        return sum(font.getlength(e.text) <= single for e in self.entries(split, source))

    def pairs(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        classes = {name: i for i, name in enumerate(self.class_names(split, source))}
        font = self._font(source)
        for e in self.entries(split, source):
            image = render_emoji(font, e.text)
            if image is None:
                yield {"excluded": "unrenderable"}
                continue
            where = f"emoji {e.text} ({e.name})"
            yield {"image": image, "text": e.name, "label": classes[e.group], "where": where}

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        for e in self.entries(split, source):  # no rendering
            yield {"text": e.name}


# ---------------------------------------------------------------------------------------------- caption folder


@register_dataset("image_captions")
class ImageCaptions(ImageTextSource):
    """A folder holding captions.jsonl (one {data.image_field: relative path, data.text_field: caption} per line)
    or captions.tsv (path<TAB>caption per line), and the images. Any split name (data.source is the split's
    folder); no classes. Blank lines are ignored; a line that is not UTF-8 / JSON / tab-separated, a missing or
    undecodable image and an empty caption are bad pairs; a JSON line missing a field is an error."""

    description = "folder with captions.jsonl or captions.tsv (image path, caption) and its images"
    needs_source = True
    option_keys = ("image_field", "text_field")

    def _index(self, source: str | None) -> Path:
        if not source or not os.path.isdir(source):
            raise SourceError(
                f"image_captions needs data.source = a folder holding captions.jsonl or captions.tsv, got {source!r}"
            )
        found = [Path(source, n) for n in ("captions.jsonl", "captions.tsv") if Path(source, n).is_file()]
        if len(found) != 1:
            what = (
                "both captions.jsonl and captions.tsv" if found else "neither captions.jsonl nor captions.tsv"
            )
            raise SourceError(f"{source}: holds {what}; give the folder exactly one")
        return found[0]

    def _records(self, source: str | None, options: Any) -> Iterator[tuple[str, str, str] | Sample]:
        """(where, image path, caption) per line, or a bad-input marker."""
        index = self._index(source)
        at = 0
        with open(index, "rb") as f:
            for number, raw in enumerate(f, 1):
                start, at = at, at + len(raw)
                where = f"{index}:{number}"
                if not raw.strip():
                    continue
                line = decode_utf8(raw.rstrip(b"\r\n"), index, start)
                if "error" in line:
                    yield line
                elif index.suffix == ".tsv":
                    path, tab, caption = line["text"].partition("\t")
                    if not tab:
                        yield bad_document(f"{where}: no tab between image path and caption", "bad_line")
                    else:
                        yield where, path, caption
                else:
                    try:
                        record = json.loads(line["text"])
                    except ValueError as err:
                        yield bad_document(f"{where}: not JSON ({err})", "bad_json")
                        continue
                    yield where, *self._fields(record, where, options)

    def _fields(self, record: Any, where: str, options: Any) -> tuple[str, str]:
        out = []
        for key in ("image_field", "text_field"):
            name = getattr(options, key)
            if not isinstance(record, dict) or name not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise SourceError(f"data.{key}: {name!r} is not in {where} (it has {keys})")
            if not isinstance(record[name], str):
                raise SourceError(
                    f"data.{key}: {where}: {name!r} is a {type(record[name]).__name__}, not a string"
                )
            out.append(record[name])
        return out[0], out[1]

    def count(self, split: str, source: str | None = None) -> int:
        with open(self._index(source), "rb") as f:
            return sum(1 for raw in f if raw.strip())

    def pairs(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        for rec in self._records(source, options):
            if isinstance(rec, dict):
                yield rec
                continue
            where, path, caption = rec
            image = open_image(Path(source, path), where)
            yield image if isinstance(image, dict) else {"image": image, "text": caption, "where": where}

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        for rec in self._records(source, options):  # captions only: no image decoded
            yield rec if isinstance(rec, dict) else {"text": rec[2]}


# ---------------------------------------------------------------------------------------------- datasets table


class _TableOnDisk(HFDisk):
    name = "hf_image_text"


class _TableParquet(HFParquet):
    name = "hf_image_text"


DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@register_dataset("hf_image_text")
class HFImageText(ImageTextSource):
    """Any `datasets` table with an image column (data.image_field: datasets Image features, i.e. {bytes, path}
    dicts or PIL images, or raw bytes, or file paths) and a caption column (data.text_field). data.source: a
    parquet file or folder, or a save_to_disk folder (a DatasetDict: data.split picks). Read with the hf_parquet /
    hf_disk loaders (offline, Arrow cache in a temporary folder); no classes."""

    description = "datasets table (parquet or save_to_disk) with data.image_field and data.text_field columns"
    needs_source = True
    option_keys = ("image_field", "text_field")
    ROWS = 256  # rows per read

    def _loader(self, source: str | None) -> HFDisk | HFParquet:
        on_disk = (
            bool(source) and os.path.isdir(source) and any(Path(source, m).exists() for m in DISK_MARKERS)
        )
        return _TableOnDisk() if on_disk else _TableParquet()

    def _rows(self, split: str, source: str | None, options: Any, with_images: bool) -> Iterator[Sample]:
        datasets = import_datasets()
        with tempfile.TemporaryDirectory(prefix="tessera-datasets-") as cache_dir:
            ds = self._loader(source)._load(split, source, options, cache_dir)  # checks data.text_field
            image_key, text_key = options.image_field, options.text_field
            if image_key not in ds.column_names:
                raise SourceError(
                    f"data.image_field: {image_key!r} is not a column of {source} (columns {ds.column_names})"
                )
            if isinstance(ds.features[image_key], datasets.Image):
                ds = ds.cast_column(image_key, datasets.Image(decode=False))  # bytes/path: we decode and name
            table = ds.select_columns([image_key, text_key] if with_images else [text_key])
            for start in range(0, len(table), self.ROWS):
                chunk = table[start : start + self.ROWS]
                for i, text in enumerate(chunk[text_key], start):
                    where = f"{source}: row {i}"
                    if not isinstance(text, str):
                        raise SourceError(
                            f"data.text_field: {where}: {text_key!r} holds {type(text).__name__}"
                        )
                    if not with_images:
                        yield {"text": text}
                        continue
                    image = self._image(chunk[image_key][i - start], source, where)
                    yield image if isinstance(image, dict) else {"image": image, "text": text, "where": where}
            del ds, table  # their memory map lives in cache_dir

    def _image(self, value: Any, source: str | None, where: str) -> Image.Image | Sample:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict):  # datasets Image feature, undecoded: bytes, else a path
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str) and not os.path.isabs(value) and source:  # relative to the table's folder
            value = os.path.join(source if os.path.isdir(source) else os.path.dirname(source), value)
        if isinstance(value, (bytes, str)) and value:
            return open_image(value, where)
        return bad_document(f"{where}: no image (the column holds {type(value).__name__})", "bad_image")

    def count(self, split: str, source: str | None = None) -> int | None:
        return None  # known only after loading the table

    def pairs(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        return self._rows(split, source, options, with_images=True)

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        return self._rows(split, source, options, with_images=False)


# ---------------------------------------------------------------------------------------------- tokenization


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, sha256: str | None) -> Any:
    return load_tokenizer(path)  # cached per file version: zero-shot prompts are tokenized at every eval


def caption_ids(texts: list[str], tok: TokenizerInfo) -> list[list[int]]:
    """[BOS] ids EOS of each caption (BOS when the tokenizer has one): exactly what conversion stores."""
    tok.require(["eos"], "image-text captions (an EOS closes every caption)")
    if tok.sha256 is None:
        raise config_error(f"data.tokenizer: {tok.path} is not trained yet (convert the train split first)")
    head = [tok.bos_id] if tok.bos_id is not None else []
    encodings = _tokenizer(tok.path, tok.sha256).encode_batch(texts, add_special_tokens=False)
    return [head + e.ids + [tok.eos_id] for e in encodings]


def tokenize_captions(
    texts: list[str], tok: TokenizerInfo, text_len: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Captions -> (input_ids (N, L) int64, attention_mask (N, L) int64, how many were truncated), L = text_len:
    exactly what the loader yields for the same captions (zero-shot prompts, retrieval queries)."""
    if text_len <= 1:
        raise config_error(f"data.text_len: must be > 1 (room for BOS and EOS), got {text_len}")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"tokenize_captions: texts[{i}] is {t!r}, not a non-empty caption")
    ids, masks, truncated = [], [], 0
    for row in caption_ids(list(texts), tok):
        x, m = fit_caption(torch.tensor(row, dtype=torch.int64), text_len, tok.padding_id)
        ids.append(x)
        masks.append(m)
        truncated += len(row) > text_len
    if not ids:
        empty = torch.zeros(0, text_len, dtype=torch.int64)
        return empty, empty.clone(), 0
    return torch.stack(ids), torch.stack(masks), truncated


def truncated_captions(metas: list[dict[str, Any]], text_len: int) -> tuple[int, int] | None:
    """(captions longer than text_len, captions) over shard directories' tessera.json; None when one lacks the
    caption-length counts (shards from another tool)."""
    longer = total = 0
    for meta in metas:
        lengths = meta.get("caption_lengths")
        if not isinstance(lengths, dict):
            return None
        for n, c in lengths.items():
            total += c
            longer += c if int(n) > text_len else 0
    return longer, total


# ---------------------------------------------------------------------------------------------- conversion


def pair_columns(cfg: DataConfig, tok: TokenizerInfo) -> dict[str, str]:
    return columns(get_dataset(cfg.dataset).fields, tok.vocab_size, modality="image_text")


def write_pair_rows(writer: Any, cfg: DataConfig, tok: TokenizerInfo) -> dict[str, Any]:
    """Write cfg's split into `writer` (an MDSWriter with `pair_columns`); returns the counts for tessera.json."""
    info = get_dataset(cfg.dataset)
    mode = "L" if info.channels == 1 else "RGB"
    dtype = token_dtype(tok.vocab_size)
    stats: dict[str, Any] = {"pairs": 0, "lengths": Counter(), "skipped": {}, "excluded": {}, "labels": set()}
    batch: list[Sample] = []

    def flush() -> None:
        for pair, ids in zip(batch, caption_ids([p["text"] for p in batch], tok)):
            row = {"image": pair["image"].convert(mode), "tokens": np.asarray(ids, dtype=dtype)}
            row["caption"] = pair["text"]
            if "label" in info.fields:
                row["label"] = int(pair["label"])
                stats["labels"].add(row["label"])
            writer.write(row)
            stats["lengths"][len(ids)] += 1
        batch.clear()

    for pair in info.pairs(cfg.split, cfg.source, cfg):
        if cfg.max_samples is not None and stats["pairs"] >= cfg.max_samples:
            break
        if "excluded" in pair:
            stats["excluded"][pair["excluded"]] = stats["excluded"].get(pair["excluded"], 0) + 1
            continue
        if "error" not in pair and not pair["text"].strip():
            pair = bad_document(f"{pair['where']}: empty caption", "empty_caption")
        if "error" in pair:
            if cfg.bad_samples != "skip":
                raise SourceError(f"{pair['error']}; data.bad_samples=skip skips and counts such pairs")
            log.warning("skipped a bad pair: %s", pair["error"])
            stats["skipped"][pair["kind"]] = stats["skipped"].get(pair["kind"], 0) + 1
            continue
        stats["pairs"] += 1
        batch.append(pair)
        if len(batch) == ENCODE_BATCH:
            flush()
    if batch:
        flush()
    for kind, n in stats["excluded"].items():
        log.info("%s/%s: left out %d %s item(s)", cfg.dataset, cfg.split, n, kind)
    return stats


def pair_meta(cfg: DataConfig, tok: TokenizerInfo, stats: dict[str, Any]) -> dict[str, Any]:
    """tessera.json's image-text entries: counts, caption lengths (length -> captions), tokenizer, options."""
    info = get_dataset(cfg.dataset)
    classes = info.class_names(cfg.split, cfg.source)
    labels = stats["labels"]
    lengths = stats["lengths"]
    return {
        "modality": "image_text",
        "count": stats["pairs"],
        "pairs": stats["pairs"],
        "caption_lengths": {str(n): lengths[n] for n in sorted(lengths)},
        "longest_caption": max(lengths, default=0),
        "skipped": stats["skipped"],
        "excluded": stats["excluded"],
        "tokenizer": {"path": tok.path, "sha256": tok.sha256, "trained": tok.trained},
        "vocab_size": tok.vocab_size,
        "token_dtype": token_dtype(tok.vocab_size).name,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        **{key: getattr(cfg, key) for key in info.option_keys},
        "num_classes": len(classes) if classes else (max(labels) + 1 if labels else None),
        "classes": classes,
    }
