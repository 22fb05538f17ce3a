"""The position-embedding study (the ViT paper's Table 8): none vs learned 1D vs fixed 2D sin-cos in the same ViT."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vitlab.analysis.plots import plot_study_bars
from vitlab.studies import report
from vitlab.studies.runs import Run, Study, StudyResult, execute, family_recipes, run_config, study_size

POSEMBS = ("none", "learned", "sincos2d")


def posemb_study(study: Study, size: int | None = None) -> StudyResult:
    """The ViT with no position embedding, a learned 1D one and a fixed 2D sin-cos one."""
    recipe = family_recipes(["vit"])["vit"].config
    size = study_size(study, size, recipe.model)
    steps = study.budget.steps(size)
    runs = []
    for posemb in POSEMBS:
        config = dataclasses.replace(recipe, model_overrides={**recipe.model_overrides, "posemb": posemb})
        runs.append(Run(f"vit-{posemb}", run_config(study, "posemb", f"vit-{posemb}", config, size, steps),
                        {"model": "vit", "posemb": posemb, "train_images": size, "steps": steps}))
    rows = execute(runs, study.train)
    runs_table = report.table(rows, ["run", "posemb", "parameters", "train_images", "steps", "epochs", "test_top1",
                                     "best_top1", "time_s"])
    text = f"{report.header(study, 'Position-embedding study', rows)}\n\n{runs_table}\n"
    files = report.write(study, "posemb", rows, text)
    files.append(plot_study_bars([row["posemb"] for row in rows], [row["test_top1"] for row in rows],
                                 f"{study.dataset}: position embeddings ({size} images)",
                                 Path(study.out) / "posemb.png"))
    return StudyResult(rows, text, files)
