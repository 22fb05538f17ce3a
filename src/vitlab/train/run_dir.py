"""A run directory's records, read and written in one place.

A run directory holds, beside its checkpoints' tensors:

- `last.json` / `best.json`: the record of a checkpoint (written with its tensors by `train.checkpoint`): the
  training and model configs, class names, the `preprocessing` the model's images go through, `step`,
  `total_steps`, `steps_per_epoch`, `best_top1`, `elapsed_s`, `skipped_images` and `skipped_files` (the unreadable
  images skipped), and the optimizer, scheduler and train-loss-window state a resume needs;
- `metrics.jsonl`: one JSON object per evaluation (`step`, `epoch`, `train_loss`, `lr`, `split` (the split the
  `test_*` numbers were measured on: "val", "test", "holdout", or "train" where nothing is held out),
  `test_loss`, `test_top1`, `test_top5`, `img_per_s`, `elapsed_s`), appended and synced line by line; a resumed
  run drops the lines after its checkpoint's step, and readers skip a line torn by a kill;
- `curves.png`: those metrics drawn (`vitlab.analysis.plots.plot_training_curves`).

The trainer, the studies, the demo, the train command and the curves all go through `RunDir`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitlab.atomic import atomic_write
from vitlab.errors import VitlabError
from vitlab.train import checkpoint as ckpt
from vitlab.train.config import TrainConfig, config_from_json


def read_record(path: Path) -> dict[str, Any] | None:
    """A checkpoint record (`NAME.json`) as a dict, or None when there is none; unreadable ones are refused."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON, or not UTF-8
        raise VitlabError(f"{path}: unreadable run record: {error}") from None
    if not isinstance(data, dict):
        raise VitlabError(f"{path}: a run record must be a JSON object, got {type(data).__name__}")
    return data


def record_train_config(path: Path) -> TrainConfig | None:
    """The TrainConfig a checkpoint record at `path` was made with; None without a record or a training config."""
    data = read_record(path)
    if data is None or "train_config" not in data:
        return None
    return config_from_json(data["train_config"], str(path))


@dataclass(frozen=True)
class RunDir:
    """One run directory: its checkpoints' records and its metrics log."""

    path: Path

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def curves_path(self) -> Path:
        return self.path / "curves.png"

    def record_path(self, name: str = "last") -> Path:
        return self.path / f"{name}.json"

    # ---------------------------------------------------------------- checkpoint records
    def record(self, name: str = "last") -> dict[str, Any] | None:
        """`NAME.json` as a dict (None when absent), without checking it against its tensors."""
        return read_record(self.record_path(name))

    def train_config(self, name: str = "last") -> TrainConfig | None:
        return record_train_config(self.record_path(name))

    def img_size(self, name: str = "last") -> int:
        """The side of the images the run's model takes."""
        record = self.record(name)
        if record is None:
            raise VitlabError(f"{self.path}: no {name}.json run record")
        return int(record["model_config"]["img_size"][0])

    def has_tensors(self, name: str = "last") -> bool:
        return ckpt.has_tensors(self.path, name)

    def save(self, name: str, tensors: dict[str, torch.Tensor], state: dict[str, Any],
             metadata: dict[str, str] | None = None) -> None:
        """Write checkpoint NAME: its tensors and its record, crash-safely (see `train.checkpoint`)."""
        ckpt.save_checkpoint(self.path, name, tensors, state, metadata)

    def load(self, name: str = "last") -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The newest intact (tensors, record) pair of checkpoint NAME, or None when there is none."""
        return ckpt.load_checkpoint(self.path, name)

    # ---------------------------------------------------------------- metrics.jsonl
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one evaluation's line, synced, so a kill loses at most the line being written."""
        try:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:  # a full disk: stop with one line; the last checkpoint is intact
            raise VitlabError(f"cannot write {self.metrics_path}: {error.strerror or error}") from None

    def truncate_metrics(self, step: int) -> None:
        """Drop records newer than the checkpoint a run resumes from, so a resumed run logs each evaluation once."""
        if not self.metrics_path.exists():
            return
        kept = [line for line, record in self._metric_lines()
                if record is not None and _is_number(record["step"]) and record["step"] <= step]
        atomic_write(self.metrics_path, "".join(line + "\n" for line in kept).encode())

    def metrics(self) -> list[dict[str, Any]]:
        """Every evaluation logged, in order; an empty list when there is no log."""
        if not self.metrics_path.exists():
            return []
        return [record for _, record in self._metric_lines() if record is not None]

    def last_metrics(self) -> dict[str, Any] | None:
        """The latest evaluation logged, or None."""
        records = self.metrics()
        return records[-1] if records else None

    def metrics_at(self, step: int) -> dict[str, Any]:
        """The evaluation logged at `step`; refused when there is none."""
        found = next((record for record in self.metrics() if record.get("step") == step), None)
        if found is None:
            raise VitlabError(f"{self.metrics_path} has no evaluation at the run's last step {step}")
        return found

    def _metric_lines(self) -> list[tuple[str, dict[str, Any] | None]]:
        """Each line with its record; None for a line torn by a kill (the trainer rewrites the file on resume)."""
        lines = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            lines.append((line, record if isinstance(record, dict) and "step" in record else None))
        return lines


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
