"""The resolution study (the ViT paper's §3.2): pre-train at a low resolution and fine-tune at a higher one, against
one resolution throughout, for the same total steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from vitlab.analysis.plots import plot_study_bars
from vitlab.errors import VitlabError
from vitlab.models.registry import build_model, model_config
from vitlab.studies import report
from vitlab.studies.runs import Run, Study, StudyResult, execute, family_recipes, run_config, study_size
from vitlab.train.config import FINETUNE, TrainConfig


def resolution_study(study: Study, families: Sequence[str] = ("vit",), size: int | None = None, low: int = 28,
                     high: int = 42, finetune_fraction: float = 0.2, rrc_scale: float | None = None) -> StudyResult:
    """Pre-train at `low` px and fine-tune at `high` px vs one resolution throughout, for the same total steps.

    With `rrc_scale`, also FixRes's remedy against the change of apparent object size: pre-training with
    random-resized crops (area shares from `rrc_scale` to 1) and without, each then fine-tuned at `high` px against
    continued at `low` px for the same steps with the same fine-tuning recipe (without crops, as the test sees the
    images)."""
    if not 0.0 < finetune_fraction < 1.0:
        raise VitlabError(f"finetune fraction must be in (0, 1), got {finetune_fraction}")
    if rrc_scale is not None and not 0.0 < rrc_scale <= 1.0:
        raise VitlabError(f"rrc scale must be in (0, 1], got {rrc_scale}")
    recipes = family_recipes(families)
    size = study_size(study, size, next(iter(recipes.values())).config.model)
    total = study.budget.steps(size)
    if total < 2:
        raise VitlabError(f"the resolution study needs at least 2 steps per arm, got {total}")
    tune = min(max(1, round(finetune_fraction * total)), total - 1)
    runs, sources = [], {}
    for family, recipe in recipes.items():
        _check_resizable(recipe.config, low, high)
        pretrain, tuned = f"{family}-{low}px-pretrain", _finetune(study, recipe.config, f"{family}-{low}px-pretrain")
        plan = [(f"{family}-{low}px", f"{low} px", recipe.config, low, total, None),
                (f"{family}-{high}px", f"{high} px", recipe.config, high, total, None),
                (pretrain, f"{low} px, pre-training only", recipe.config, low, total - tune, None),
                (f"{family}-{low}to{high}px", f"{low} px then {high} px", tuned, high, tune, pretrain)]
        if rrc_scale is not None:
            crops = dataclasses.replace(recipe.config, augment=dataclasses.replace(
                recipe.config.augment, random_resized_crop=True, scale=(rrc_scale, 1.0)))
            cropped = f"{family}-rrc-{low}px-pretrain"
            cropped_tuned = _finetune(study, recipe.config, cropped)
            plan += [(f"{family}-{low}to{low}px", f"{low} px then {low} px", tuned, low, tune, pretrain),
                     (cropped, f"{low} px with crops, pre-training only", crops, low, total - tune, None),
                     (f"{family}-rrc-{low}to{high}px", f"{low} px with crops then {high} px", cropped_tuned, high,
                      tune, cropped),
                     (f"{family}-rrc-{low}to{low}px", f"{low} px with crops then {low} px", cropped_tuned, low,
                      tune, cropped)]
        for name, arm, base, img_size, steps, source in plan:
            config = run_config(study, "resolution", name, dataclasses.replace(base, img_size=img_size), size, steps)
            runs.append(Run(name, config, {"model": family, "arm": arm, "img_size": img_size, "train_images": size,
                                           "steps": steps}))
            sources[name] = source
    rows = execute(runs, study.train)
    for row in rows:  # a fine-tuned arm's budget includes its pre-training
        source = sources[row["run"]]
        pre = report.find(rows, run=source) if source else {"steps": 0, "time_s": 0.0}
        row["total_steps"] = pre["steps"] + row["steps"]
        pending = pre["time_s"] is None or row["time_s"] is None
        row["total_time_s"] = None if pending else round(pre["time_s"] + row["time_s"], 1)
    runs_table = report.table(rows, ["run", "arm", "img_size", "steps", "total_steps", "test_top1", "best_top1",
                                     "time_s", "total_time_s"])
    crops_text = ("" if rrc_scale is None else
                  f" The arms \"with crops\" pre-train on random-resized crops (area {rrc_scale:g}–1, aspect "
                  f"3/4–4/3) of each image, resized to {low} px; every fine-tuned arm, at {high} px or continued at "
                  f"{low} px for the same steps, sees the whole image as the test does.")
    text = (f"{report.header(study, 'Resolution study', rows)}\n\nThe fine-tuned arms spend {total - tune} steps at "
            f"{low} px and {tune} more ({finetune_fraction:.0%}, SGD momentum 0.9, no weight decay, the pre-trained "
            f"head kept); the other arms spend all {total} steps at one resolution.{crops_text}\n\n{runs_table}\n")
    files = report.write(study, "resolution", rows, text)
    files.append(plot_study_bars([f"{row['model']}\n{row['arm']}" for row in rows], [row["test_top1"] for row in rows],
                                 f"{study.dataset}: resolution ({size} images, {total} steps per arm)",
                                 Path(study.out) / "resolution.png"))
    return StudyResult(rows, text, files)


def _finetune(study: Study, recipe: TrainConfig, source: str) -> TrainConfig:
    """The paper's SGD fine-tuning from run `source`; the same classes, so the pre-trained head is kept. It takes
    the family's own augmentation, so crops end with the pre-training."""
    return dataclasses.replace(FINETUNE.over(recipe), new_head=False,
                               init_from=str(Path(study.out) / "resolution" / source))


def _check_resizable(recipe: TrainConfig, low: int, high: int) -> None:
    """Refuse before training a family whose weights change shape with the resolution (the Mixer's token MLP)."""
    refused = f"{recipe.model} cannot be fine-tuned from {low} px to {high} px"
    try:
        with torch.device("meta"):
            shapes = [{key: value.shape for key, value in build_model(model_config(
                recipe.model, img_size=img_size, **recipe.model_overrides)).state_dict().items()}
                for img_size in (low, high)]
    except VitlabError as error:  # e.g. a size that the patch size does not divide
        raise VitlabError(f"{refused}: {error}") from None
    differ = [key for key in shapes[0] if key != "pos_embed" and shapes[0][key] != shapes[1].get(key)]
    if differ:
        raise VitlabError(f"{refused}: {differ[0]} is {tuple(shapes[0][differ[0]])} at {low} px and "
                          f"{tuple(shapes[1][differ[0]])} at {high} px")
