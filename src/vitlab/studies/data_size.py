"""The data-size study (the ViT paper's Figs. 3-4): each model family on balanced subsets of growing size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vitlab.analysis.plots import plot_study_lines
from vitlab.studies import report
from vitlab.studies.runs import Run, Study, StudyResult, check_sizes, execute, family_recipes, run_config

FULL_SIZES = (1000, 5000, 20000, 60000)
QUICK_SIZES = (200, 400)


def data_size_study(study: Study, sizes: Sequence[int], families: Sequence[str]) -> StudyResult:
    """Each family on each balanced subset; test top-1 against training-set size."""
    recipes = family_recipes(families)
    sizes = sorted(set(sizes))
    check_sizes(study, sizes, next(iter(recipes.values())).config.model)
    runs = []
    for size in sizes:  # all families at a size before the next size: an interrupted study still compares
        steps = study.budget.steps(size)
        for family, recipe in recipes.items():
            name = f"{family}-{size}"
            runs.append(Run(name, run_config(study, "data-size", name, recipe.config, size, steps),
                            {"model": family, "train_images": size, "steps": steps}))
    rows = execute(runs, study.train)
    runs_table = report.table(rows, ["run", "model", "model_name", "parameters", "train_images", "steps", "epochs",
                                     "test_top1", "best_top1", "time_s"])
    top1 = {family: [(size, report.find(rows, model=family, train_images=size)["test_top1"]) for size in sizes]
            for family in recipes}
    pivot = report.table([{"model": family, **{str(size): value for size, value in points}}
                          for family, points in top1.items()], ["model", *map(str, sizes)])
    text = (f"{report.header(study, 'Data-size study', rows)}\n\nTest top-1 (%) by training-set size:\n\n{pivot}\n\n"
            f"All runs:\n\n{runs_table}\n")
    files = report.write(study, "data-size", rows, text)
    files.append(plot_study_lines({f"{family} ({recipes[family].config.model})": points
                                   for family, points in top1.items()}, sizes,
                                  f"{study.dataset}: accuracy against training-set size",
                                  Path(study.out) / "data-size.png"))
    return StudyResult(rows, text, files)
