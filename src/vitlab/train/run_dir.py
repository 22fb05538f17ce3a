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

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitlab.atomic import atomic_write, open_regular
from vitlab.errors import VitlabError
from vitlab.models.checks import check_parameter_count, check_sane_sizes
from vitlab.models.registry import build_model, model_config
from vitlab.train import checkpoint as ckpt
from vitlab.train.config import TrainConfig, config_from_json


def read_record(path: Path) -> dict[str, Any] | None:
    """A checkpoint record (`NAME.json`) as a dict, or None when there is none; unreadable ones, and anything but a
    regular file in its place (a FIFO would hang the read), are refused."""
    if not path.exists():
        return None
    try:
        with open_regular(path) as handle:  # a FIFO is refused, not waited on
            data = json.loads(handle.read())
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
    config = config_from_json(data["train_config"], str(path))
    check_record_sizes(config, path)
    return config


def check_buildable(config: Any, source: str) -> None:
    """Refuse a model config (from a record or the command line, built without weights to check it against) whose
    sizes no real model has, or whose parameters, counted on the meta device, are beyond any real model's."""
    check_sane_sizes(config, source)
    with torch.device("meta"):
        check_parameter_count(build_model(config), source)


def check_record_sizes(config: TrainConfig, path: Path) -> None:
    """Refuse a recorded training config whose model or augmentation asks for absurd sizes (a hostile
    `model_overrides` or `crop_padding`), before anything is built from it."""
    try:
        model = model_config(config.model, **config.model_overrides)
    except VitlabError as error:
        raise VitlabError(f"{path}: {error}") from None
    check_buildable(model, f"{path}: model_overrides")
    side = config.img_size or max(model.img_size)
    if config.crop_padding > side:
        raise VitlabError(f"{path}: crop_padding {config.crop_padding} is larger than the image side {side}")


def checked_dataset(name: str, record: Path) -> str:
    """The data set a run's record names, when it is a built-in one or an image folder with the class layout
    (class sub-folders holding images, directly or under `train/`, `val/` or `test/`): a record that names
    anything else (a system directory, say) is refused by name rather than walked. Only a few entries of each
    folder are looked at."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from vitlab.data import BUILTIN

    if name in BUILTIN:
        return name

    def entries(directory: Path, limit: int = 256) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as scan:
                return [entry for _, entry in zip(range(limit), scan, strict=False)]
        except OSError:
            return []

    def has_classes(root: Path) -> bool:
        classes = [entry for entry in entries(root) if entry.is_dir()]
        return len(classes) >= 2 and any(entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)
                                         for entry in entries(Path(classes[0].path)))

    path = Path(name)
    if path.is_dir() and any(has_classes(root) for root in (path, path / "train", path / "val", path / "test")):
        return name
    raise VitlabError(f"{record}: dataset {name!r} is neither a built-in data set ({', '.join(BUILTIN)}) nor an "
                      "image folder with one sub-folder of images per class; pass --dataset")


def checkpoint_train_config(path: Path) -> TrainConfig | None:
    """The TrainConfig a vitlab run was made with, if `path` is one of its run directories or files."""
    return record_train_config(path / "last.json" if path.is_dir() else path.with_suffix(".json"))


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

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def record_path(self, name: str = "last") -> Path:
        return self.path / f"{name}.json"

    # ---------------------------------------------------------------- one writer, regular files only
    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the run directory for one writer (an OS lock on `.lock`, released when the block ends, or when the
        process dies); a second writer is refused by name."""
        try:
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 0o666)
        except OSError as error:
            raise VitlabError(f"cannot lock {self.lock_path}: {error.strerror or error}") from None
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VitlabError(f"{self.path} is in use by another vitlab run (it holds {self.lock_path}); wait "
                                  "for it to end, or choose another --out") from None
            yield
        finally:
            os.close(descriptor)

    def check_regular(self) -> None:
        """Refuse a record path that is a link (which a write could follow out of the run) or not a regular file
        (a FIFO would hang a read), before anything is read or written."""
        names = ["metrics.jsonl", "curves.png", *(f"{name}{prev}.{suffix}" for name in ("last", "best")
                                                  for prev in ("", ".prev") for suffix in ("json", "safetensors"))]
        for path in (self.path / name for name in names):
            if path.is_symlink():
                raise VitlabError(f"{path} is a symbolic link; a run's records must be regular files inside it: "
                                  "remove the link")
            if path.exists() and not path.is_file():
                raise VitlabError(f"{path} is not a regular file; remove it")

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
            with open(self.metrics_path, "a", opener=_no_follow) as handle:
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
        """Each line with its record; None for a line torn by a kill, or one that is not UTF-8 or nests too deep (the
        trainer rewrites the file without them on resume)."""
        lines = []
        for raw in self.metrics_path.read_bytes().splitlines():
            try:
                line = raw.decode()
                record = json.loads(line)
            except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
                line, record = "", None
            lines.append((line, record if isinstance(record, dict) and "step" in record else None))
        return lines


def _no_follow(path: str, flags: int) -> int:
    """`open`'s opener that refuses a link in the file's place: an append never writes outside the run."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
