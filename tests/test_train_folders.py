"""Training on image folders: every layout trains lazily and names the split it is measured on; the summary line,
the batch that fits, refusals that write nothing, unreadable images, resume on a folder, and fine-tuning records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitlab
from helpers import one_error_line
from vitlab.cli import main
from vitlab.train import loop
from vitlab.train.config import TrainConfig

TINY = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}'
CLASSES = ("cat", "dog", "fox")


def photos(folder: Path, count: int, seed: int) -> None:
    """`count` small RGB images of assorted sizes (so that crops and resizes do real work)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for index in range(count):
        pixels = rng.integers(0, 255, (18 + 3 * (index % 4), 20 + 2 * (index % 3), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")


def make_folder(root: Path, layout: str, classes: tuple[str, ...] = CLASSES) -> Path:
    """`flat`: ROOT/<class>/ with 10 images each; `train-val` / `train-test`: ROOT/train/<class>/ with 9 and
    ROOT/val|test/<class>/ with 2."""
    for seed, name in enumerate(classes):
        if layout == "flat":
            photos(root / name, 10, seed)
        else:
            photos(root / "train" / name, 9, seed)
            photos(root / layout[6:] / name, 2, seed + 10)
    return root


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", str(dataset), "--img-size", "16", "--epochs", "1", "--out", str(out),
            "--no-progress", "--workers", "0", "--set", f"model_overrides={TINY}", "--set", "threads=1",
            "--set", "amp=none", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["train-val", "train-test", "flat"])
def test_each_layout_trains_and_names_its_split(layout: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "photos", layout)
    split, train_images, eval_images = {"train-val": ("val", 27, 6), "train-test": ("test", 27, 6),
                                        "flat": ("holdout", 27, 3)}[layout]
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(train_args(root, out)) == 0  # the default batch (256) does not fit
    stdout = capsys.readouterr().out
    assert f"batch_size 256 is larger than the training split ({train_images} images): using 16" in stdout
    summary = [line for line in stdout.splitlines() if line.startswith(f"{root}: ")]
    params = sum(p.numel() for p in vitlab.create_model("vit-mini-p7-28", num_classes=3, img_size=16, in_chans=3,
                                                        **json.loads(TINY)).parameters())
    assert summary == [f"{root}: {train_images} train / {eval_images} {split} images, 3 classes; vit-mini-p7-28 "
                       f"({params / 1e6:.2f}M parameters), 16x16 px, batch 16, 1 steps, fp32"]
    assert f"on {split}: top1" in stdout
    assert json.loads(stdout.strip().splitlines()[-1])["split"] == split
    records = metrics(out)
    assert records and all(record["split"] == split for record in records)
    last = json.loads((out / "last.json").read_text())
    assert last["classes"] == list(CLASSES) and last["train_config"]["batch_size"] == 16
    assert last["preprocessing"]["img_size"] == [16, 16] and last["preprocessing"]["mean"] == [0.5, 0.5, 0.5]

    assert main(["eval", str(out), "--json", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == split and result["images"] == eval_images
    assert result["loss"] == pytest.approx(records[-1]["test_loss"], rel=0.02)  # the same split, prepared alike
    assert main(["eval", str(out), "--workers", "0"]) == 0
    assert f"{out} on {split} of {root} ({eval_images} images)" in capsys.readouterr().out
    assert main(["fewshot", str(out), "--shots", "1", "--seeds", "1", "--workers", "0"]) == 0
    assert f"1-shot on {split}:" in capsys.readouterr().out


def test_the_holdout_is_never_trained_on(tmp_path: Path) -> None:
    from vitlab.data import list_image_folder

    root = make_folder(tmp_path / "photos", "flat")
    config = TrainConfig(dataset=str(root), seed=3, val_fraction=0.2)
    data = loop.load_data(config, None)
    train = {data.train.paths[i] for i in range(len(data.train))}
    held = {data.test.paths[i] for i in range(len(data.test))}
    assert data.split == "holdout" and len(held) == 6 and not train & held and len(train | held) == 30
    assert held == {path for path in list_image_folder(root, "holdout", 0.2, seed=3).paths}  # what eval reads


def test_a_checkpoint_is_not_scored_on_other_class_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(train_args(make_folder(tmp_path / "pets", "train-val"), out)) == 0
    other = make_folder(tmp_path / "other", "train-val", ("ant", "bee", "cat"))
    capsys.readouterr()
    assert main(["eval", str(out), "--dataset", str(other), "--workers", "0"]) == 2
    one_error_line(capsys, "classes differ", "'ant'")
    assert not (out / "confusion.png").exists()


@pytest.mark.parametrize("case", ["empty class", "val class not in train", "one class"])
def test_bad_layouts_exit_2_and_write_nothing(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "photos"
    if case == "empty class":
        make_folder(root, "flat")
        (root / "empty").mkdir()
    elif case == "val class not in train":
        make_folder(root, "train-val")
        photos(root / "val" / "wolf", 2, 7)
    else:
        photos(root / "cat", 5, 0)
    capsys.readouterr()
    out = tmp_path / "out" / "run"
    assert main(train_args(root, out)) == 2
    one_error_line(capsys, {"empty class": "empty", "val class not in train": "wolf", "one class": "two class"}[case])
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_mid_epoch_is_named_or_skipped_and_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "photos", "train-val")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = train_args(root, tmp_path / "run", "--epochs", "2", "--batch-size", "8", "--workers", "1")
    capsys.readouterr()
    assert main(args) == 2
    one_error_line(capsys, "broken.png", "cannot read image", "skip_bad_images=true")
    assert main([*args, "--set", "skip_bad_images=true"]) == 0
    captured = capsys.readouterr()
    assert f"{root}: skipped 1 unreadable image(s)" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["skipped_images"] == 1
    assert json.loads((tmp_path / "run" / "last.json").read_text())["skipped_images"] == 1


class Killed(BaseException):
    """Stands in for a kill in the middle of a run."""


def kill_at_step(monkeypatch: pytest.MonkeyPatch, kill_step: int) -> None:
    real_step = loop.Trainer._train_step

    def killed(self, run, inputs, targets, step):
        if step == kill_step:
            raise Killed
        return real_step(self, run, inputs, targets, step)

    monkeypatch.setattr(loop.Trainer, "_train_step", killed)


def test_a_skipped_image_is_counted_once_across_a_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "photos", "train-val")
    (root / "val" / "dog" / "broken.png").write_bytes(b"not an image")  # met at every evaluation
    args = train_args(root, tmp_path / "run", "--epochs", "3", "--batch-size", "8", "--set", "skip_bad_images=true",
                      "--set", "checkpoint_every_steps=1")
    with monkeypatch.context() as patch:
        kill_at_step(patch, 5)
        with pytest.raises(Killed):
            main(args)
    assert json.loads((tmp_path / "run" / "last.json").read_text())["skipped_images"] == 1
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert f"{root}: skipped 1 unreadable image(s)" in capsys.readouterr().err
    record = json.loads((tmp_path / "run" / "last.json").read_text())
    assert record["skipped_images"] == 1 and record["skipped_files"] == [str(root / "val" / "dog" / "broken.png")]


def test_resume_on_a_folder_gives_the_uninterrupted_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-sample crops, flips, RandAugment and MixUp, read by a different number of workers after the resume."""
    root = make_folder(tmp_path / "photos", "flat")
    common = ["--epochs", "3", "--batch-size", "8", "--deterministic", "--set", "checkpoint_every_steps=2",
              "--set", "hflip=true", "--set", "randaugment_ops=2", "--set", "mixup_alpha=0.4"]
    assert main(train_args(root, tmp_path / "a", *common)) == 0
    with monkeypatch.context() as patch:
        kill_at_step(patch, 5)
        with pytest.raises(Killed):
            main(train_args(root, tmp_path / "b", *common))
    assert json.loads((tmp_path / "b" / "last.json").read_text())["step"] == 4
    assert main(train_args(root, tmp_path / "b", *common, "--resume", "--workers", "2")) == 0
    first, second = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    weights = [key for key in first if key.startswith("model/")]
    assert weights and all(torch.equal(first[key], second[key]) for key in weights)
    assert metrics(tmp_path / "a") == [{**record, "elapsed_s": a["elapsed_s"], "img_per_s": a["img_per_s"]}
                                       for record, a in zip(metrics(tmp_path / "b"), metrics(tmp_path / "a"),
                                                            strict=True)]


@pytest.mark.parametrize("kind", ["vitlab", "npz"])
def test_finetune_records_the_source_architecture_and_resumes(kind: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A weights file of vit-mini-p7-28 (not the default model) fine-tuned on a folder with the default recipe."""
    source = vitlab.create_model("vit-mini-p7-28", num_classes=5, in_chans=3)
    path = vitlab.save_weights(source, tmp_path / ("source.safetensors" if kind == "vitlab" else "source.npz"), kind)
    root = make_folder(tmp_path / "photos", "train-val")
    out = tmp_path / "tuned"
    args = ["finetune", "--from", str(path), "--dataset", str(root), "--img-size", "14", "--out", str(out),
            "--no-progress", "--workers", "0", "--set", "checkpoint_every_steps=1", "--set", "threads=1"]
    capsys.readouterr()
    assert main(args) == 0
    assert f"vit-mini-p7-28 from {path}" in capsys.readouterr().out
    config = json.loads((out / "last.json").read_text())["train_config"]
    assert config["model"] == "vit-mini-p7-28"
    assert (config["optimizer"], config["momentum"], config["weight_decay"], config["grad_clip"],
            config["schedule"]) == ("sgd", 0.9, 0.0, 1.0, "cosine") and config["warmup_epochs"] > 0
    assert main([*args, "--resume"]) == 0  # the record's model is the one the resumed run names
    trainer = loop.Trainer(TrainConfig(init_from=str(path), img_size=14))
    model = trainer._build_model(3, 3)
    assert trainer.config.model == "vit-mini-p7-28" and model.config.img_size == (14, 14)
    assert model.pos_embed.shape[1] == 1 + 2 * 2  # resampled to the 2x2 grid of 14 px
    assert model.head.weight.abs().sum() == 0 and model.head.weight.shape[0] == 3  # a new zero head


def test_an_unregistered_architecture_is_recorded_by_its_config(tmp_path: Path) -> None:
    source = vitlab.create_model("vit-mini-p7-28", num_classes=5, embed_dim=24, depth=1, num_heads=2, mlp_dim=48)
    path = vitlab.save_weights(source, tmp_path / "odd.safetensors")
    trainer = loop.Trainer(TrainConfig(init_from=str(path)))
    trainer._build_model(3, 1)
    assert trainer.config.model == "vit-custom"
    assert {"patch_size": 7, "embed_dim": 24, "depth": 1, "num_heads": 2, "mlp_dim": 48}.items() <= (
        trainer.config.model_overrides.items())


def test_finetune_and_eval_take_the_checkpoints_normalisation(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "photos", "train-val")
    source = tmp_path / "source"
    assert main(train_args(root, source)) == 0
    capsys.readouterr()
    assert main(["eval", str(source), "--json", "--workers", "0"]) == 0
    before = json.loads(capsys.readouterr().out)["loss"]
    # The same weights as a checkpoint whose card says it was normalised with ImageNet's statistics.
    from vitlab.weights import load_model, save_weights
    from vitlab.weights.card import ModelCard, Preprocessing

    model = load_model(source)
    imagenet = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    model.card = ModelCard(model.card.classes, imagenet)
    save_weights(model, tmp_path / "imagenet.safetensors")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "imagenet.safetensors"), "--dataset", str(root), "--json",
                 "--workers", "0"]) == 0
    shifted = json.loads(capsys.readouterr().out)["loss"]
    assert shifted != before  # evaluated with the card's statistics (the same ones give the same loss)
    source = tmp_path / "imagenet.safetensors"
    out = tmp_path / "tuned"
    assert main(["finetune", "--from", str(source), "--dataset", str(root), "--out", str(out), "--no-progress",
                 "--workers", "0"]) == 0
    recorded = json.loads((out / "last.json").read_text())["preprocessing"]
    assert recorded["mean"] == [0.485, 0.456, 0.406] and recorded["std"] == [0.229, 0.224, 0.225]
    trained = json.loads((out / "last.json").read_text())["train_config"]
    assert trained["model"] == "vit-custom" and trained["model_overrides"]["depth"] == json.loads(TINY)["depth"]
