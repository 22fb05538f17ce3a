"""`vitlab data shard SRC OUT`: write a data set as WebDataset tar shards for streaming, multi-process training."""

from __future__ import annotations

import argparse
import json

from vitlab.data.datasets import BUILTIN


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare data sets (WebDataset shards)")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(data))
    actions.required = True
    shard = actions.add_parser(
        "shard", help="write WebDataset tar shards ({key}.png + {key}.cls) and OUT/dataset.json",
        description="Write SRC as OUT/train-000000.tar, ..., OUT/test-000000.tar, ... and OUT/dataset.json; "
                    "then `vitlab train --dataset OUT` streams them, split by rank and worker.")
    shard.add_argument("source", metavar="SRC", help=f"{', '.join(BUILTIN)} or an image folder (one sub-folder per "
                                                     "class, optionally under train/ and test/)")
    shard.add_argument("out", metavar="OUT", help="output directory")
    shard.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    shard.add_argument("--subset", type=int, help="a balanced, seeded subset of N training images (built-in sets)")
    shard.add_argument("--seed", type=int, default=0, help="seed of the sample order within the shards")
    shard.add_argument("--skip-bad-images", action="store_true", help="leave out unreadable image files")
    shard.set_defaults(run=run_shard)


def run_shard(args: argparse.Namespace) -> int:
    from vitlab.data.shards import shard_dataset

    info = shard_dataset(args.source, args.out, args.shard_size, args.subset, args.seed, args.skip_bad_images)
    print(json.dumps({"out": args.out, **{split: {"num_samples": entry["num_samples"],
                                                  "shards": len(entry["shards"])}
                                          for split, entry in info["splits"].items()}}))
    return 0
