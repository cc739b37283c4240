"""The CLIP BPE tokenizer (49,408 ids), built offline from the vocabulary file packaged in the open-clip-torch wheel.

    python -m pretrain.data.clip_bpe open_clip_torch-3.3.0-py3-none-any.whl   # scripts/setup.sh runs this

The wheel holds `open_clip/bpe_simple_vocab_16e6.txt.gz`: a header line, then the merges in rank order. CLIP
uses the first 49,152 - 256 - 2 of them, and its vocabulary is, in id order, the 256 byte symbols (GPT-2's
printable byte alphabet), the same 256 with the end-of-word mark `</w>`, one token per merge, and
`<|startoftext|>` (49406, BOS) and `<|endoftext|>` (49407, EOS, also the padding and unknown token). This
module writes `vocab.json` and `merges.txt` from it, lets transformers' `CLIPTokenizerFast` convert them
(lower-casing, whitespace runs folded to one space, CLIP's pre-tokenizer regex), and saves the folder with
`save_pretrained`, so both `tokenizers.Tokenizer.from_file(.../tokenizer.json)` and `AutoTokenizer` load it.
Nothing is installed: the wheel is only read as a zip file.

The folder lives at a fixed place in the checkout (`CLIP_BPE_DIR`, git-ignored), is written atomically, and a
second build with the same vocabulary file does nothing. `data.tokenizer: clip` (the default of image-text
datasets) reads it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from pretrain.errors import ConfigError

CLIP_BPE_DIR = Path(__file__).resolve().parents[2] / "data" / "tokenizers" / "clip_bpe"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # what CLIP keeps of the file (its vocabulary is 49,408 = 512 + merges + 2)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77  # CLIP's text context (model_max_length in tokenizer_config.json)
STAMP = "built_from.json"


def clip_bpe_dir() -> str:
    """The built folder; ConfigError naming the setup step when it is missing."""
    if not (CLIP_BPE_DIR / "tokenizer.json").is_file():
        raise ConfigError(
            f"data.tokenizer: the CLIP BPE is not built at {CLIP_BPE_DIR}: run `bash scripts/setup.sh` "
            "(or `python -m pretrain.data.clip_bpe WHEEL` with the open-clip-torch wheel from "
            "`pip download open-clip-torch --no-deps`)"
        )
    return str(CLIP_BPE_DIR)


def read_vocab_file(path: str | os.PathLike) -> bytes:
    """The gzipped BPE file's bytes, from an open-clip-torch wheel (a zip) or from the .txt.gz itself."""
    path = str(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            if MEMBER not in wheel.namelist():
                raise ValueError(f"{path}: no {MEMBER} inside (is it an open-clip-torch wheel?)")
            return wheel.read(MEMBER)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x1f\x8b":
        raise ValueError(f"{path}: neither a wheel (zip) nor a gzip file")
    return data


def merges_and_vocab(gz: bytes) -> tuple[list[str], dict[str, int]]:
    """(CLIP's merges as "a b" lines in rank order, token -> id) from the gzipped BPE file."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    lines = gzip.decompress(gz).decode("utf-8").split("\n")
    merges = lines[1 : 1 + NUM_MERGES]  # line 0 is a version header
    if len(merges) != NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{MEMBER}: expected {NUM_MERGES} merge lines 'a b' after the header")
    byte_symbols = list(bytes_to_unicode().values())  # 256, in CLIP's order
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + [m.replace(" ", "") for m in merges]
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{MEMBER}: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return merges, vocab


def build(vocab_file: str | os.PathLike, out: str | os.PathLike = CLIP_BPE_DIR, force: bool = False) -> str:
    """Write the tokenizer folder `out` from a wheel or .txt.gz; returns `out`. Idempotent: a folder already
    built from the same file (same sha256) is kept unless `force`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gz = read_vocab_file(vocab_file)
    sha = hashlib.sha256(gz).hexdigest()
    out = Path(out)
    stamp = out / STAMP
    if not force and (out / "tokenizer.json").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()).get("sha256") == sha:
            return str(out)
    merges, vocab = merges_and_vocab(gz)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        from transformers import CLIPTokenizerFast

        fast = CLIPTokenizerFast(
            vocab_file=str(tmp / "vocab.json"),
            merges_file=str(tmp / "merges.txt"),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=EOS,
            unk_token=EOS,
            model_max_length=CONTEXT_LENGTH,
        )
        if len(fast) != VOCAB_SIZE or fast.convert_tokens_to_ids([BOS, EOS]) != [49406, 49407]:
            raise ValueError(
                f"CLIPTokenizerFast built {len(fast)} ids from {vocab_file}, expected {VOCAB_SIZE}"
            )
        fast.save_pretrained(str(tmp))  # tokenizer.json, tokenizer_config.json, special_tokens_map.json, ...
        about = {"source": os.path.basename(str(vocab_file)), "member": MEMBER, "sha256": sha}
        (tmp / STAMP).write_text(json.dumps(about, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain.data.clip_bpe", description=__doc__.splitlines()[0]
    )
    parser.add_argument("vocab_file", help="open-clip-torch wheel (.whl) or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", default=str(CLIP_BPE_DIR), help=f"folder to write (default {CLIP_BPE_DIR})")
    parser.add_argument("--force", action="store_true", help="rebuild even if built from the same file")
    args = parser.parse_args(argv)
    try:
        print(build(args.vocab_file, args.out, args.force))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
