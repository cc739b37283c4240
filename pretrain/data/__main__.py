"""`python -m pretrain.data list | convert NAME | verify DIR`: prepare shards ahead of a job, check them after a copy.

Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pretrain.data.config import DataConfig
from pretrain.data.mds import convert, num_samples, read_meta, validate_shards
from pretrain.data.sources import SourceError, get_dataset, list_datasets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pretrain.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered datasets")
    conv = sub.add_parser("convert", help="write a dataset split as MDS shards")
    conv.add_argument("name", help="registered dataset name")
    conv.add_argument("--split", default="train")
    conv.add_argument("--source", default=None, help="raw input folder (required for image_folder)")
    conv.add_argument("--out", default=None, help="output dir (default: data/shards/<name>/<split>)")
    conv.add_argument("--max-samples", type=int, default=None, help="convert only the first N samples")
    conv.add_argument("--overwrite", action="store_true", help="replace existing shards at --out")
    verify = sub.add_parser("verify", help="check index.json and every shard's presence and size")
    verify.add_argument("dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "list":
            for name in list_datasets():
                info = get_dataset(name)
                splits = ",".join(info.splits) if info.splits else "any (--source)"
                size = f"{info.image_size}x{info.image_size}" if info.image_size else "any size"
                print(f"{name:16s} channels={info.channels} {size:10s} splits={splits}")
        elif args.command == "convert":
            cfg = DataConfig(
                dataset=args.name,
                split=args.split,
                source=args.source,
                local=args.out,
                max_samples=args.max_samples,
            )
            cfg.validate()
            meta = convert(
                args.name,
                args.split,
                cfg.local_dir(),
                source=args.source,
                max_samples=args.max_samples,
                overwrite=args.overwrite,
            )
            print(json.dumps({"out": cfg.local_dir(), **meta}))
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
