"""`vitlab models`: list the registry with parameter counts (plain, or the README's markdown table), or
(--pretrained) the published checkpoints."""

from __future__ import annotations

import argparse
import fnmatch

import torch

from vitlab.errors import VitlabError
from vitlab.models.registry import ModelSpec, build_model, get_spec, list_models, model_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list the models vitlab can build")
    parser.add_argument("pattern", nargs="?", default="", help="only names containing this")
    parser.add_argument("--num-classes", type=int, default=None, help="head size for the counts")
    parser.add_argument("--pretrained", action="store_true",
                        help="list the checkpoint catalogue (names for --from, eval, predict, convert ...) with "
                             "resolution, pre-training data and published ImageNet top-1")
    parser.add_argument("--markdown", action="store_true",
                        help="print a markdown table (name, family, parameters, image size, description)")
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


def parameter_count(name: str, num_classes: int | None = None) -> int:
    """Exact parameter count of a registered model, built on the meta device so no weights are allocated."""
    with torch.device("meta"):
        model = build_model(model_config(name, num_classes=num_classes))
    return sum(p.numel() for p in model.parameters())


def _markdown_row(spec: ModelSpec, count: int) -> str:
    height, width = spec.config.img_size
    description = spec.description.replace("|", "\\|")
    return f"| `{spec.name}` | {spec.family} | {count:,} | {height}×{width} | {description} |"


def markdown_table(names: list[str], num_classes: int | None = None) -> str:
    """The registry as a markdown table; README.md holds its output between `<!-- models:... -->` markers."""
    header = ["| name | family | parameters | image size | description |", "|---|---|---:|---|---|"]
    rows = [_markdown_row(get_spec(name), parameter_count(name, num_classes)) for name in names]
    return "\n".join(header + rows)


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        return list_pretrained(args.pattern)
    names = list_models(args.pattern)
    if not names:
        raise VitlabError(f"no model name contains {args.pattern!r}; `vitlab models` lists them all")
    if args.markdown:
        print(markdown_table(names, args.num_classes))
        return 0
    for name in names:
        print(f"{name:<18} {parameter_count(name, args.num_classes):>13,}  {get_spec(name).description}")
    return 0
