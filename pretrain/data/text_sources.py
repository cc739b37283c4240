"""Text sources: WordNet, local .txt and .jsonl files, and whatever Hugging Face `datasets` reads offline.

Every text source yields documents `{"text": str}` (plus `"label"` where it has one) through `documents()`, or,
for a document that cannot be read (not UTF-8, not JSON), a marker `{"error": message, "kind": ...}` that the
converter turns into a SourceError or, with data.bad_samples=skip, a skip counted in tessera.json. Empty
documents are passed on; the converter skips and counts them. `datasets` is imported only when one of its
sources is read (importing pretrain.data stays cheap), with the hub switched off first.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from types import ModuleType
from typing import Any

from pretrain.data.sources import Sample, Source, SourceError, register_dataset


class TextSource(Source):
    """A text dataset: `documents()` yields {"text": str, ...} or error markers; `samples()` is the strict form."""

    modality = "text"
    fields: tuple[str, ...] = ("text",)

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        """Documents in a fixed order; `options` is the DataConfig (text_field, split_by)."""
        raise NotImplementedError

    def samples(
        self, split: str, source: str | None = None, max_samples: int | None = None, options: Any = None
    ) -> Iterator[Sample]:
        """The first max_samples documents; an unreadable one raises SourceError."""
        from pretrain.data.config import DataConfig

        for doc in islice(self.documents(split, source, options or DataConfig()), max_samples):
            if "error" in doc:
                raise SourceError(doc["error"])
            yield doc


def bad_document(message: str, kind: str) -> Sample:
    return {"error": message, "kind": kind}


def decode_utf8(data: bytes, path: Path | str, offset: int) -> Sample:
    """{"text": ...}, or the marker naming the file and the byte offset (within the file) of the first bad byte."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError as err:
        where = offset + err.start
        return bad_document(
            f"{path}: not UTF-8 at byte offset {where} (byte 0x{data[err.start]:02x}: {err.reason})",
            "not_utf8",
        )


def _input_files(source: str | None, suffixes: tuple[str, ...], dataset: str) -> list[Path]:
    """`source` itself if a file, else the files under it with one of `suffixes`, recursively, in sorted order."""
    if not source:
        raise SourceError(f"{dataset} needs `source` = a file or a folder of {'/'.join(suffixes)} files")
    root = Path(source)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise SourceError(f"{source}: no such file or folder (data.source of dataset {dataset!r})")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise SourceError(f"{source}: no {'/'.join(suffixes)} files in this folder (dataset {dataset!r})")
    return files


# ---------------------------------------------------------------------------------------------- WordNet


WORDNET_DIR = "/usr/share/wordnet"
WORDNET_POS = ("noun", "verb", "adj", "adv")  # data.<pos>, read in this order
# The 45 lexicographer files, by id (WordNet's lexnames(5WN)): the label of a synset.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # adjective position markers glued to a lemma: "galore(ip)"


def wordnet_split(offset: int) -> str:
    """The fixed split of a synset: 'test' when its offset (the first field of its line in data.<pos>) is a
    multiple of 10, else 'train'. A synset is (pos, offset); the rule reads the offset alone, so it is the same
    in all four files."""
    return "test" if offset % 10 == 0 else "train"


@register_dataset("wordnet")
class WordNet(TextSource):
    """WordNet 3.0 (Debian wordnet-base): one document per synset, "lemma, other lemma: gloss" (underscores as
    spaces, adjective markers dropped; the gloss keeps its quoted examples), label = lexicographer file id
    (45 classes, LEXNAMES). Synsets in file order: data.noun, data.verb, data.adj, data.adv. Fixed split:
    `wordnet_split(offset)`; about 10% of the 117,659 synsets are test."""

    fields = ("text", "label")
    splits = ("train", "test")
    description = "WordNet 3.0 synsets, 'lemmas: gloss', label = lexicographer file (45)"

    def _paths(self, source: str | None) -> list[Path]:
        folder = Path(source or WORDNET_DIR)
        paths = [folder / f"data.{pos}" for pos in WORDNET_POS]
        for path in paths:
            if not path.is_file():
                raise SourceError(
                    f"{path} not found: install WordNet with `apt-get install wordnet-base`, or point `source` "
                    "at a folder holding data.noun, data.verb, data.adj and data.adv"
                )
        return paths

    def synsets(self, source: str | None = None) -> Iterator[tuple[str, int, int, list[str], str]]:
        """(pos, offset, lexfile id, lemmas, gloss) of every synset, in file order."""
        for pos, path in zip(WORDNET_POS, self._paths(source)):
            with open(path, "rb") as f:
                at = 0
                for raw in f:
                    start, at = at, at + len(raw)
                    if raw.startswith(b"  "):  # the license header
                        continue
                    line = decode_utf8(raw, path, start)
                    if "error" in line:
                        raise SourceError(line["error"])
                    head, _, gloss = line["text"].partition("|")
                    p = head.split(" ")
                    try:
                        offset, lexfile, n_words = int(p[0]), int(p[1]), int(p[3], 16)
                        words = [p[4 + 2 * i] for i in range(n_words)]
                    except (ValueError, IndexError) as err:
                        raise SourceError(
                            f"{path}: byte offset {start}: not a WordNet data line ({err})"
                        ) from err
                    lemmas = [_ADJ_MARKER.sub("", w).replace("_", " ") for w in words]
                    yield pos, offset, lexfile, lemmas, gloss.strip()

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        for _, offset, lexfile, lemmas, gloss in self.synsets(source):
            if wordnet_split(offset) == split:
                yield {"text": f"{', '.join(lemmas)}: {gloss}", "label": lexfile}

    def count(self, split: str, source: str | None = None) -> int:
        return sum(wordnet_split(s[1]) == split for s in self.synsets(source))

    def class_names(self, split: str, source: str | None = None) -> list[str]:
        return list(LEXNAMES)


# ---------------------------------------------------------------------------------------------- local files


_PARAGRAPH_BREAK = re.compile(rb"\n[ \t\r]*\n")


def split_units(data: bytes, split_by: str) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of each document in a file's bytes: the whole file, each line, or each paragraph
    (text between blank lines). Splitting on bytes keeps offsets exact even when the UTF-8 is broken."""
    if split_by == "document":
        yield 0, data
        return
    pattern = re.compile(rb"\n") if split_by == "line" else _PARAGRAPH_BREAK
    start = 0
    for m in pattern.finditer(data):
        yield start, data[start : m.start()]
        start = m.end()
    if start < len(data):
        yield start, data[start:]


@register_dataset("text_files")
class TextFiles(TextSource):
    """A .txt file, or a folder of them (recursive, sorted). A file is one document, or with data.split_by one per
    line or per blank-line-separated paragraph. `source` is the input of the split being converted."""

    needs_source = True
    description = "local .txt file or folder (data.split_by: document | line | paragraph)"

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        for path in _input_files(source, (".txt",), "text_files"):
            for start, chunk in split_units(path.read_bytes(), options.split_by):
                yield decode_utf8(chunk.rstrip(b"\r"), path, start)


@register_dataset("jsonl")
class JsonLines(TextSource):
    """A .jsonl file, or a folder of them: one JSON object per line, the document in field data.text_field.
    Blank lines are ignored; a line that is not UTF-8 or not JSON is a bad document; a missing field is an error."""

    needs_source = True
    description = "local .jsonl file or folder, text in field data.text_field"

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        field = options.text_field
        for path in _input_files(source, (".jsonl",), "jsonl"):
            with open(path, "rb") as f:
                at = 0
                for number, raw in enumerate(f, 1):
                    start, at = at, at + len(raw)
                    if not raw.strip():
                        continue
                    line = decode_utf8(raw, path, start)
                    if "error" in line:
                        yield line
                        continue
                    try:
                        record = json.loads(line["text"])
                    except ValueError as err:
                        yield bad_document(f"{path}:{number}: not JSON ({err})", "bad_json")
                        continue
                    if not isinstance(record, dict) or field not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise SourceError(
                            f"data.text_field: {field!r} is not in {path}:{number} (it has {keys})"
                        )
                    if not isinstance(record[field], str):
                        raise SourceError(
                            f"data.text_field: {path}:{number}: field {field!r} is a "
                            f"{type(record[field]).__name__}, not a string"
                        )
                    yield {"text": record[field]}


# ---------------------------------------------------------------------------------------------- datasets


def import_datasets() -> ModuleType:
    """Hugging Face `datasets`, offline: the hub is switched off before the import reads the switches."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "the hf_* text datasets need Hugging Face datasets: pip install datasets "
            "(with -c requirements/constraints.txt)"
        ) from err
    datasets.disable_progress_bars()
    return datasets


class HFSource(TextSource):
    """Local files read by `datasets.load_dataset(builder, data_files=...)`, or a `save_to_disk` folder; the
    document is column data.text_field. The Arrow cache goes to a temporary folder removed after reading."""

    needs_source = True
    builder = "json"
    suffixes: tuple[str, ...] = (".json", ".jsonl")

    def _load(self, split: str, source: str | None, options: Any, cache_dir: str) -> Any:
        datasets = import_datasets()
        try:
            if self.builder == "disk":
                if not source or not os.path.isdir(source):
                    raise SourceError(
                        f"{source}: no such folder (hf_disk needs a datasets save_to_disk folder)"
                    )
                ds = datasets.load_from_disk(source)
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise SourceError(f"{source}: has splits {sorted(ds)}, not {split!r} (data.split)")
                    ds = ds[split]
            else:
                files = [str(p) for p in _input_files(source, self.suffixes, self.name)]
                kwargs = {"sample_by": options.split_by} if self.builder == "text" else {}
                ds = datasets.load_dataset(
                    self.builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs
                )
        except SourceError:
            raise
        except Exception as err:  # datasets wraps reader errors in its own classes; name the input instead
            cause = err.__cause__ or err.__context__ or err
            raise SourceError(
                f"{source}: datasets cannot read it as {self.builder}: {type(err).__name__}: {err}"
                + (f" ({type(cause).__name__}: {cause})" if cause is not err else "")
            ) from err
        field = options.text_field
        if field not in ds.column_names:
            raise SourceError(
                f"data.text_field: {field!r} is not a column of {source} (columns {ds.column_names})"
            )
        return ds

    def documents(self, split: str, source: str | None, options: Any) -> Iterator[Sample]:
        with tempfile.TemporaryDirectory(prefix="tessera-datasets-") as cache_dir:
            ds = self._load(split, source, options, cache_dir)
            field = options.text_field
            for i in range(0, len(ds), 1000):
                for text in ds[i : i + 1000][field]:
                    if not isinstance(text, str):
                        raise SourceError(
                            f"data.text_field: {source}: column {field!r} holds {type(text).__name__}"
                        )
                    yield {"text": text}
            del ds  # its memory map lives in cache_dir


@register_dataset("hf_json")
class HFJson(HFSource):
    builder, suffixes = "json", (".json", ".jsonl")
    description = "json/jsonl file or folder read by datasets, text in data.text_field"


@register_dataset("hf_text")
class HFText(HFSource):
    builder, suffixes = "text", (".txt",)
    description = "txt file or folder read by datasets (data.split_by: document | line | paragraph)"

    def _load(self, split: str, source: str | None, options: Any, cache_dir: str) -> Any:
        if options.text_field != "text":
            raise SourceError(
                f"data.text_field: hf_text documents are in column 'text', not {options.text_field!r}"
            )
        return super()._load(split, source, options, cache_dir)


@register_dataset("hf_parquet")
class HFParquet(HFSource):
    builder, suffixes = "parquet", (".parquet",)
    description = "parquet file or folder read by datasets, text in data.text_field"


@register_dataset("hf_disk")
class HFDisk(HFSource):
    builder = "disk"
    description = "a datasets save_to_disk folder (a DatasetDict: data.split picks), text in data.text_field"
