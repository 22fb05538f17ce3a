"""`vitlab train` and `vitlab finetune`: parse the command line into a TrainConfig and run the Trainer."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from vitlab.errors import VitlabError
from vitlab.precision import describe_precision
from vitlab.train.config import TrainConfig, get_recipe, override, recipe_config
from vitlab.train.run_dir import checkpoint_train_config


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="a named recipe from vitlab.train.config.RECIPES; `vitlab finetune` "
                                         "defaults to `finetune`, the paper's settings over the source run's own")
    parser.add_argument("--model", help="registry name, e.g. vit-ti16")
    parser.add_argument("--dataset", help="fashion-mnist, digits, cifar10, cifar100, an image-folder path, or "
                                          "WebDataset shards (a directory of *.tar, or a brace pattern)")
    parser.add_argument("--subset", type=int, help="train on a balanced, seeded subset of N images")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--img-size", type=int)
    parser.add_argument("--seed", type=int)
    add_folder_options(parser)
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="deterministic algorithms (bit-identical resume on CPU)")
    parser.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, curves.png)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.* if present")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="run on N processes of this machine: re-launches itself through torchrun "
                             "(--standalone --nproc_per_node N); --batch-size stays the global batch")
    parser.add_argument("--fsdp", action="store_true", default=None,
                        help="shard the model, gradients and optimizer state across processes (FSDP2)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any TrainConfig field, e.g. --set ema_decay=0.999 (repeatable)")


def add_folder_options(parser: argparse.ArgumentParser) -> None:
    """--workers and --val-fraction: how an image folder is read and split."""
    parser.add_argument("--workers", type=int, metavar="N",
                        help="image-folder decoding processes (default: from the cores; 0: in this process)")
    parser.add_argument("--val-fraction", type=float, metavar="F",
                        help="an image folder without val/ or test/: the seeded share of each class held out for "
                             "evaluation, which training never sees (default 0.1; 0: evaluate on the training "
                             "images)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a model from scratch (pre-training)")
    add_common_options(train)
    train.set_defaults(run=run_train)
    finetune = subparsers.add_parser("finetune", help="fine-tune a checkpoint, e.g. at a higher resolution")
    finetune.add_argument("--from", dest="init_from", required=True, metavar="CHECKPOINT",
                          help="a vitlab run directory, any weights file vitlab can load, or a catalogue name "
                               "(vit-s16:augreg-in21k-ft-in1k, a bare tag with --model, timm/HF spellings)")
    add_common_options(finetune)
    finetune.set_defaults(run=run_finetune)


def parse_settings(settings: list[str]) -> dict[str, Any]:
    values = {}
    for item in settings:
        if "=" not in item:
            raise VitlabError(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        values[key.strip()] = value
    return values


def config_from_args(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    flags = {"model": args.model, "dataset": args.dataset, "subset": args.subset, "epochs": args.epochs,
             "batch_size": args.batch_size, "lr": args.lr, "img_size": args.img_size, "seed": args.seed,
             "deterministic": args.deterministic, "out": args.out, "progress": args.progress, "fsdp": args.fsdp,
             "workers": args.workers, "val_fraction": args.val_fraction}
    values = {key: value for key, value in flags.items() if value is not None}
    if args.model is not None and args.model != base.model:
        values["model_overrides"] = {}  # a recipe's overrides belong to the recipe's model
    config = override(base, values)
    return override(config, parse_settings(args.settings))


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc_per_node N -m vitlab ARGV` with `--nproc` removed."""
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "vitlab", *rest]


def _relaunch(args: argparse.Namespace) -> int | None:
    """With --nproc N, run the same command on N local processes through torchrun and return its exit code."""
    if args.nproc is None:
        return None
    from vitlab.train import distributed

    if args.nproc < 1:
        raise VitlabError(f"--nproc must be at least 1, got {args.nproc}")
    if distributed.launched():
        raise VitlabError("--nproc is for a plain `vitlab train`; under torchrun, leave it out")
    return subprocess.call(torchrun_command(args.nproc, getattr(args, "argv", sys.argv[1:])))


def run_train(args: argparse.Namespace) -> int:
    relaunched = _relaunch(args)
    if relaunched is not None:
        return relaunched
    base = recipe_config(args.recipe or "fmnist-vit")
    return _fit(config_from_args(args, base), args.resume)


def run_finetune(args: argparse.Namespace) -> int:
    relaunched = _relaunch(args)
    if relaunched is not None:
        return relaunched
    source = Path(args.init_from)
    entry = None
    if not source.exists():
        from vitlab.weights.hub import looks_like_name, resolve_name

        if not looks_like_name(args.init_from):
            raise VitlabError(f"--from {source}: no such file or directory")
        entry = resolve_name(args.init_from, args.model)  # the run records the canonical MODEL:TAG
        if args.model is not None and args.model != entry.model_name:
            raise VitlabError(f"--from {args.init_from} is a {entry.model_name} checkpoint, not --model {args.model}")
    # A layered recipe (the default, `finetune`) keeps the source run's data and model settings.
    recipe = get_recipe(args.recipe or "finetune")
    if entry is None:
        base = recipe.over(checkpoint_train_config(source) or TrainConfig())
        values = {"init_from": str(source), "out": str(Path(args.out or f"{source}-finetune"))}
    else:
        base = recipe.over(TrainConfig())
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", entry.name)
        values = {"init_from": entry.name, "model": entry.model_name, "model_overrides": {},
                  "out": str(Path(args.out or Path("runs") / f"{safe}-finetune"))}
    return _fit(config_from_args(args, override(base, values)), args.resume)


def _fit(config: TrainConfig, resume: bool) -> int:
    from vitlab.train import distributed
    from vitlab.train.loop import Trainer

    trainer = Trainer(config, resume=resume)
    precision = describe_precision(trainer.autocast, trainer.device)
    if os.environ.get("RANK", "0") == "0":  # torchrun's other processes stay quiet, as after the run
        print(f"precision: {precision}, amp={config.amp}", flush=True)
    try:
        result = trainer.fit()
    finally:
        distributed.cleanup()
    if trainer.dist.is_main:
        summary = {key: result[key] for key in ("step", "split", "test_top1", "test_top5", "best_top1",
                                                "skipped_images", "out") if key in result}
        print(json.dumps({**summary, "precision": precision}))
    return 0
