"""The step budget every study run gets: the same steps of the same batch for every model at a given size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vitlab.errors import VitlabError


@dataclass(frozen=True)
class Budget:
    """How many steps a run takes: at a given training-set size, every model gets the same steps of the same batch.

    steps(size) = max(epochs × steps per epoch, min_steps): a fixed number of epochs on large sets, with a floor so
    that small sets are judged on a finished optimisation rather than on a few dozen steps.
    """

    batch_size: int = 128
    epochs: float = 8.0
    min_steps: int = 500
    evals: int = 4  # test-set evaluations per run, the last at its final step
    warmup_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "min_steps", "evals"):
            if getattr(self, name) <= 0:
                raise VitlabError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise VitlabError(f"warmup fraction must be in [0, 1), got {self.warmup_fraction}")

    def steps_per_epoch(self, size: int) -> int:
        if size < self.batch_size:
            raise VitlabError(f"a training set of {size} images is smaller than the batch size {self.batch_size}")
        return size // self.batch_size  # the Trainer drops the last partial batch

    def steps(self, size: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * self.steps_per_epoch(size)))

    def rule(self) -> str:
        return (f"every run takes max({self.epochs:g} epochs, {self.min_steps} steps) of batch {self.batch_size}, "
                f"the same for every model at a given training-set size; cosine schedule with "
                f"{self.warmup_fraction:.0%} linear warm-up; {self.evals} test evaluation(s) per run")

    def train_fields(self, steps: int, size: int) -> dict[str, Any]:
        """TrainConfig fields that make the Trainer take exactly `steps` steps on `size` images."""
        epochs = (steps - 0.5) / self.steps_per_epoch(size)  # half a step under, so the Trainer's ceil() is exact
        # ceil: with steps / evals rounded down, the Trainer would add one more evaluation at the final step
        every = math.ceil(steps / self.evals) / self.steps_per_epoch(size)
        return {"batch_size": self.batch_size, "epochs": epochs, "eval_every_epochs": every,
                "warmup_steps": max(1, round(self.warmup_fraction * steps))}


QUICK_BUDGET = Budget(batch_size=64, epochs=1.0, min_steps=30, evals=1)
