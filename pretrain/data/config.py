"""What data to train on and how to present it: one dataclass, validated before anything is built.

One config serves every modality: the registered dataset says whether its samples hold images, text or image-text
pairs, and the keys of the other modality are ignored (pairs use both). `streams` mixes several datasets/splits into
the one loader.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from pretrain.errors import ConfigError

SPLIT_BY = ("document", "line", "paragraph")
# data.tokenizer values that name a tokenizer rather than a file: the CLIP BPE built by scripts/setup.sh
# (pretrain.data.clip_bpe), and a byte-level BPE of data.vocab_size ids trained here (pretrain.data.tokenizer).
TOKENIZER_ALIASES = ("clip", "bpe")
# 5 special tokens + 256 byte symbols + at least one merge: the smallest byte-level BPE worth training.
MIN_VOCAB, MAX_VOCAB = 262, 1 << 22


@dataclass
class StreamConfig:
    """One member of `data.streams`: a dataset split mixed into the run. Unset dataset/split take data.dataset and
    data.split; source, local, remote and max_samples are the stream's own (see DataConfig for their meaning)."""

    dataset: str | None = None
    split: str | None = None
    source: str | None = None
    local: str | None = None
    remote: str | None = None
    max_samples: int | None = None
    # Share of every epoch drawn from this stream (all streams give one, or none does); streaming up- or
    # down-samples the stream to match.
    proportion: float | None = None
    # Or: how many times the stream is seen per epoch (0.5 = a random half, 2 = twice); not with proportion.
    repeat: float | None = None


@dataclass
class DataConfig:
    # Registered dataset name (`python -m pretrain.data list`): fashion_mnist, digits, image_folder, wordnet,
    # text_files, jsonl, hf_json, hf_text, hf_parquet, hf_disk, emoji, image_captions, hf_image_text, ...
    dataset: str = "fashion_mnist"
    # Which split to read; fixed-split datasets check it, the others take any name for `source`.
    split: str = "train"
    # Raw input overriding the dataset's default location; required for image_folder (a folder of images,
    # class = immediate subfolder name, if any) and the file-based text datasets (a file or a folder).
    source: str | None = None
    # Directory with MDS shards, or their local cache when `remote` is set.
    # None = data/shards/<dataset>/<split> under the working directory (`-first<N>` appended with max_samples).
    local: str | None = None
    # Another directory already holding shards (`python -m pretrain.data convert ... --out REMOTE`),
    # streamed into `local`.
    remote: str | None = None
    # Side of the square images the model sees.
    image_size: int = 28
    # DataLoader worker processes per rank (0 = load in the training process).
    num_workers: int = 2
    # Shuffle every epoch; the shuffle seed is the run seed given to build_train_loader.
    shuffle: bool = True
    # Train-time augmentation: random-resized crop (scale (crop_scale_min, 1)) + horizontal flip.
    augment: bool = True
    # Smallest crop area, as a fraction of the image, for the random-resized crop.
    crop_scale_min: float = 0.35
    # Random horizontal flip (p = 0.5) when augmenting; turn off for digits/text-like images.
    hflip: bool = True
    # Convert only the first N samples (documents, for text) of the split (tiny configs, tests); None = all.
    max_samples: int | None = None
    # Per-channel normalization; None = the dataset's defaults.
    mean: list[float] | None = None
    std: list[float] | None = None
    # A sample that does not decode (corrupt image or label bytes inside an intact shard file):
    # "error" stops the run with ShardError naming the shard file, sample id, column and decoder message;
    # "skip" drops it from its micro-batch (which is then smaller), counts it per rank and logs it.
    # A shard file missing, truncated or unfetchable is always an error: skipping would drop a whole shard.
    # At conversion, a text document that is not UTF-8, or an image-text pair whose image does not decode or whose
    # caption is empty, is likewise an error or a skip counted in tessera.json.
    bad_samples: str = "error"
    # "skip" only: stop with ShardError once more than this many samples have been skipped on one rank since the
    # run began (the count is checkpointed, so resumes add up); 0 = the first bad sample stops the run.
    max_bad_samples: int = 100

    # --- text datasets (ignored for images) -------------------------------------------------------------------
    # Tokens per packed row: every micro-batch is micro_batch_size rows of exactly seq_len tokens.
    seq_len: int = 512
    # A tokenizer.json file or a Hugging Face tokenizer folder, or "clip" (the CLIP BPE, 49,408 ids, built offline
    # by `bash scripts/setup.sh` into data/tokenizers/clip_bpe), or "bpe" (a byte-level BPE of `vocab_size` ids
    # trained on the train split and kept next to the shards; pretrain.data.tokenizer says where).
    # None = "bpe" for text datasets, "clip" for image-text datasets.
    tokenizer: str | None = None
    # Size of the trained tokenizer's vocabulary (ids 0-4 are <pad> <s> </s> <unk> <mask>); unused with `tokenizer`.
    vocab_size: int = 8192
    # JSON field / column holding a document's text or a caption (jsonl, hf_*, image_captions, hf_image_text).
    text_field: str = "text"
    # What one document of a text file is: "document" (the whole file), "line", or "paragraph" (blank-line separated).
    split_by: str = "document"
    # Prepend the tokenizer's BOS to every document at conversion (EOS is always appended).
    add_bos: bool = False
    # Documents per fetch from streaming, the packer's unit of reading; None = enough for one micro-batch of rows
    # on average (from the shards' token count).
    docs_per_fetch: int | None = None

    # --- image-text datasets (images use the image keys above, captions the tokenizer) -------------------------
    # Tokens per caption in a batch: [BOS] ids EOS, cut to text_len keeping EOS last (CLIP's rule), else padded.
    text_len: int = 77
    # JSON field / column holding an image's path (image_captions) or the image itself (hf_image_text).
    image_field: str = "image"

    # --- mixing ---------------------------------------------------------------------------------------------
    # Several dataset splits in one loader (mosaicml-streaming Streams), all of one modality (and, for text, read
    # with the run's one tokenizer; for images, normalized with data.dataset's mean/std); empty = the single
    # dataset above, else data.dataset/split are the streams' defaults and the other keys apply to all streams.
    streams: list[StreamConfig] = field(default_factory=list)

    def local_dir(self) -> str:
        """Where the shards (or their cache) live; a max_samples subset never shares the full set's dir."""
        if self.local:
            return self.local
        split = self.split if self.max_samples is None else f"{self.split}-first{self.max_samples}"
        return os.path.join("data", "shards", self.dataset, split)

    def stream_configs(self) -> list[DataConfig]:
        """One single-dataset DataConfig per stream (this config's other keys), or [self] without streams."""
        if not self.streams:
            return [self]
        out = []
        for s in self.streams:
            own = {k: getattr(s, k) for k in ("source", "local", "remote", "max_samples")}
            out.append(
                dataclasses.replace(
                    self, dataset=s.dataset or self.dataset, split=s.split or self.split, streams=[], **own
                )
            )
        return out

    def modality(self) -> str:
        from pretrain.data.sources import get_dataset

        return get_dataset(self.dataset).modality

    def validate(self) -> None:
        """Raise ConfigError whose message starts with the offending key (`data.<field>: ...`), before any
        process forks or converts."""
        info = self._check_dataset(self, "data")
        if self.image_size <= 0:
            raise config_error(f"data.image_size: must be > 0, got {self.image_size}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise config_error(f"data.crop_scale_min: must be in (0, 1], got {self.crop_scale_min}")
        if self.num_workers < 0:
            raise config_error(f"data.num_workers: must be >= 0, got {self.num_workers}")
        if self.bad_samples not in ("error", "skip"):
            raise config_error(f"data.bad_samples: must be 'error' or 'skip', got {self.bad_samples!r}")
        if self.max_bad_samples < 0:
            raise config_error(f"data.max_bad_samples: must be >= 0, got {self.max_bad_samples}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and info.modality != "text" and len(value) != info.channels:
                raise config_error(
                    f"data.{name}: {self.dataset!r} has {info.channels} channel(s), got {list(value)}"
                )
        if self.std is not None and any(s <= 0 for s in self.std):
            raise config_error(f"data.std: every entry must be > 0, got {list(self.std)}")
        self._validate_text(info.modality)
        self._validate_streams(info.modality, getattr(info, "channels", None))

    def _check_dataset(self, cfg: DataConfig | StreamConfig, key: str):
        """The registered source of `cfg.dataset`, after checking dataset, source, split, max_samples, remote."""
        from pretrain.data.sources import get_dataset

        name = cfg.dataset or self.dataset
        split = cfg.split or self.split
        try:
            info = get_dataset(name)
        except KeyError as err:
            raise config_error(f"{key}.dataset: {err.args[0]}") from None
        if info.needs_source and not cfg.source:
            what = {"image": "folder of images", "text": "text file or folder"}.get(info.modality, "pairs")
            raise config_error(f"{key}.source: dataset {name!r} needs a source ({what})")
        if info.splits is not None and split not in info.splits:
            raise config_error(f"{key}.split: {name!r} has splits {list(info.splits)}, not {split!r}")
        if cfg.max_samples is not None and cfg.max_samples <= 0:
            raise config_error(f"{key}.max_samples: must be > 0 or None, got {cfg.max_samples}")
        return info

    def tokenizer_name(self, modality: str | None = None) -> str:
        """data.tokenizer with its default filled in: a path, "clip" or "bpe" (see the key's comment)."""
        if self.tokenizer is not None:
            return self.tokenizer
        return "clip" if (modality or self.modality()) == "image_text" else "bpe"

    def _validate_text(self, modality: str) -> None:
        if self.seq_len <= 0:
            raise config_error(f"data.seq_len: must be > 0, got {self.seq_len}")
        if self.text_len <= 1:
            raise config_error(f"data.text_len: must be > 1 (room for BOS and EOS), got {self.text_len}")
        name = self.tokenizer_name(modality)
        if name == "clip" and modality != "image":
            from pretrain.data.clip_bpe import clip_bpe_dir

            clip_bpe_dir()  # ConfigError naming scripts/setup.sh when it is not built
        elif name not in TOKENIZER_ALIASES:
            ok = os.path.isfile(name) or os.path.isfile(os.path.join(name, "tokenizer.json"))
            if not ok:
                raise config_error(
                    f"data.tokenizer: {name} is neither a tokenizer.json file nor a folder holding one "
                    f"(nor one of {list(TOKENIZER_ALIASES)})"
                )
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise config_error(
                f"data.vocab_size: must be in [{MIN_VOCAB}, {MAX_VOCAB}] (5 special tokens + 256 bytes + merges), "
                f"got {self.vocab_size}"
            )
        for key in ("text_field", "image_field"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise config_error(f"data.{key}: must be a non-empty field name, got {value!r}")
        if self.split_by not in SPLIT_BY:
            raise config_error(f"data.split_by: must be one of {list(SPLIT_BY)}, got {self.split_by!r}")
        if self.docs_per_fetch is not None and self.docs_per_fetch <= 0:
            raise config_error(f"data.docs_per_fetch: must be > 0 or None, got {self.docs_per_fetch}")

    def _validate_streams(self, modality: str, channels: int | None) -> None:
        if not self.streams:
            if self.remote and os.path.abspath(self.remote) == os.path.abspath(self.local_dir()):
                raise config_error(
                    "data.remote: must differ from data.local (local is the cache streamed into)"
                )
            return
        weights = {"proportion": [], "repeat": []}
        locals_seen: dict[str, int] = {}
        for i, (s, resolved) in enumerate(zip(self.streams, self.stream_configs())):
            key = f"data.streams[{i}]"
            info = self._check_dataset(s, key)
            if info.modality != modality:
                raise config_error(
                    f"{key}.dataset: {resolved.dataset!r} holds {info.modality} but data.dataset "
                    f"{self.dataset!r} holds {modality}; all streams must be of one modality"
                )
            if modality != "text" and info.channels != channels:
                raise config_error(
                    f"{key}.dataset: {resolved.dataset!r} has {info.channels} channel(s) but data.dataset "
                    f"{self.dataset!r} has {channels}; the images of one batch must have the same channels"
                )
            for name in ("proportion", "repeat"):
                value = getattr(s, name)
                if value is not None and value < 0:
                    raise config_error(f"{key}.{name}: must be >= 0, got {value}")
                weights[name].append(value is not None)
            if s.proportion is not None and s.repeat is not None:
                raise config_error(f"{key}.repeat: give proportion or repeat, not both")
            local = os.path.abspath(resolved.local_dir())
            if local in locals_seen:
                raise config_error(
                    f"{key}.local: {local} is also data.streams[{locals_seen[local]}]'s; give each stream its own"
                )
            locals_seen[local] = i
            if s.remote and os.path.abspath(s.remote) == local:
                raise config_error(
                    f"{key}.remote: must differ from its local (local is the cache streamed into)"
                )
        if any(weights["proportion"]) and not all(weights["proportion"]):
            missing = weights["proportion"].index(False)
            raise config_error(
                f"data.streams[{missing}].proportion: missing; when one stream has a proportion, all must"
            )
        if any(weights["proportion"]) and any(weights["repeat"]):
            raise config_error(
                f"data.streams[{weights['repeat'].index(True)}].repeat: proportions and repeats cannot be mixed"
            )
        if any(weights["proportion"]) and sum(s.proportion for s in self.streams) <= 0:
            raise config_error("data.streams: the proportions sum to 0")


def config_error(message: str) -> ConfigError:
    """The ConfigError every layer raises (pretrain.errors), naming the key first."""
    return ConfigError(message)
