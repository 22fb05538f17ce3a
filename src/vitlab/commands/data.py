"""`vitlab data shard SRC OUT`: write a data set as WebDataset tar shards for streaming, multi-process training."""

from __future__ import annotations

import argparse
import json

from vitlab.data.datasets import BUILTIN
from vitlab.data.folder import DEFAULT_VAL_FRACTION
from vitlab.data.images import DEFAULT_MAX_PIXELS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare data sets (WebDataset shards)")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(data))
    actions.required = True
    shard = actions.add_parser(
        "shard", help="write WebDataset tar shards ({key}.jpg/.png + {key}.cls) and OUT/dataset.json",
        description="Write SRC as OUT/train-000000.tar, ..., the evaluation split as OUT/val-000000.tar (or test-, "
                    "or holdout- for a folder without val/ or test/), ... and OUT/dataset.json; then `vitlab train "
                    "--dataset OUT` streams them, split by rank and worker. Image files keep their own bytes unless "
                    "--resize is given.")
    shard.add_argument("source", metavar="SRC", help=f"{', '.join(BUILTIN)} or an image folder (ROOT/train/<class>/ "
                                                     "with ROOT/val/<class>/ or ROOT/test/<class>/, or "
                                                     "ROOT/<class>/)")
    shard.add_argument("out", metavar="OUT", help="output directory")
    shard.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    shard.add_argument("--subset", type=int, help="a balanced, seeded subset of N training images (built-in sets)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the sample order within the shards")
    shard.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable image files")
    shard.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                       help="share of each class held out as the evaluation split of a folder without val/ or test/ "
                            f"(default {DEFAULT_VAL_FRACTION})")
    shard.add_argument("--resize", type=int, metavar="N",
                       help="scale images whose shorter side exceeds N pixels down to N (re-encoded); by default the "
                            "source files are stored as they are")
    shard.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help=f"refuse images of more pixels than this (default {DEFAULT_MAX_PIXELS})")
    shard.set_defaults(run=run_shard)


def run_shard(args: argparse.Namespace) -> int:
    from vitlab.data.images import ImageLimits
    from vitlab.data.shards import shard_dataset

    info = shard_dataset(args.source, args.out, args.shard_size, args.subset, args.seed, args.skip_bad_images,
                         args.val_fraction, args.resize, ImageLimits(max_pixels=args.max_pixels))
    splits = {split: {"num_samples": entry["num_samples"], "shards": len(entry["shards"])}
              for split, entry in info["splits"].items()}
    print(json.dumps({"out": args.out, "eval_split": info["eval_split"], **splits}))
    return 0
