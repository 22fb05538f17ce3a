"""`vitlab study`: quick studies write their table, JSON and plot; finished runs are reused; bad families exit 2."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from helpers import one_error_line
from vitlab import studies as study
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.train.config import TrainConfig

# --quick on the bundled digits (360 test images), with even fewer steps than --quick takes, to stay fast
QUICK = ["--quick", "--dataset", "digits", "--batch-size", "32", "--min-steps", "8", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def rows_of(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())["rows"]


@pytest.fixture(scope="module")
def data_size(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "data-size", *QUICK, "--models", "vit", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_data_size_writes_table_json_and_plot(data_size: Path) -> None:
    rows = rows_of(data_size, "data-size")
    assert [(row["model"], row["train_images"]) for row in rows] == [("vit", 200), ("vit", 400)]
    assert [row["steps"] for row in rows] == [8, 12]  # max(1 epoch, 8 steps) of batch 32
    assert all(0.0 <= row["test_top1"] <= 100.0 and 0.0 <= row["best_top1"] <= 100.0 for row in rows)
    assert not any(row["reused"] for row in rows)
    table = (data_size / "data-size.md").read_text()
    assert "max(1 epochs, 8 steps) of batch 32" in table and "| vit-200 | vit | vit-mini-p7-28 |" in table
    assert (data_size / "data-size.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_rerun_reuses_finished_runs_and_refuses_changed_ones(data_size: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    weights = data_size / "data-size" / "vit-400" / "last.safetensors"
    written = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["study", "data-size", *QUICK, "--models", "vit", "--out", str(data_size)]) == 0
    assert weights.stat().st_mtime_ns == written
    assert all(row["reused"] for row in rows_of(data_size, "data-size"))
    assert capsys.readouterr().out.count("finished before, reused") == 2
    assert main(["study", "data-size", *QUICK, "--min-steps", "9", "--models", "vit", "--out", str(data_size)]) == 2
    one_error_line(capsys, "vit-200 holds a run with other settings", "epochs")


@pytest.mark.slow
def test_finished_runs_are_reused_from_their_records_alone(data_size: Path, tmp_path: Path) -> None:
    """What a clone of a repository that keeps the records (not the weights) of a study's runs holds."""
    copy = tmp_path / "records"
    shutil.copytree(data_size, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    assert main(["study", "data-size", *QUICK, "--models", "vit", "--out", str(copy)]) == 0
    assert all(row["reused"] for row in rows_of(copy, "data-size"))
    assert [row["test_top1"] for row in rows_of(copy, "data-size")] == [
        row["test_top1"] for row in rows_of(data_size, "data-size")]
    assert not list(copy.rglob("*.safetensors"))  # nothing was trained again


@pytest.mark.slow
def test_no_train_reports_finished_runs_and_leaves_the_rest_pending(data_size: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["study", "data-size", *QUICK, "--models", "vit", "mixer", "--no-train", "--out",
                 str(data_size)]) == 0
    assert capsys.readouterr().out.count("pending, not trained") == 2
    assert not (data_size / "data-size" / "mixer-200").exists()
    rows = {row["run"]: row for row in rows_of(data_size, "data-size")}
    assert rows["vit-400"]["reused"] and rows["vit-400"]["test_top1"] is not None
    assert rows["mixer-400"]["test_top1"] is None and rows["mixer-400"]["reached_step"] == 0
    table = (data_size / "data-size.md").read_text()
    assert "Not finished yet (2 of 4 runs, shown as —): mixer-200 (step 0 of 8), mixer-400 (step 0 of 12)" in table
    assert "| mixer | — | — |" in table
    assert (data_size / "data-size.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_posemb_and_resolution(tmp_path: Path, one_thread: None) -> None:
    assert main(["study", "posemb", *QUICK, "--out", str(tmp_path)]) == 0
    assert [row["posemb"] for row in rows_of(tmp_path, "posemb")] == ["none", "learned", "sincos2d"]
    assert (tmp_path / "posemb.png").read_bytes().startswith(PNG)
    assert main(["study", "resolution", *QUICK, "--out", str(tmp_path)]) == 0
    rows = {row["run"]: row for row in rows_of(tmp_path, "resolution")}
    assert set(rows) == {"vit-28px", "vit-42px", "vit-28px-pretrain", "vit-28to42px"}
    assert rows["vit-28to42px"]["total_steps"] == rows["vit-28px"]["steps"] == rows["vit-42px"]["steps"] == 12
    assert all(0.0 <= row["test_top1"] <= 100.0 for row in rows.values())
    tuned = json.loads((tmp_path / "resolution" / "vit-28to42px" / "last.json").read_text())
    assert tuned["model_config"]["img_size"] == [42, 42]
    assert tuned["train_config"]["init_from"] == str(tmp_path / "resolution" / "vit-28px-pretrain")
    assert "| vit-28to42px |" in (tmp_path / "resolution.md").read_text()
    pending = tmp_path / "pending"  # nothing trained yet: every arm pending, the bars still drawn
    assert main(["study", "resolution", *QUICK, "--no-train", "--out", str(pending)]) == 0
    assert all(row["test_top1"] is None and row["total_time_s"] is None for row in rows_of(pending, "resolution"))
    assert (pending / "resolution.png").read_bytes().startswith(PNG)


def test_resolution_with_crops_plans_both_pretrainings_each_tuned_and_continued(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["study", "resolution", *QUICK, "--low", "21", "--high", "28", "--no-train", "--out", str(tmp_path)]
    assert main([*argv, "--rrc-scale", "0.35"]) == 0
    rows = rows_of(tmp_path, "resolution")
    assert [(row["run"], row["img_size"], row["steps"], row["total_steps"]) for row in rows] == [
        ("vit-21px", 21, 12, 12), ("vit-28px", 28, 12, 12), ("vit-21px-pretrain", 21, 10, 10),
        ("vit-21to28px", 28, 2, 12), ("vit-21to21px", 21, 2, 12), ("vit-rrc-21px-pretrain", 21, 10, 10),
        ("vit-rrc-21to28px", 28, 2, 12), ("vit-rrc-21to21px", 21, 2, 12)]
    assert "random-resized crops (area 0.35–1" in (tmp_path / "resolution.md").read_text()
    assert main([*argv, "--rrc-scale", "0"]) == 2
    one_error_line(capsys, "rrc scale must be in (0, 1], got 0.0")


def test_unknown_or_unregistered_family_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["study", "data-size", *QUICK, "--models", "vit", "cnn", "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "unknown model family 'cnn'", "vit, resnet, mixer, perceiver")
    convnext = dataclasses.replace(study.FAMILY_RECIPES["vit"], config=TrainConfig(model="convnext-mini-28"))
    monkeypatch.setitem(study.FAMILY_RECIPES, "convnext", convnext)
    assert main(["study", "data-size", *QUICK, "--models", "convnext", "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "'convnext'", "'convnext-mini-28'", "not in the registry")
    assert not list(tmp_path.iterdir())


def test_budget_gives_every_size_exact_steps() -> None:
    budget = study.Budget()
    assert [budget.steps(size) for size in study.FULL_SIZES] == [500, 500, 1248, 3744]
    for size in (200, 1000, 5000, 20000, 60000):
        fields = budget.train_fields(budget.steps(size), size)
        assert math.ceil(fields["epochs"] * (size // budget.batch_size)) == budget.steps(size)
    with pytest.raises(VitlabError, match="smaller than the batch"):
        budget.steps(100)


@pytest.mark.parametrize("evals,min_steps", [(1, 500), (2, 125), (4, 500), (3, 7)])
def test_budget_gives_exactly_the_evaluations_asked_for(evals: int, min_steps: int) -> None:
    budget = study.Budget(evals=evals, min_steps=min_steps, epochs=2.0)
    for size in (200, 1000, 5000, 20000, 60000):
        steps, per_epoch = budget.steps(size), budget.steps_per_epoch(size)
        every = max(1, round(budget.train_fields(steps, size)["eval_every_epochs"] * per_epoch))  # as the Trainer
        at = {step for step in range(1, steps + 1) if step % every == 0 or step == steps}
        assert len(at) == min(evals, steps), (size, sorted(at))


def test_resolution_refuses_a_model_whose_weights_depend_on_the_size() -> None:
    with pytest.raises(VitlabError, match="mixer-mini-p4-28 cannot be fine-tuned from 28 px to 56 px: .*token"):
        study.resolution_study(study.Study(dataset="digits"), ["mixer"], high=56)
