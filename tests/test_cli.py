"""The command line as a contract: exit codes, one-line errors, and the train → eval → predict path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_error_line
from vitlab.cli import main
from vitlab.precision import resolve_amp

TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}'


def train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "digits", "--img-size", "8", "--epochs", "1", "--batch-size", "64", "--out",
            str(out), "--no-progress", "--set", f"model_overrides={TINY}", "--set", "threads=1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(out)) == 0
    return out



def test_train_writes_a_run_and_eval_reads_it(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert {"last.safetensors", "last.json", "best.safetensors", "metrics.jsonl"} <= {p.name for p in
                                                                                      trained.iterdir()}
    capsys.readouterr()
    assert main(["eval", str(trained), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["dataset"] == "digits" and 0.0 <= record["top1"] <= 1.0
    assert Path(record["confusion_png"]).stat().st_size > 0


def test_predict_any_image_mode(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    paths = []
    for mode, shape in (("RGB", (40, 30, 3)), ("L", (8, 8)), ("RGBA", (9, 9, 4))):
        path = tmp_path / f"{mode}.png"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
        paths.append(str(path))
    palette = Image.new("P", (12, 12))
    palette.save(tmp_path / "p.png")
    paths.append(str(tmp_path / "p.png"))
    assert main(["predict", str(trained), *paths, "--json", "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 4 and all(len(line["top"]) == 2 for line in lines)
    assert lines[0]["top"][0]["class"] in [str(d) for d in range(10)]


def test_precision_is_chosen_reported_and_forced(trained: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--amp` on eval, fewshot and predict, `--set amp=` on train; `auto` resolves as `vitlab.precision` says."""
    auto = "bf16" if resolve_amp("auto", torch.device("cpu")) else "fp32"
    capsys.readouterr()
    records = {}
    for amp in ("auto", "bf16", "fp32"):
        assert main(["eval", str(trained), "--json", "--amp", amp]) == 0
        records[amp] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert records["fp32"]["precision"] == "fp32" and records["bf16"]["precision"].startswith("bf16 autocast")
    assert records["auto"]["precision"] == records[auto]["precision"]
    assert records["auto"]["top1"] == records[auto]["top1"]
    assert abs(records["bf16"]["top1"] - records["fp32"]["top1"]) < 0.05
    assert main(["fewshot", str(trained), "--shots", "2", "--seeds", "1", "--json", "--amp", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["precision"] == "fp32"
    image = tmp_path / "digit.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8), mode="L").save(image)
    tops = []
    for amp in ("bf16", "fp32"):
        assert main(["predict", str(trained), str(image), "--json", "--amp", amp]) == 0
        tops.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top"][0])
    assert tops[0]["prob"] == pytest.approx(tops[1]["prob"], abs=0.05)
    assert main(train_args(tmp_path / "fp32", "--subset", "128", "--set", "amp=fp32")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "precision: fp32, amp=fp32" and json.loads(lines[-1])["precision"] == "fp32"


def test_unreadable_image_is_named(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    capsys.readouterr()
    assert main(["predict", str(trained), str(bad)]) == 2
    one_error_line(capsys, "broken.png")


def test_missing_dataset_and_one_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_args(tmp_path / "o", "--dataset", str(tmp_path / "nowhere"))) == 2
    one_error_line(capsys, "nowhere")
    assert main(train_args(tmp_path / "o", "--dataset", "imagenet-42")) == 2
    one_error_line(capsys, "unknown dataset")
    folder = tmp_path / "one" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert main(train_args(tmp_path / "o", "--dataset", str(tmp_path / "one"))) == 2
    one_error_line(capsys, "two class")


def test_checkpoint_of_the_wrong_model(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    # Resuming a run with another architecture is refused, naming the run.
    other = train_args(trained, "--resume", "--set", 'model_overrides={"embed_dim": 16, "depth": 1, '
                                                     '"num_heads": 2, "mlp_dim": 8, "patch_size": 4}')
    assert main(other) == 2
    one_error_line(capsys, "cannot resume")
    # A 10-class model evaluated on a data set with another number of classes is refused.
    folder = tmp_path / "three"
    for name in ("a", "b", "c"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (30, 60, 90)).save(folder / name / "x.png")
    assert main(["eval", str(trained), "--dataset", str(folder)]) == 2
    one_error_line(capsys, "classes")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["train", "--epochs", "many"])
    assert raised.value.code == 2
    capsys.readouterr()
    assert main(["train", "--set", "nonsense"]) == 2
    one_error_line(capsys, "FIELD=VALUE")
    assert main(["eval", "/does/not/exist"]) == 2
    one_error_line(capsys, "/does/not/exist")


def test_resume_with_other_data_or_schedule_is_refused(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The step → sample mapping and the restored schedule belong to the checkpoint's settings."""
    capsys.readouterr()
    assert main(train_args(trained, "--resume", "--batch-size", "32")) == 2
    one_error_line(capsys, "batch_size 64 → 32", "new --out")
    assert main(train_args(trained, "--resume", "--epochs", "2")) == 2
    one_error_line(capsys, "epochs 1.0 → 2.0")
    assert main(train_args(trained, "--resume", "--set", "weight_decay=0.5")) == 2  # the optimizer keeps its own
    one_error_line(capsys, "weight_decay")


def test_output_paths_that_cannot_be_written_are_one_line(trained: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a_file, a_folder = tmp_path / "a-file", tmp_path / "a-folder"
    a_file.write_text("in the way")
    a_folder.mkdir()
    weights = str(trained / "last.safetensors")
    capsys.readouterr()
    assert main(["eval", str(trained), "--out", str(a_file)]) == 2
    one_error_line(capsys, str(a_file), "exists and is not a directory")
    assert main(["convert", weights, str(a_file / "x.npz")]) == 2
    one_error_line(capsys, str(a_file), "exists and is not a directory")
    assert main(["convert", weights, str(a_folder), "--to", "vitlab"]) == 2
    one_error_line(capsys, str(a_folder), "Is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]  # no temporary left behind
    assert not any(a_folder.iterdir())


@pytest.mark.parametrize(("setting", "message"), [
    ("batch_size=1e999", "batch_size must be a finite number"), ("seed=NaN", "seed must be a finite number"),
    ("lr=NaN", "lr must be a finite number"), ("ema_decay=abc", "ema_decay must be a number or null"),
    ("threads=abc", "threads must be a whole number or null"), ("betas=5", "betas must be a list of 2 numbers"),
    ("checkpoint_every_steps=2.5", "checkpoint_every_steps must be a whole number"),
    ("model_overrides=3", "model_overrides must be a JSON object"),
    ("warmup_steps=-5", "warmup_steps must not be negative"), ("img_size=-3", "img_size must be positive"),
    ("hflip=1", "hflip must be true or false")])
def test_set_values_of_the_wrong_type_are_one_line(setting: str, message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_args(tmp_path / "run", "--set", setting)) == 2
    one_error_line(capsys, message)
    assert not (tmp_path / "run" / "last.json").exists()


def test_set_values_take_each_field_s_type() -> None:
    from vitlab.train.config import TrainConfig, override

    config = override(TrainConfig(), {"epochs": "2", "batch_size": "64.0", "ema_decay": "null", "dataset": "123",
                                      "betas": "[0.9, 0.95]", "init_from": "runs/a"})
    assert (config.epochs, config.batch_size, config.ema_decay, config.dataset, config.betas, config.init_from) == (
        2.0, 64, None, "123", (0.9, 0.95), "runs/a")
    assert isinstance(config.epochs, float) and isinstance(config.batch_size, int)
    assert override(TrainConfig(), {"threads": "0"}).threads == 0  # torch's own choice, as before


def test_counts_and_patterns_that_select_nothing_are_one_line(trained: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    for argv, flag in ((["predict", str(trained), "x.png", "--top-k", "0"], "--top-k"),
                       (["fewshot", str(trained), "--shots", "0"], "--shots"),
                       (["fewshot", str(trained), "--seeds", "-1"], "--seeds")):
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
        one_error_line(capsys, flag, "positive whole number")
    assert main(["models", "no-such-model"]) == 2
    one_error_line(capsys, "no-such-model")


@pytest.mark.slow
def test_python_dash_m_is_the_same_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "vitlab", "models", "vit-ti"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "5,717,416" in result.stdout
