"""Wall time to 90% and 92% Fashion-MNIST test top-1: vitlab's demo pipeline, the same ViT without the
compute savings, and a plain PyTorch loop training timm's ViT of the same shape with default AdamW, one after the
other in one invocation.

    python benchmarks/fmnist_time_to_accuracy.py [--budget-s 900] [--runs vitlab vitlab-28px timm] [--threads N]
                                                 [--json out.json]

With `--threads 1`, two invocations (say `--runs vitlab` and `--runs timm`) can run side by side on two cores,
each on one, in half the wall time; their clocks then compare with each other, not with a two-thread run.

Runs:
- `vitlab`: `fmnist-vit` (pre-training at low resolution on whole images) then half an epoch of `fmnist-finetune`
  (28 px), the demo's stages when these results were first recorded;
- `vitlab-28px`: the `fmnist-vit` recipe at 28 px throughout for 19 epochs (as many tokens as its 33 at 21 px);
- `vitlab-patch-dropout`: `fmnist-vit` at 28 px training on half of the patch tokens (FLIP), then one
  full-token half epoch with the `fmnist-finetune` recipe at 28 px;
- `vitlab-bf16`: the `fmnist-vit` stage alone under bf16 autocast (`amp=bf16`). It is faster only on CPUs with bf16
  instructions (AVX512-BF16 or AMX), where oneDNN's bf16 matmuls run several times faster than fp32 ones; elsewhere
  they are emulated and slower;
- `vitlab-long`, `vitlab-long-21px`, `vitlab-long-patch-dropout`: the `fmnist-vit-long` recipe (28 px, random
  2-px shifts, 100 epochs) under bf16 autocast; at 21 px; and on half of the patch tokens. They take 30-40 minutes
  on one core: give them `--budget-s 2700`;
- `vitlab-p4`: the `fmnist-vit-p4` recipe (4-px patches, 49 tokens, width 64, 60 epochs) under bf16 autocast;
- `timm`: timm's VisionTransformer of the same shape, AdamW defaults, constant lr, no augmentation.

All evaluate on the full 10k test set once per epoch. vitlab's clock is its runs' `elapsed_s` (evaluations
included, stages added up); the timm loop's clock leaves its evaluations out, so the comparison favours timm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
import torch.nn.functional as F

from vitlab.allocator import keep_freed_memory
from vitlab.data import EvalTransform, load_dataset
from vitlab.eval.metrics import evaluate
from vitlab.models.registry import model_config
from vitlab.train.config import TrainConfig, override, recipe_config
from vitlab.train.loop import Trainer

THRESHOLDS = (0.90, 0.92)
FULL_SIZE = 28


def with_patch_dropout(recipe: str, rate: float = 0.5) -> dict[str, Any]:
    """Overrides that train `recipe`'s model on a random `1 - rate` share of its patch tokens (FLIP)."""
    return {"model_overrides": {**recipe_config(recipe).model_overrides, "patch_dropout": rate}}


# name -> the stages it trains, each (recipe, overrides); a later stage starts from the one before it
VITLAB_RUNS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # fp32 like the timm loop, whatever amp=auto would choose on this CPU
    "vitlab": [("fmnist-vit", {"amp": "fp32"}), ("fmnist-finetune", {"amp": "fp32", "epochs": 0.5})],
    # 16 tokens an image instead of 9: 19 epochs see as many tokens as the recipe's 33, so the schedule ends in time
    "vitlab-28px": [("fmnist-vit", {"img_size": FULL_SIZE, "epochs": 19, "amp": "fp32"})],
    "vitlab-patch-dropout": [
        ("fmnist-vit", {"img_size": FULL_SIZE, **with_patch_dropout("fmnist-vit"), "amp": "fp32"}),
        ("fmnist-finetune", {"model_overrides": {"patch_dropout": 0.0}, "amp": "fp32", "epochs": 0.5})],
    "vitlab-bf16": [("fmnist-vit", {"amp": "bf16"})],
    "vitlab-long": [("fmnist-vit-long", {"amp": "bf16"})],
    "vitlab-long-21px": [("fmnist-vit-long", {"amp": "bf16", "img_size": 21})],
    "vitlab-long-patch-dropout": [("fmnist-vit-long", {"amp": "bf16", **with_patch_dropout("fmnist-vit-long")})],
    "vitlab-p4": [("fmnist-vit-p4", {"amp": "bf16"})],
}


def first_time_at(curve: list[tuple[float, float]], threshold: float) -> float | None:
    return next((seconds for seconds, top1 in curve if top1 >= threshold), None)


def run_vitlab(stages: list[tuple[str, dict[str, Any]]], budget_s: float, threads: int | None
               ) -> list[tuple[float, float]]:
    """Train the stages one after another; the curve's clock adds the stages' elapsed times."""
    curve: list[tuple[float, float]] = []
    with TemporaryDirectory() as tmp:
        previous: str | None = None
        for index, (recipe, overrides) in enumerate(stages):
            out = str(Path(tmp) / f"stage{index}")
            config: TrainConfig = override(recipe_config(recipe), {**overrides, "out": out, "progress": False,
                                                                      "threads": threads})
            if previous is not None:
                config = dataclasses.replace(config, init_from=previous)
            Trainer(config).fit()
            offset = curve[-1][0] if curve else 0.0
            records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            stage_curve = [(offset + r["elapsed_s"], r["test_top1"]) for r in records]
            curve += stage_curve
            print(f"  {recipe} {overrides or ''}: "
                  + ", ".join(f"{top1:.2%} at {s:.0f} s" for s, top1 in stage_curve), flush=True)
            previous = out
    return [(seconds, top1) for seconds, top1 in curve if seconds <= budget_s]


def run_timm(budget_s: float, batch_size: int = 128) -> list[tuple[float, float]]:
    """The same architecture in timm, trained the plain way: AdamW defaults, constant lr, no augmentation."""
    import timm

    config = dataclasses.replace(model_config(recipe_config("fmnist-vit").model),
                                 **recipe_config("fmnist-vit").model_overrides, img_size=FULL_SIZE)
    model = timm.models.VisionTransformer(img_size=config.img_size, patch_size=config.patch_size, in_chans=1,
                                          num_classes=10, embed_dim=config.embed_dim, depth=config.depth,
                                          num_heads=config.num_heads, mlp_ratio=config.mlp_dim / config.embed_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    transform = EvalTransform(tuple(config.img_size))
    curve, clock = [], 0.0
    generator = torch.Generator().manual_seed(0)
    while clock < budget_s:
        start = time.perf_counter()
        model.train()
        for indices in torch.randperm(len(train), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(transform(train.images[indices])), train.labels[indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if clock + time.perf_counter() - start > budget_s:
                break
        clock += time.perf_counter() - start
        result = evaluate(model, test.images, test.labels, transform, torch.device("cpu"))
        curve.append((clock, result.top1))
        print(f"  timm epoch {len(curve)}: {result.top1:.2%} at {clock:.0f} s", flush=True)
    return curve


def summarise(name: str, curve: list[tuple[float, float]]) -> dict:
    row = {"name": name, "best_top1": max((top1 for _, top1 in curve), default=0.0),
           "final_s": curve[-1][0] if curve else None}
    for threshold in THRESHOLDS:
        row[f"s_to_{int(threshold * 100)}"] = first_time_at(curve, threshold)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=900.0)
    parser.add_argument("--runs", nargs="+", default=["vitlab", "vitlab-28px", "timm"],
                        choices=[*VITLAB_RUNS, "timm"])
    parser.add_argument("--threads", type=int, help="torch threads for every run (default: torch's choice)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the vitlab command does; every run of this process, timm's too, gets it
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, budget {args.budget_s:.0f} s each")
    rows = []
    for name in args.runs:
        print(f"{name}:", flush=True)
        if name == "timm":
            curve = run_timm(args.budget_s)
        else:
            curve = run_vitlab(VITLAB_RUNS[name], args.budget_s, args.threads)
        rows.append(summarise(name, curve))
    print(f"\n{'run':<22} {'to 90%':>9} {'to 92%':>9} {'best':>8}")
    for row in rows:
        cells = [f"{row[key]:.0f} s" if row[key] is not None else "never" for key in ("s_to_90", "s_to_92")]
        print(f"{row['name']:<22} {cells[0]:>9} {cells[1]:>9} {row['best_top1']:>8.2%}")
    reference = rows[0]
    for row in rows[1:]:
        for key in ("s_to_90", "s_to_92"):
            ours, theirs = reference[key], row[key]
            if ours and theirs:
                print(f"time to {key[5:]}%: {row['name']} / {reference['name']} = {theirs / ours:.2f}x")
            elif ours:
                print(f"time to {key[5:]}%: {reference['name']} {ours:.0f} s; {row['name']} did not get there in "
                      f"{args.budget_s:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
