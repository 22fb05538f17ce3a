"""`vitlab models`: list the registry with parameter counts."""

from __future__ import annotations

import argparse

import torch

from vitlab.errors import VitlabError
from vitlab.models.registry import build_model, get_spec, list_models, model_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the models vitlab can build")
    parser.add_argument("pattern", nargs="?", default="", help="only names containing this")
    parser.add_argument("--num-classes", type=int, default=None, help="head size for the counts")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
