"""`vitlab demo`: the main job end to end on Fashion-MNIST, through the same commands a user types.

Pre-train the `fmnist-vit-rrc` recipe, evaluate it, fine-tune at a higher resolution (the paper's step), predict a
few test images, draw what the model learned, and print a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.atomic import atomic_path, atomic_write
from vitlab.errors import VitlabError
from vitlab.train.config import RECIPES
from vitlab.train.run_dir import RunDir
from vitlab.precision import AMP_CHOICES

PRETRAIN_RECIPE = "fmnist-vit-rrc"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train, fine-tune, evaluate, predict and analyse on Fashion-MNIST")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None,
                        help="precision of every step (default: the recipe's, auto: bf16 autocast where the "
                             "hardware multiplies bf16 natively, else fp32; see docs/precision.md)")
    parser.set_defaults(run=run)


def _vitlab(*argv: str) -> None:
    from vitlab.cli import main

    command = " ".join(argv)
    print(f"\n$ vitlab {command}", flush=True)
    code = main(list(argv))
    if code:
        raise SystemExit(f"vitlab {command} failed with exit code {code}")


def _write_samples(out: Path, count: int = 4) -> list[Path]:
    from vitlab.data import load_dataset

    test = load_dataset("fashion-mnist", "test")
    paths = []
    out.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = out / f"test{index}-{test.classes[int(test.labels[index])].replace('/', '-')}.png"
        with atomic_path(path) as temporary:
            Image.fromarray(test.images[index, 0].numpy().astype(np.uint8), mode="L").save(temporary)
        paths.append(path)
    return paths


def _last_metrics(run_dir: RunDir) -> dict:
    record = run_dir.last_metrics()
    if record is None:
        raise VitlabError(f"{run_dir.metrics_path} holds no evaluation")
    return record


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    pretrain, finetune = out / "pretrain", out / "finetune"
    progress = [] if args.progress else ["--no-progress"]
    started = time.perf_counter()
    recipe = RECIPES[PRETRAIN_RECIPE]
    print(f"recipe {PRETRAIN_RECIPE}: {recipe.description}; expected: {recipe.expected}")
    amp_name = args.amp or recipe.config.amp
    amp = ["--set", f"amp={amp_name}"]
    _vitlab("train", "--recipe", PRETRAIN_RECIPE, "--out", str(pretrain), "--resume", *amp, *progress)
    trained = time.perf_counter()
    _vitlab("eval", str(pretrain), "--out", str(pretrain), "--amp", amp_name)
    _vitlab("finetune", "--recipe", "fmnist-finetune", "--from", str(pretrain), "--out", str(finetune), "--resume",
            *amp, *progress)
    finetuned = time.perf_counter()
    _vitlab("eval", str(finetune), "--out", str(finetune), "--amp", amp_name)
    pre_run, fine_run = RunDir(pretrain), RunDir(finetune)
    pre, fine = _last_metrics(pre_run), _last_metrics(fine_run)
    best = finetune if fine["test_top1"] >= pre["test_top1"] else pretrain
    samples = _write_samples(out / "samples")
    _vitlab("predict", str(best), *map(str, samples), "--amp", amp_name)
    _vitlab("analyze", str(best), "--images", *map(str, samples[:2]), "--dataset", "fashion-mnist", "--n", "128",
            "--out", str(out / "analysis"))
    summary = {"pretrain_top1": pre["test_top1"], "finetune_top1": fine["test_top1"], "best_run": str(best),
               "pretrain_s": round(trained - started, 1), "finetune_s": round(finetuned - trained, 1),
               "total_s": round(time.perf_counter() - started, 1), "amp": amp_name, "out": str(out)}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    best_top1 = max(pre["test_top1"], fine["test_top1"])
    print(f"\n=== vitlab demo: Fashion-MNIST test top-1 {pre['test_top1']:.2%} after pre-training at "
          f"{pre_run.img_size()} px ({summary['pretrain_s']:.0f} s), {fine['test_top1']:.2%} after fine-tuning at "
          f"{fine_run.img_size()} px ({summary['finetune_s']:.0f} s); best {best_top1:.2%}"
          f"; {summary['total_s']:.0f} s in all ===")
    print(f"pictures of what the model learned: {out / 'analysis' / 'index.html'}")
    return 0

