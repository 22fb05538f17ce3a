"""The inductive-bias studies: many Trainer runs under one step budget, summed up as a table, a JSON and a plot.

- data size (the ViT paper's Figs. 3-4): each model family on balanced subsets of growing size;
- position embeddings (Table 8): none vs learned 1D vs 2D sin-cos in the same ViT;
- resolution (§3.2): pre-train at low resolution and fine-tune at a higher one vs one resolution throughout.

Every run has its own directory under OUT/STUDY/. A run whose checkpoint says it finished is reused, and a half-done
one continues through the Trainer's resume, so an interrupted study picks up where it stopped. With `train=False` a
study trains nothing and reports the runs that have finished, the others as pending: a study that takes longer than
one sitting can be summed up, and its run records (not their weights) kept in version control, as it goes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vitlab.atomic import atomic_path, atomic_write
from vitlab.errors import VitlabError
from vitlab.models.registry import build_model, config_from_dict, list_models, model_config
from vitlab.train.checkpoint import has_tensors
from vitlab.train.config import FINETUNE_DEFAULTS, TrainConfig, config_to_json, override

# Family → TrainConfig overrides: its 28×28 grayscale model and the optimiser its own literature trains it with.
FAMILY_RECIPES: dict[str, dict[str, Any]] = {
    # the fmnist-vit recipe's ViT at width 128, about the size of the other families (AdamW, as the paper pre-trains)
    "vit": {"model": "vit-mini-p7-28", "model_overrides": {"pool": "gap", "posemb": "sincos2d"},
            "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05},
    # AdamW, not BiT's upstream SGD (lr 0.03 per 256 images, made for 90 ImageNet epochs): in 112 steps on 1k images
    # SGD reached 50.9% (train loss 1.64) and AdamW at lr 1e-3 68.5%, so the study would measure the optimiser
    "resnet": {"model": "resnet-bit-mini-28", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    # Mixer and Perceiver papers: Adam-type optimisers with weight decay
    "mixer": {"model": "mixer-mini-p4-28", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    "perceiver": {"model": "perceiver-mini-28", "optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.05},
}
POSEMBS = ("none", "learned", "sincos2d")
FULL_SIZES = (1000, 5000, 20000, 60000)
QUICK_SIZES = (200, 400)
QUICK_SIZE = 400
# TrainConfig fields that say how a run is executed, not what it computes: they may differ when a run is reused.
_RUNNING_FIELDS = frozenset({"out", "progress", "threads", "device"})
# Settings every study run shares, whatever the family.
_COMMON: dict[str, Any] = {"hflip": True, "grad_clip": 1.0, "schedule": "cosine", "checkpoint_every_steps": 250}


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


def family_recipes(families: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The recipes of the families asked for, in order; unknown or not-yet-registered families are refused."""
    for family in families:
        if family not in FAMILY_RECIPES:
            raise VitlabError(f"unknown model family {family!r}; known: {', '.join(FAMILY_RECIPES)}")
        model = FAMILY_RECIPES[family]["model"]
        if model not in list_models():
            raise VitlabError(f"model family {family!r} needs the model {model!r}, which is not in the registry")
    return {family: FAMILY_RECIPES[family] for family in dict.fromkeys(families)}


def data_size_study(study: Study, sizes: Sequence[int], families: Sequence[str]) -> StudyResult:
    """Each family on each balanced subset; test top-1 against training-set size (the paper's Figs. 3-4)."""
    recipes = family_recipes(families)
    sizes = sorted(set(sizes))
    _check_sizes(study, sizes, recipes)
    runs = []
    for size in sizes:  # all families at a size before the next size: an interrupted study still compares
        steps = study.budget.steps(size)
        for family, recipe in recipes.items():
            name = f"{family}-{size}"
            runs.append(Run(name, _config(study, "data-size", name, recipe, size, steps),
                            {"model": family, "train_images": size, "steps": steps}))
    rows = _execute(runs, study.train)
    table = _table(rows, ["run", "model", "model_name", "parameters", "train_images", "steps", "epochs",
                          "test_top1", "best_top1", "time_s"])
    pivot = _table([{"model": family, **{str(size): _find(rows, model=family, train_images=size)["test_top1"]
                                         for size in sizes}} for family in recipes], ["model", *map(str, sizes)])
    text = (f"{_header(study, 'Data-size study', rows)}\n\nTest top-1 (%) by training-set size:\n\n{pivot}\n\n"
            f"All runs:\n\n{table}\n")
    figure = Figure(figsize=(6, 4.2))
    axes = figure.add_subplot()
    for family in recipes:  # pending runs leave a point out
        points = [(size, _find(rows, model=family, train_images=size)["test_top1"]) for size in sizes]
        finished = [(size, top1) for size, top1 in points if top1 is not None]
        axes.plot([size for size, _ in finished], [top1 for _, top1 in finished], marker="o",
                  label=f"{family} ({recipes[family]['model']})")
    axes.set_xscale("log")
    axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axes.minorticks_off()
    axes.set_xlabel("training images")
    axes.set_ylabel("test top-1 (%)")
    axes.set_title(f"{study.dataset}: accuracy against training-set size")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return _write(study, "data-size", rows, text, figure)


def posemb_study(study: Study, size: int | None = None) -> StudyResult:
    """The ViT with no position embedding, a learned 1D one and a fixed 2D sin-cos one (the paper's Table 8)."""
    recipe = family_recipes(["vit"])["vit"]
    size = _size(study, size, recipe)
    steps = study.budget.steps(size)
    runs = [Run(f"vit-{posemb}", _config(study, "posemb", f"vit-{posemb}",
                                         {**recipe, "model_overrides": {**recipe["model_overrides"],
                                                                        "posemb": posemb}}, size, steps),
                {"model": "vit", "posemb": posemb, "train_images": size, "steps": steps}) for posemb in POSEMBS]
    rows = _execute(runs, study.train)
    table = _table(rows, ["run", "posemb", "parameters", "train_images", "steps", "epochs", "test_top1",
                          "best_top1", "time_s"])
    text = f"{_header(study, 'Position-embedding study', rows)}\n\n{table}\n"
    return _write(study, "posemb", rows, text, _bars([row["posemb"] for row in rows], rows,
                                                     f"{study.dataset}: position embeddings ({size} images)"))


def resolution_study(study: Study, families: Sequence[str] = ("vit",), size: int | None = None, low: int = 28,
                     high: int = 42, finetune_fraction: float = 0.2) -> StudyResult:
    """Pre-train at `low` px and fine-tune at `high` px vs one resolution throughout, for the same total steps."""
    if not 0.0 < finetune_fraction < 1.0:
        raise VitlabError(f"finetune fraction must be in (0, 1), got {finetune_fraction}")
    recipes = family_recipes(families)
    size = _size(study, size, next(iter(recipes.values())))
    total = study.budget.steps(size)
    if total < 2:
        raise VitlabError(f"the resolution study needs at least 2 steps per arm, got {total}")
    tune = min(max(1, round(finetune_fraction * total)), total - 1)
    finetune = {**FINETUNE_DEFAULTS, "new_head": False}  # the paper's SGD fine-tuning; same classes, so same head
    runs = []
    for family, recipe in recipes.items():
        _check_resizable(recipe, low, high)
        pretrain = f"{family}-{low}px-pretrain"
        plan = [(f"{family}-{low}px", f"{low} px", recipe, low, total),
                (f"{family}-{high}px", f"{high} px", recipe, high, total),
                (pretrain, f"{low} px, pre-training only", recipe, low, total - tune),
                (f"{family}-{low}to{high}px", f"{low} px then {high} px",
                 {**recipe, **finetune, "init_from": str(Path(study.out) / "resolution" / pretrain)}, high, tune)]
        for name, arm, fields, img_size, steps in plan:
            runs.append(Run(name, _config(study, "resolution", name, {**fields, "img_size": img_size}, size, steps),
                            {"model": family, "arm": arm, "img_size": img_size, "train_images": size,
                             "steps": steps}))
    rows = _execute(runs, study.train)
    for row in rows:  # the fine-tuned arm's budget includes its pre-training
        pre = (_find(rows, model=row["model"], arm=f"{low} px, pre-training only")
               if row["arm"] == f"{low} px then {high} px" else {"steps": 0, "time_s": 0.0})
        row["total_steps"] = pre["steps"] + row["steps"]
        pending = pre["time_s"] is None or row["time_s"] is None
        row["total_time_s"] = None if pending else round(pre["time_s"] + row["time_s"], 1)
    table = _table(rows, ["run", "arm", "img_size", "steps", "total_steps", "test_top1", "best_top1", "time_s",
                          "total_time_s"])
    text = (f"{_header(study, 'Resolution study', rows)}\n\nThe fine-tuned arm spends {total - tune} steps at "
            f"{low} px and {tune} at {high} px ({finetune_fraction:.0%}, SGD momentum 0.9, no weight decay, the "
            f"pre-trained head kept); the other arms spend all {total} steps at one resolution.\n\n{table}\n")
    figure = _bars([f"{row['model']}\n{row['arm']}" for row in rows], rows,
                   f"{study.dataset}: resolution ({size} images, {total} steps per arm)")
    return _write(study, "resolution", rows, text, figure)


# ---------------------------------------------------------------- planning

def _config(study: Study, kind: str, name: str, fields: dict[str, Any], size: int, steps: int) -> TrainConfig:
    values = {**_COMMON, **fields, **study.budget.train_fields(steps, size), "dataset": study.dataset,
              "subset": size, "seed": study.seed, "progress": study.progress,
              "out": str(Path(study.out) / kind / name)}
    return override(override(TrainConfig(), values), study.settings)


def _train_images(study: Study, recipe: dict[str, Any]) -> int:
    from vitlab.data import load_dataset

    return len(load_dataset(study.dataset, "train", img_size=model_config(recipe["model"]).img_size[0]))


def _check_sizes(study: Study, sizes: Sequence[int], recipes: dict[str, dict[str, Any]]) -> None:
    available = _train_images(study, next(iter(recipes.values())))
    for size in sizes:
        if not study.budget.batch_size <= size <= available:
            raise VitlabError(f"size {size}: {study.dataset} has {available} training images and the batch is "
                              f"{study.budget.batch_size}; sizes must lie between the two")


def _size(study: Study, size: int | None, recipe: dict[str, Any]) -> int:
    """The training-set size asked for, or the whole training set."""
    size = size or _train_images(study, recipe)
    _check_sizes(study, [size], {"": recipe})
    return size


def _check_resizable(recipe: dict[str, Any], low: int, high: int) -> None:
    """Refuse before training a family whose weights change shape with the resolution (the Mixer's token MLP)."""
    refused = f"{recipe['model']} cannot be fine-tuned from {low} px to {high} px"
    try:
        with torch.device("meta"):
            shapes = [{key: value.shape for key, value in build_model(model_config(
                recipe["model"], img_size=img_size, **recipe.get("model_overrides", {}))).state_dict().items()}
                for img_size in (low, high)]
    except VitlabError as error:  # e.g. a size that the patch size does not divide
        raise VitlabError(f"{refused}: {error}") from None
    differ = [key for key in shapes[0] if key != "pos_embed" and shapes[0][key] != shapes[1].get(key)]
    if differ:
        raise VitlabError(f"{refused}: {differ[0]} is {tuple(shapes[0][differ[0]])} at {low} px and "
                          f"{tuple(shapes[1][differ[0]])} at {high} px")


# ---------------------------------------------------------------- running

def _execute(runs: Sequence[Run], train: bool = True) -> list[dict[str, Any]]:
    """Run (or reuse, or resume) each run in turn and return one row per run; with `train=False` an unfinished run
    is left as it is and its row is pending (results None)."""
    from vitlab.train.loop import Trainer

    rows = []
    for index, run in enumerate(runs, 1):
        out = Path(run.config.out)
        record = _record(out, run.config)
        reused = record is not None and record.get("step") == record.get("total_steps")
        state = ("finished before, reused" if reused else "pending, not trained" if not train
                 else "training" if not record else "resuming" if has_tensors(out)
                 else "restarting: its record was kept without its weights")
        print(f"[{index}/{len(runs)}] {run.name}: {run.row['steps']} steps of {run.config.batch_size} on "
              f"{run.config.subset} images ({state}) in {out}", flush=True)
        if not reused and train:
            Trainer(run.config, resume=True).fit()
            record = _record(out, run.config)
        row = {"run": run.name, **run.row, "model_name": run.config.model,
               "epochs": round(run.row["steps"] / (run.config.subset // run.config.batch_size), 2),
               **(_results(out, record) if reused or train else _pending(out, record)),
               "reused": reused}
        if row["test_top1"] is not None:
            print(f"    test top-1 {row['test_top1']:.2f}% (best {row['best_top1']:.2f}%) in {row['time_s']:.0f} s",
                  flush=True)
        rows.append(row)
    return rows


def _record(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    """The run's last.json, after checking that it was made with this config."""
    path = out / "last.json"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VitlabError(f"{path}: unreadable run record: {error}") from None
    saved = record.get("train_config") if isinstance(record, dict) else None
    if not isinstance(saved, dict):
        raise VitlabError(f"{path}: not a vitlab training record")
    planned = config_to_json(config)
    differ = sorted(key for key in planned if key not in _RUNNING_FIELDS and saved.get(key) != planned[key])
    if differ:
        raise VitlabError(f"{out} holds a run with other settings ({', '.join(differ)}); remove it or choose another "
                          "--out")
    return record


def _pending(out: Path, record: dict[str, Any] | None) -> dict[str, Any]:
    """The row of a run that has not finished: no results (nor a parameter count, which depends on the data set's
    channels and classes), the step it has reached."""
    return {"test_top1": None, "best_top1": None, "time_s": None, "parameters": None, "out": str(out),
            "reached_step": record.get("step", 0) if record else 0}


def _results(out: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Final and best test top-1 (%), time and parameter count of a finished run."""
    metrics = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill; the Trainer rewrites the file on resume
    final = next((item for item in metrics if item.get("step") == record["step"]), None)
    if final is None:
        raise VitlabError(f"{out}/metrics.jsonl has no evaluation at the run's last step {record['step']}")
    with torch.device("meta"):  # count parameters without allocating them
        model = build_model(config_from_dict(record["model_config"], str(out / "last.json")))
    return {"test_top1": round(100 * final["test_top1"], 2), "best_top1": round(100 * record["best_top1"], 2),
            "time_s": round(final["elapsed_s"], 1), "parameters": sum(p.numel() for p in model.parameters()),
            "out": str(out)}


# ---------------------------------------------------------------- reporting

def _find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any]:
    return next(row for row in rows if all(row.get(key) == value for key, value in match.items()))


def _header(study: Study, title: str, rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"## {title} on {study.dataset}", "",
             f"Budget: {study.budget.rule()}. Test top-1 is the final model's on the whole test split; \"best\" is "
             "the best of the run's evaluations (the paper's early stopping, here chosen on the test set, so "
             "optimistic)."]
    pending = [f"{row['run']} (step {row['reached_step']:,} of {row['steps']:,})" for row in rows
               if row["test_top1"] is None]
    if pending:
        lines += ["", f"Not finished yet ({len(pending)} of {len(rows)} runs, shown as —): {', '.join(pending)}."]
    if study.command:
        lines += ["", f"Command: `{study.command}`"]
    return "\n".join(lines)


_LABELS = {"model_name": "registry name", "train_images": "train images", "test_top1": "test top-1 %",
           "best_top1": "best top-1 %", "time_s": "time (s)", "img_size": "px", "total_steps": "total steps",
           "total_time_s": "total time (s)"}


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return f"{value:,}" if isinstance(value, int) else str(value if value is not None else "—")

    lines = ["| " + " | ".join(_LABELS.get(column, column) for column in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def _bars(labels: Sequence[str], rows: Sequence[dict[str, Any]], title: str) -> Figure:
    figure = Figure(figsize=(max(4.0, 1.6 * len(rows)), 4.2))
    axes = figure.add_subplot()
    values = [row["test_top1"] for row in rows]
    finished = [value for value in values if value is not None] or [0.0]
    bars = axes.bar(range(len(rows)), [value or 0.0 for value in values], color="tab:blue")  # pending: no bar
    axes.bar_label(bars, labels=["pending" if value is None else f"{value:.1f}" for value in values])
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylabel("test top-1 (%)")
    axes.set_ylim(max(0.0, min(finished) - 10), min(100.0, max(finished) + 5))
    axes.set_title(title)
    return figure


def _write(study: Study, name: str, rows: list[dict[str, Any]], text: str, figure: Figure) -> StudyResult:
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.md", out / f"{name}.json", out / f"{name}.png"]
    atomic_write(files[0], text)
    record = {"study": name, "dataset": study.dataset, "budget_rule": study.budget.rule(),
              "budget": dataclasses.asdict(study.budget), "command": study.command,
              "recipes": {row["model"]: FAMILY_RECIPES[row["model"]] for row in rows}, "rows": rows}
    atomic_write(files[1], json.dumps(record, indent=1) + "\n")
    figure.tight_layout()
    FigureCanvasAgg(figure)
    with atomic_path(files[2]) as temporary:
        figure.savefig(temporary, dpi=110)
    return StudyResult(rows, text, files)
