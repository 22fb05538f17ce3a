"""`vitlab models`: list the registry with parameter counts, or (--pretrained) the published checkpoints."""

from __future__ import annotations

import argparse
import fnmatch

import torch

from vitlab.errors import VitlabError
from vitlab.models.registry import build_model, get_spec, list_models, model_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the models vitlab can build")
    parser.add_argument("pattern", nargs="?", default="", help="only names containing this")
    parser.add_argument("--num-classes", type=int, default=None, help="head size for the counts")
    parser.add_argument("--pretrained", action="store_true",
                        help="list the checkpoint catalogue (names for --from, eval, predict, convert ...) with "
                             "resolution, pre-training data and published ImageNet top-1")
    parser.set_defaults(run=run)


def list_pretrained(pattern: str) -> int:
    """One line per catalogue entry whose `MODEL:TAG` name contains `pattern` (or matches it as a glob)."""
    from vitlab.weights.hub import list_pretrained as catalogue

    entries = [entry for entry in catalogue()
               if pattern in entry.name or (any(c in pattern for c in "*?[") and fnmatch.fnmatch(entry.name, pattern))]
    if not entries:
        raise VitlabError(f"no checkpoint name contains {pattern!r}; `vitlab models --pretrained` lists them all")
    print(f"{'NAME':<34} {'RES':>4}  {'PRE-TRAINING':<13} {'TOP-1':>6}  DESCRIPTION")
    for entry in entries:
        top1 = f"{entry.top1:.2f}" if entry.top1 is not None else "—"
        print(f"{entry.name:<34} {entry.img_size:>4}  {entry.pretraining:<13} {top1:>6}  {entry.description}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        return list_pretrained(args.pattern)
    names = list_models(args.pattern)
    if not names:
        raise VitlabError(f"no model name contains {args.pattern!r}; `vitlab models` lists them all")
    for name in names:
        with torch.device("meta"):  # count parameters without allocating the weights
            model = build_model(model_config(name, num_classes=args.num_classes))
        count = sum(p.numel() for p in model.parameters())
        spec = get_spec(name)
        print(f"{name:<18} {count:>13,}  {spec.description}")
    return 0
