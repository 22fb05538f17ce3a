"""`vitlab study data-size | posemb | resolution`: the inductive-bias studies (see vitlab.studies)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from vitlab import studies
from vitlab.commands.train import parse_settings
from vitlab.train.config import TrainConfig, override


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("study", help="inductive-bias studies: data size, position embeddings, "
                                                 "resolution")
    kinds = parser.add_subparsers(dest="study", metavar="STUDY", parser_class=type(parser))
    kinds.required = True
    data = kinds.add_parser("data-size", help="each model family on subsets of growing size (paper Figs. 3-4)")
    data.add_argument("--sizes", type=int, nargs="+", metavar="N",
                      help=f"training-set sizes (default {' '.join(map(str, studies.FULL_SIZES))}; "
                           f"--quick: {' '.join(map(str, studies.QUICK_SIZES))})")
    data.add_argument("--models", nargs="+", default=list(studies.FAMILY_RECIPES), metavar="FAMILY",
                      help=f"model families (default: {' '.join(studies.FAMILY_RECIPES)})")
    data.set_defaults(run=run_data_size)
    posemb = kinds.add_parser("posemb", help="none vs learned 1D vs 2D sin-cos position embeddings (paper Table 8)")
    posemb.set_defaults(run=run_posemb)
    resolution = kinds.add_parser("resolution", help="pre-train at low resolution and fine-tune higher vs one "
                                                     "resolution, for the same total steps")
    resolution.add_argument("--models", nargs="+", default=["vit"], metavar="FAMILY", help="model families (vit)")
    resolution.add_argument("--low", type=int, default=28, help="pre-training resolution (28)")
    resolution.add_argument("--high", type=int, default=42, help="fine-tuning resolution (42)")
    resolution.add_argument("--finetune-fraction", type=float, default=0.2,
                            help="share of the steps spent fine-tuning at the high resolution (0.2)")
    resolution.add_argument("--rrc-scale", type=float, metavar="MIN",
                            help="also pre-train with random-resized crops of area share MIN to 1, and compare each "
                                 "pre-training fine-tuned at --high against continued at --low")
    resolution.set_defaults(run=run_resolution)
    for kind in (posemb, resolution):
        kind.add_argument("--size", type=int, help=f"training-set size (default: all of it; --quick: "
                                                   f"{studies.QUICK_SIZE})")
    for kind in (data, posemb, resolution):
        _add_common(kind)


def _add_common(parser: argparse.ArgumentParser) -> None:
    full, quick = studies.Budget(), studies.QUICK_BUDGET
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default), digits, ... or a path")
    parser.add_argument("--out", default="runs/study", help="study directory: tables, plots and one folder per run")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke test in seconds")
    parser.add_argument("--batch-size", type=int, help=f"batch ({full.batch_size}; --quick {quick.batch_size})")
    parser.add_argument("--epochs", type=float, help=f"epochs per run unless that is fewer than --min-steps "
                                                     f"({full.epochs:g}; --quick {quick.epochs:g})")
    parser.add_argument("--min-steps", type=int, help=f"fewest steps per run ({full.min_steps}; --quick "
                                                      f"{quick.min_steps})")
    parser.add_argument("--evals", type=int, help=f"test evaluations per run ({full.evals}; --quick {quick.evals})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--no-train", dest="train", action="store_false",
                        help="train nothing: write the table from the runs that have finished, the rest as pending")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field for every run, e.g. --set threads=2 (repeatable)")


def _study(args: argparse.Namespace) -> studies.Study:
    flags = {"batch_size": args.batch_size, "epochs": args.epochs, "min_steps": args.min_steps, "evals": args.evals}
    budget = dataclasses.replace(studies.QUICK_BUDGET if args.quick else studies.Budget(),
                                 **{key: value for key, value in flags.items() if value is not None})
    settings = parse_settings(args.settings)
    override(TrainConfig(), settings)  # refuse a bad --set before any run starts
    return studies.Study(dataset=args.dataset, budget=budget, out=args.out, seed=args.seed, settings=settings,
                         progress=args.progress, train=args.train, command=shlex.join(["vitlab", *args.argv]))


def _size(args: argparse.Namespace) -> int | None:
    return args.size or (studies.QUICK_SIZE if args.quick else None)


def _report(result: studies.StudyResult) -> int:
    print(f"\n{result.markdown}")
    print("written: " + ", ".join(map(str, result.files)))
    return 0


def run_data_size(args: argparse.Namespace) -> int:
    sizes = args.sizes or (studies.QUICK_SIZES if args.quick else studies.FULL_SIZES)
    return _report(studies.data_size_study(_study(args), sizes, args.models))


def run_posemb(args: argparse.Namespace) -> int:
    return _report(studies.posemb_study(_study(args), _size(args)))


def run_resolution(args: argparse.Namespace) -> int:
    return _report(studies.resolution_study(_study(args), args.models, _size(args), args.low, args.high,
                                            args.finetune_fraction, args.rrc_scale))
