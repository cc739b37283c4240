"""`python -m pretrain.data list | convert NAME | verify DIR`: prepare shards ahead of a job, check them after a copy.

    python -m pretrain.data convert wordnet --split train --vocab-size 8192 --out data/shards/wordnet/train
    python -m pretrain.data convert jsonl --source corpus/ --tokenizer tok/tokenizer.json --split train

    python -m pretrain.data convert emoji --split test

Text datasets and image-text captions are tokenized on the way: with --tokenizer a tokenizer.json (or HF folder)
or `clip` (the CLIP BPE, the default for image-text), else a byte-level BPE of --vocab-size ids trained on the
train split next to the output (pretrain.data.tokenizer). Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pretrain.data.config import DataConfig
from pretrain.data.mds import convert, num_samples, read_meta, validate_shards
from pretrain.data.sources import SourceError, get_dataset, list_datasets
from pretrain.data.tokenizer import ensure_tokenizer, shard_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered datasets")
    conv = sub.add_parser("convert", help="write a dataset split as MDS shards")
    conv.add_argument("name", help="registered dataset name")
    conv.add_argument("--split", default="train")
    conv.add_argument("--source", default=None, help="raw input file or folder (image_folder, text files)")
    conv.add_argument("--out", default=None, help="output dir (default: data/shards/<name>/<split>)")
    conv.add_argument("--max-samples", type=int, default=None, help="convert only the first N samples")
    conv.add_argument("--overwrite", action="store_true", help="replace existing shards at --out")
    text = conv.add_argument_group("text and image-text datasets")
    text.add_argument(
        "--tokenizer", default=None, help="tokenizer.json, HF tokenizer folder, clip or bpe (data.tokenizer)"
    )
    text.add_argument(
        "--vocab-size", type=int, default=DataConfig.vocab_size, help="trained tokenizer's size"
    )
    text.add_argument("--text-field", default=DataConfig.text_field, help="JSON field holding the text")
    text.add_argument(
        "--image-field", default=DataConfig.image_field, help="field holding the image (image-text pairs)"
    )
    text.add_argument("--split-by", default=DataConfig.split_by, help="document | line | paragraph")
    text.add_argument("--add-bos", action="store_true", help="prepend BOS to every document")
    text.add_argument(
        "--bad-samples",
        default="error",
        help="error | skip (documents not UTF-8, pairs with a bad image / caption)",
    )
    verify = sub.add_parser("verify", help="check index.json and every shard's presence and size")
    verify.add_argument("dir")
    return parser


def _describe(name: str) -> str:
    info = get_dataset(name)
    splits = ",".join(info.splits) if info.splits else "any (--source)"
    if info.modality == "text":
        kind = f"text  fields={'+'.join(info.fields):10s}"
    elif info.modality == "image_text":
        kind = f"pairs {'+'.join(info.fields):20s}"
    else:
        size = f"{info.image_size}x{info.image_size}" if info.image_size else "any size"
        kind = f"image channels={info.channels} {size:9s}"
    return f"{name:14s} {kind} splits={splits:16s} {info.description}".rstrip()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "list":
            for name in list_datasets():
                print(_describe(name))
        elif args.command == "convert":
            cfg = DataConfig(
                dataset=args.name,
                split=args.split,
                source=args.source,
                local=args.out,
                max_samples=args.max_samples,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                text_field=args.text_field,
                image_field=args.image_field,
                split_by=args.split_by,
                add_bos=args.add_bos,
                bad_samples=args.bad_samples,
            )
            cfg.validate()
            tok = ensure_tokenizer(cfg)
            out = shard_dir(cfg, tok)
            meta = convert(
                args.name,
                args.split,
                out,
                source=args.source,
                max_samples=args.max_samples,
                overwrite=args.overwrite,
                data=cfg,
                tokenizer=tok,
            )
            print(json.dumps({"out": out, **meta}))
        elif args.command == "verify":
            index = validate_shards(args.dir)
            print(
                json.dumps(
                    {
                        "dir": args.dir,
                        "shards": len(index["shards"]),
                        "samples": num_samples(index),
                        "meta": read_meta(args.dir),
                    }
                )
            )
    except (ValueError, KeyError, OSError, SourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
