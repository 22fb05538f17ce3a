"""benchmarks/fmnist_time_to_accuracy.py: every run it offers builds a valid training config and model, and its
summary reads the thresholds off a curve. The runs themselves take minutes to most of an hour, so none trains here."""

from __future__ import annotations

import pytest

import vitlab
from helpers import load_benchmark
from vitlab.train.config import override, recipe_config


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("fmnist_time_to_accuracy")


def test_every_run_builds_its_configs_and_models(bench) -> None:
    for name, stages in bench.VITLAB_RUNS.items():
        for recipe, overrides in stages:
            config = override(recipe_config(recipe), overrides)
            model = vitlab.create_model(config.model, img_size=config.img_size, **config.model_overrides)
            assert model.config.img_size == (config.img_size,) * 2, name


def test_long_runs_change_only_what_they_say(bench) -> None:
    base = recipe_config("fmnist-vit-long")
    low_res = override(base, bench.VITLAB_RUNS["vitlab-long-21px"][0][1])
    dropped = override(base, bench.VITLAB_RUNS["vitlab-long-patch-dropout"][0][1])
    assert (low_res.img_size, low_res.epochs, low_res.crop_padding, low_res.amp) == (21, base.epochs, 2, "bf16")
    assert dropped.model_overrides == {**base.model_overrides, "patch_dropout": 0.5}
    assert (dropped.img_size, dropped.epochs) == (base.img_size, base.epochs)


def test_summary_reads_first_crossings(bench) -> None:
    curve = [(10.0, 0.85), (20.0, 0.905), (30.0, 0.89), (40.0, 0.921)]
    row = bench.summarise("run", curve)
    assert (row["s_to_90"], row["s_to_92"], row["best_top1"], row["final_s"]) == (20.0, 40.0, 0.921, 40.0)
    assert bench.summarise("never", curve[:1])["s_to_90"] is None
