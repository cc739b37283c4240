"""The run's tokenizer: a local tokenizer.json / Hugging Face tokenizer folder, the CLIP BPE, or a byte-level BPE
trained here. Text and image-text datasets have one (captions are tokenized like documents); image datasets none.

data.tokenizer: a path (that tokenizer); "clip", the default of image-text datasets (the CLIP BPE folder that
pretrain.data.clip_bpe builds at setup); "bpe", the default of text datasets (the trained tokenizer):

Trained tokenizer: `tokenizers` byte-level BPE of data.vocab_size ids, special tokens <pad> <s> </s> <unk> <mask>
at ids 0-4, trained on the first data.max_samples documents (an image-text dataset: captions) of the *train* split
of data.dataset (the first stream's, with data.streams), no normalizer (text round-trips byte for byte). It is
written once, atomically, to

    <folder holding the shard dir>/tokenizer-<dataset>-bpe<vocab_size>[-first<max_samples>]/tokenizer.json

i.e. next to `data.local_dir()` (or `data.remote`): with the default dirs, data/shards/<dataset>/tokenizer-...,
shared by every split converted there, and reused; training is deterministic (same bytes every time), so
two machines that train it from the same data get the same file.

`tokenizer_info(cfg)` is cheap (no training, no conversion): what the objectives and models need to know at
config time. `hf_tokenizer` gives the transformers tokenizer that exports save with `save_pretrained`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pretrain.data.config import DataConfig, config_error
from pretrain.data.sources import SourceError, get_dataset

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")  # ids 0-4 of a tokenizer trained here
ROLES = ("pad", "bos", "eos", "unk", "mask")
# How the roles are spelled in other tokenizers, when their config does not say; BERT's [CLS]/[SEP] stand in
# for BOS/EOS (they open and close a sequence).
ROLE_SPELLINGS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
    "eos": ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
}
CONFIG_KEYS = {"pad": ("pad_token",), "bos": ("bos_token", "cls_token"), "eos": ("eos_token", "sep_token")}
CONFIG_KEYS.update({"unk": ("unk_token",), "mask": ("mask_token",)})
TRAIN_DOCS_BATCH = 1000


@dataclass(frozen=True)
class TokenizerInfo:
    """What the rest of Tessera knows of the tokenizer. A role the tokenizer lacks is None."""

    vocab_size: int  # ids are < vocab_size (a trained tokenizer: data.vocab_size, possibly not all used)
    pad_id: int | None
    bos_id: int | None
    eos_id: int | None
    mask_id: int | None
    unk_id: int | None
    special_ids: tuple[int, ...]  # every special token's id (never masked, never a prediction target of MLM)
    sha256: str | None  # of the tokenizer.json file; None = to be trained (not yet on disk)
    path: str  # the tokenizer.json file (where it will be, for one not yet trained)
    trained: bool = False  # trained here from data.vocab_size, rather than given as data.tokenizer

    def require(self, roles: Iterable[str], who: str) -> None:
        """ConfigError naming the tokenizer if it lacks a token `who` needs (e.g. ("mask",), "objective mlm")."""
        missing = [r for r in roles if getattr(self, f"{r}_id") is None]
        if missing:
            raise config_error(
                f"data.tokenizer: {self.path} has no {'/'.join(missing)} token, which {who} needs "
                f"(recognized spellings: {', '.join(s for r in missing for s in ROLE_SPELLINGS[r])})"
            )

    @property
    def padding_id(self) -> int:
        """The id packed rows hold at padding: the pad token, else EOS (doc_ids = -1 is what marks padding)."""
        if self.pad_id is not None:
            return self.pad_id
        self.require(["eos"], "packing (padding)")
        return self.eos_id

    def describe(self) -> str:
        return f"{self.path} (sha256 {self.sha256[:12] if self.sha256 else 'not trained yet'})"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_file(path: str) -> str:
    """The tokenizer.json of a file or an HF tokenizer folder."""
    return os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path


def trained_tokenizer_dir(cfg: DataConfig) -> str:
    """Where the tokenizer trained for `cfg` lives (see the module docstring)."""
    first = cfg.stream_configs()[0]
    home = os.path.dirname(os.path.abspath(first.remote or first.local_dir()))
    subset = f"-first{first.max_samples}" if first.max_samples else ""
    return os.path.join(home, f"tokenizer-{first.dataset}-bpe{cfg.vocab_size}{subset}")


def shard_dir(cfg: DataConfig, tok: TokenizerInfo | None) -> str:
    """The directory a split's shards live in: data.local when set; else DataConfig.local_dir(), which for text
    is suffixed with the tokenizer it was tokenized with (`-bpe<V>[-first<N>]` for one trained here, `-tok<sha>`
    for data.tokenizer), so runs with different tokenizers never fight over the same default directory."""
    if cfg.local or tok is None:
        return cfg.local_dir()
    if tok.trained:
        tag = (
            os.path.basename(os.path.dirname(tok.path))
            .removeprefix("tokenizer-")
            .removeprefix(f"{cfg.dataset}-")
        )
    else:
        tag = f"tok{(tok.sha256 or '')[:12]}"
    return f"{cfg.local_dir()}-{tag}"


def load_tokenizer(path: str) -> Any:
    """tokenizers.Tokenizer from a tokenizer.json (or folder), with padding and truncation off: documents are
    tokenized whole and packed by Tessera (a packaged tokenizer.json may pad every text to 128)."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(file)
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise config_error(f"data.tokenizer: {file} is not a tokenizers JSON file ({err})") from err
    tok.no_padding()
    tok.no_truncation()
    return tok


def _role_from_config(folder: str, role: str) -> str | None:
    """The token a Hugging Face folder's tokenizer_config.json / special_tokens_map.json names for `role`."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            conf = json.load(f)
        for key in CONFIG_KEYS[role]:
            value = conf.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


@functools.lru_cache(maxsize=16)
def _file_info(file: str, mtime_ns: int, size: int, folder: str | None) -> TokenizerInfo:
    """Info of a given tokenizer; cached per file version (config checks ask several times)."""
    tok = load_tokenizer(file)
    vocab = tok.get_vocab(with_added_tokens=True)
    roles: dict[str, int | None] = {}
    for role in ROLES:
        named = _role_from_config(folder, role) if folder else None
        spellings = (named,) if named else ROLE_SPELLINGS[role]
        roles[role] = next((vocab[s] for s in spellings if s in vocab), None)
    added = tok.get_added_tokens_decoder()
    special = {i for i, t in added.items() if t.special} | {i for i in roles.values() if i is not None}
    return TokenizerInfo(
        vocab_size=max(vocab.values()) + 1,
        **{f"{r}_id": roles[r] for r in ROLES},
        special_ids=tuple(sorted(special)),
        sha256=_sha256(file),
        path=file,
    )


def info_from_path(path: str) -> TokenizerInfo:
    file = tokenizer_file(path)
    if not os.path.isfile(file):
        raise config_error(
            f"data.tokenizer: {path} is neither a tokenizer.json file nor a folder holding one"
        )
    st = os.stat(file)
    return _file_info(
        os.path.abspath(file), st.st_mtime_ns, st.st_size, path if os.path.isdir(path) else None
    )


def tokenizer_info(cfg: DataConfig) -> TokenizerInfo | None:
    """The run's tokenizer, None for image data. Cheap: reads at most the tokenizer file, never trains."""
    modality = get_dataset(cfg.dataset).modality
    if modality == "image":
        return None
    name = cfg.tokenizer_name(modality)
    if name == "clip":
        from pretrain.data.clip_bpe import clip_bpe_dir

        return info_from_path(clip_bpe_dir())  # ConfigError naming scripts/setup.sh when not built
    if name != "bpe":
        return info_from_path(name)
    file = os.path.join(trained_tokenizer_dir(cfg), "tokenizer.json")
    sha = None
    if os.path.isfile(file):
        sha = info_from_path(file).sha256
    return TokenizerInfo(
        vocab_size=cfg.vocab_size,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        mask_id=4,
        special_ids=tuple(range(len(SPECIAL_TOKENS))),
        sha256=sha,
        path=file,
        trained=True,
    )


# ---------------------------------------------------------------------------------------------- training


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE (tokenizers), special tokens at ids 0-4; deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _train_texts(cfg: DataConfig, counts: dict[str, int]) -> Iterable[str]:
    """The first max_samples readable, non-empty documents of the train split of the first stream."""
    first = cfg.stream_configs()[0]
    info = get_dataset(first.dataset)
    if info.splits is None and first.split != "train":
        raise SourceError(
            f"data.tokenizer: no tokenizer at {trained_tokenizer_dir(cfg)} yet, and dataset {first.dataset!r} "
            f"reads split {first.split!r} from data.source, not the train split it must be trained on; convert "
            "the train split first (it trains the tokenizer) or set data.tokenizer"
        )
    for doc in info.documents("train", first.source, cfg):
        if first.max_samples is not None and counts["documents"] >= first.max_samples:
            return
        if "error" in doc or not doc["text"].strip():
            continue  # the converter reports these; the tokenizer just does not learn from them
        counts["documents"] += 1
        yield doc["text"]


def ensure_tokenizer(cfg: DataConfig) -> TokenizerInfo | None:
    """tokenizer_info(cfg), training the tokenizer first if it is a trained one not on disk yet (one process:
    ensure_shards calls it on rank 0)."""
    info = tokenizer_info(cfg)
    if info is None or info.sha256 is not None:
        return info
    folder = os.path.dirname(info.path)
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"documents": 0}
    log.info(
        "training a byte-level BPE tokenizer of %d ids for %s -> %s", cfg.vocab_size, cfg.dataset, folder
    )
    try:
        tok = train_bpe(_train_texts(cfg, counts), cfg.vocab_size)
        if counts["documents"] == 0:
            raise SourceError(f"data.tokenizer: the train split of {cfg.dataset!r} has no text to train on")
        os.makedirs(tmp)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        first = cfg.stream_configs()[0]
        about = {
            "dataset": first.dataset,
            "split": "train",
            "source": os.path.abspath(first.source) if first.source else None,
            "max_samples": first.max_samples,
            "documents": counts["documents"],
            "vocab_size": cfg.vocab_size,
            "special_tokens": list(SPECIAL_TOKENS),
        }
        with open(os.path.join(tmp, "trained_on.json"), "w") as f:
            json.dump(about, f, indent=2)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.rename(tmp, folder)  # atomic: a half-written tokenizer is never found
        except OSError:
            if not os.path.isfile(info.path):
                raise
            shutil.rmtree(tmp)  # another job trained it meanwhile (from the same data: the same bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tokenizer_info(cfg)


# ---------------------------------------------------------------------------------------------- transformers


def hf_tokenizer(info_or_path: TokenizerInfo | str) -> Any:
    """transformers.PreTrainedTokenizerFast over the same tokenizer.json, its special tokens set; `save_pretrained`
    writes a folder that AutoTokenizer loads offline. Encodes like the tokenizers object (no special tokens added
    unless the tokenizer.json's own post-processor adds them)."""
    from transformers import PreTrainedTokenizerFast

    info = info_or_path if isinstance(info_or_path, TokenizerInfo) else info_from_path(info_or_path)
    if info.sha256 is None:
        raise config_error(f"data.tokenizer: {info.path} is not trained yet (convert the train split first)")
    tok = load_tokenizer(info.path)
    names = {
        f"{r}_token": tok.id_to_token(getattr(info, f"{r}_id"))
        for r in ROLES
        if getattr(info, f"{r}_id") is not None
    }
    return PreTrainedTokenizerFast(tokenizer_object=tok, **names)
