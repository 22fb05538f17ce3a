"""What the studies share: the study settings, one planned run, and running (or reusing, or resuming) the runs.

Every run has its own directory under OUT/STUDY/. A run whose record says it finished is reused, and a half-done
one continues through the Trainer's resume, so an interrupted study picks up where it stopped. With `train=False` a
study trains nothing and reports the runs that have finished, the others as pending.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vitlab.errors import VitlabError
from vitlab.models.registry import build_model, config_from_dict, list_models, model_config
from vitlab.studies.budget import Budget
from vitlab.train.config import FAMILY_RECIPES, Recipe, TrainConfig, config_to_json, override
from vitlab.train.run_dir import RunDir

# TrainConfig fields that say how a run is executed, not what it computes: they may differ when a run is reused.
_RUNNING_FIELDS = frozenset({"out", "progress", "threads", "device"})


@dataclass(frozen=True)
class Study:
    """What the three studies share: data, step budget, where the runs go, and settings applied to every run."""

    dataset: str = "fashion-mnist"
    budget: Budget = Budget()
    out: str = "runs/study"
    seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides for every run, e.g. threads
    progress: bool = True
    train: bool = True  # False: report the finished runs only, train none
    command: str = ""  # the command line that ran the study, recorded beside its results


@dataclass(frozen=True)
class Run:
    name: str
    config: TrainConfig
    row: dict[str, Any]  # what the study's table says about this run besides its results


@dataclass(frozen=True)
class StudyResult:
    rows: list[dict[str, Any]]
    markdown: str
    files: list[Path]


def family_recipes(families: Sequence[str]) -> dict[str, Recipe]:
    """The recipes of the families asked for, in order; unknown or not-yet-registered families are refused."""
    for family in families:
        if family not in FAMILY_RECIPES:
            raise VitlabError(f"unknown model family {family!r}; known: {', '.join(FAMILY_RECIPES)}")
        model = FAMILY_RECIPES[family].config.model
        if model not in list_models():
            raise VitlabError(f"model family {family!r} needs the model {model!r}, which is not in the registry")
    return {family: FAMILY_RECIPES[family] for family in dict.fromkeys(families)}


# ---------------------------------------------------------------- planning

def run_config(study: Study, kind: str, name: str, base: TrainConfig, size: int, steps: int) -> TrainConfig:
    """`base` (a family's recipe, changed by the study plan) as run `name` of study `kind`: the budget's steps on
    `size` images, then the study's own settings."""
    values = {**study.budget.train_fields(steps, size), "dataset": study.dataset, "subset": size, "seed": study.seed,
              "progress": study.progress, "out": str(Path(study.out) / kind / name)}
    return override(override(base, values), study.settings)


def _train_images(study: Study, model: str) -> int:
    from vitlab.data import load_dataset

    return len(load_dataset(study.dataset, "train", img_size=model_config(model).img_size[0]))


def check_sizes(study: Study, sizes: Sequence[int], model: str) -> None:
    """Refuse sizes outside [batch, the training set's size], before anything trains."""
    available = _train_images(study, model)
    for size in sizes:
        if not study.budget.batch_size <= size <= available:
            raise VitlabError(f"size {size}: {study.dataset} has {available} training images and the batch is "
                              f"{study.budget.batch_size}; sizes must lie between the two")


def study_size(study: Study, size: int | None, model: str) -> int:
    """The training-set size asked for, or the whole training set."""
    size = size or _train_images(study, model)
    check_sizes(study, [size], model)
    return size


# ---------------------------------------------------------------- running

def execute(runs: Sequence[Run], train: bool = True) -> list[dict[str, Any]]:
    """Run (or reuse, or resume) each run in turn and return one row per run; with `train=False` an unfinished run
    is left as it is and its row is pending (results None)."""
    from vitlab.train.loop import Trainer

    rows = []
    for index, run in enumerate(runs, 1):
        run_dir = RunDir(Path(run.config.out))
        record = _record(run_dir, run.config)
        reused = record is not None and record.get("step") == record.get("total_steps")
        state = ("finished before, reused" if reused else "pending, not trained" if not train
                 else "training" if not record else "resuming" if run_dir.has_tensors()
                 else "restarting: its record was kept without its weights")
        print(f"[{index}/{len(runs)}] {run.name}: {run.row['steps']} steps of {run.config.batch_size} on "
              f"{run.config.subset} images ({state}) in {run_dir.path}", flush=True)
        if not reused and train:
            Trainer(run.config, resume=True).fit()
            record = _record(run_dir, run.config)
        row = {"run": run.name, **run.row, "model_name": run.config.model,
               "epochs": round(run.row["steps"] / (run.config.subset // run.config.batch_size), 2),
               **(_results(run_dir, record) if reused or train else _pending(run_dir, record)),
               "reused": reused}
        if row["test_top1"] is not None:
            print(f"    test top-1 {row['test_top1']:.2f}% (best {row['best_top1']:.2f}%) in {row['time_s']:.0f} s",
                  flush=True)
        rows.append(row)
    return rows


def _record(run_dir: RunDir, config: TrainConfig) -> dict[str, Any] | None:
    """The run's last.json, after checking that it was made with this config."""
    record = run_dir.record("last")
    if record is None:
        return None
    saved = record.get("train_config")
    if not isinstance(saved, dict):
        raise VitlabError(f"{run_dir.record_path('last')}: not a vitlab training record")
    steps = {key: record.get(key) for key in ("step", "total_steps")}
    wrong = [f"{key} {value!r}" for key, value in steps.items()
             if not isinstance(value, int) or isinstance(value, bool) or value < 0]
    if wrong or steps["step"] > steps["total_steps"]:
        raise VitlabError(f"{run_dir.record_path('last')}: {', '.join(wrong) or 'step beyond total_steps'}: not the "
                          "steps of a run (the record is damaged or was edited)")
    planned, defaults = config_to_json(config), config_to_json(TrainConfig())
    # a field missing from an older record had its default value then
    differ = sorted(key for key in planned
                    if key not in _RUNNING_FIELDS and saved.get(key, defaults[key]) != planned[key])
    if differ:
        raise VitlabError(f"{run_dir.path} holds a run with other settings ({', '.join(differ)}); remove it or "
                          "choose another --out")
    return record


def _pending(run_dir: RunDir, record: dict[str, Any] | None) -> dict[str, Any]:
    """The row of a run that has not finished: no results (nor a parameter count, which depends on the data set's
    channels and classes), the step it has reached."""
    return {"test_top1": None, "best_top1": None, "time_s": None, "parameters": None, "out": str(run_dir.path),
            "reached_step": record.get("step", 0) if record else 0}


def _results(run_dir: RunDir, record: dict[str, Any]) -> dict[str, Any]:
    """Final and best test top-1 (%), time and parameter count of a finished run; a record or metrics line whose
    values are missing, of the wrong type or not finite is refused by name."""
    final = run_dir.metrics_at(record["step"])
    source = run_dir.record_path("last")
    for path, key, value in ((source, "best_top1", record.get("best_top1")),
                             (run_dir.metrics_path, "test_top1", final.get("test_top1")),
                             (run_dir.metrics_path, "elapsed_s", final.get("elapsed_s"))):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise VitlabError(f"{path}: {key} {value!r} is not a finite number (the record is damaged or was edited)")
    if not isinstance(record.get("model_config"), dict):
        raise VitlabError(f"{source}: model_config {record.get('model_config')!r:.80} is not a model config")
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(config_from_dict(record["model_config"], str(source)))
    return {"test_top1": round(100 * final["test_top1"], 2), "best_top1": round(100 * record["best_top1"], 2),
            "time_s": round(final["elapsed_s"], 1), "parameters": sum(p.numel() for p in model.parameters()),
            "out": str(run_dir.path)}
