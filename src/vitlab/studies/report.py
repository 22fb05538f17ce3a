"""A study's results as people and programs read them: a Markdown table and a JSON record (the plots are drawn by
`vitlab.analysis.plots`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vitlab.atomic import atomic_write
from vitlab.studies.runs import Study
from vitlab.train.config import FAMILY_RECIPES, STUDY_BASE, Recipe, config_to_json

_LABELS = {"model_name": "registry name", "train_images": "train images", "test_top1": "test top-1 %",
           "best_top1": "best top-1 %", "time_s": "time (s)", "img_size": "px", "total_steps": "total steps",
           "total_time_s": "total time (s)"}


def find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The first row whose fields equal `match`."""
    return next(row for row in rows if all(row.get(key) == value for key, value in match.items()))


def header(study: Study, title: str, rows: Sequence[dict[str, Any]]) -> str:
    """The title, the budget rule, the runs still pending and the command that ran the study."""
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


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of `columns`; a pending (None) cell is shown as —."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return f"{value:,}" if isinstance(value, int) else str(value if value is not None else "—")

    lines = ["| " + " | ".join(_LABELS.get(column, column) for column in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def recipe_fields(recipe: Recipe) -> dict[str, Any]:
    """What a family's recipe sets: its model and optimiser, and anything else it sets beyond what every study run
    shares."""
    own, shared = config_to_json(recipe.config), config_to_json(STUDY_BASE)
    return {key: value for key, value in own.items()
            if key in ("model", "optimizer", "lr", "weight_decay") or (key != "out" and value != shared[key])}


def write(study: Study, name: str, rows: list[dict[str, Any]], text: str) -> list[Path]:
    """OUT/NAME.md and OUT/NAME.json; the JSON holds the budget, the command, each family's recipe and the rows."""
    out = Path(study.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.md", out / f"{name}.json"]
    atomic_write(files[0], text)
    record = {"study": name, "dataset": study.dataset, "budget_rule": study.budget.rule(),
              "budget": dataclasses.asdict(study.budget), "command": study.command,
              "recipes": {row["model"]: recipe_fields(FAMILY_RECIPES[row["model"]]) for row in rows}, "rows": rows}
    atomic_write(files[1], json.dumps(record, indent=1) + "\n")
    return files
