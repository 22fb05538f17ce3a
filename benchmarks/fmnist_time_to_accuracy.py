"""Wall time to 90% and 92% Fashion-MNIST test top-1: vitlab's `fmnist-vit` recipe against a plain PyTorch loop
training timm's ViT of the same shape with default AdamW, one after the other in one invocation.

    python benchmarks/fmnist_time_to_accuracy.py [--budget-s 900] [--json out.json]

Both evaluate on the full 10k test set once per epoch. vitlab's clock is its run's `elapsed_s` (evaluations
included); the timm loop's clock leaves its evaluations out, so the comparison favours timm slightly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F

from vitlab.data import EvalTransform, load_dataset
from vitlab.eval.metrics import evaluate
from vitlab.models.registry import model_config
from vitlab.train.config import recipe_config
from vitlab.train.loop import Trainer

THRESHOLDS = (0.90, 0.92)


def first_time_at(curve: list[tuple[float, float]], threshold: float) -> float | None:
    return next((seconds for seconds, top1 in curve if top1 >= threshold), None)


def run_vitlab(budget_s: float) -> list[tuple[float, float]]:
    config = recipe_config("fmnist-vit")
    with TemporaryDirectory() as out:
        Trainer(dataclasses.replace(config, out=out, progress=False)).fit()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(r["elapsed_s"], r["test_top1"]) for r in records if r["elapsed_s"] <= budget_s]


def run_timm(budget_s: float, batch_size: int = 128) -> list[tuple[float, float]]:
    """The same architecture in timm, trained the plain way: AdamW defaults, constant lr, no augmentation."""
    import timm

    config = dataclasses.replace(model_config(recipe_config("fmnist-vit").model),
                                 **recipe_config("fmnist-vit").model_overrides)
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, budget {args.budget_s:.0f} s each")
    rows = [summarise("vitlab fmnist-vit", run_vitlab(args.budget_s)),
            summarise("timm ViT, plain AdamW loop", run_timm(args.budget_s))]
    print(f"\n{'run':<28} {'to 90%':>9} {'to 92%':>9} {'best':>8}")
    for row in rows:
        cells = [f"{row[key]:.0f} s" if row[key] is not None else "never" for key in ("s_to_90", "s_to_92")]
        print(f"{row['name']:<28} {cells[0]:>9} {cells[1]:>9} {row['best_top1']:>8.2%}")
    for key in ("s_to_90", "s_to_92"):
        ours, theirs = rows[0][key], rows[1][key]
        if ours and theirs:
            print(f"time to {key[5:]}%: timm loop / vitlab = {theirs / ours:.2f}x")
        elif ours:
            print(f"time to {key[5:]}%: vitlab {ours:.0f} s; the timm loop did not get there in {args.budget_s:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
