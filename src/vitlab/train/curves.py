"""The training curves of a run (loss and test accuracy against steps), drawn from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vitlab.atomic import atomic_path


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not records:
        return
    steps = [r["step"] for r in records]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss_axis.plot(steps, [r["train_loss"] for r in records], label="train loss")
    loss_axis.plot(steps, [r["test_loss"] for r in records], label="test loss")
    loss_axis.set_xlabel("step")
    loss_axis.legend()
    acc_axis.plot(steps, [100 * r["test_top1"] for r in records], label="test top-1")
    acc_axis.plot(steps, [100 * r["test_top5"] for r in records], label="test top-5")
    acc_axis.set_xlabel("step")
    acc_axis.set_ylabel("%")
    acc_axis.legend()
    figure.tight_layout()
    with atomic_path(out_path) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)
