"""Training end to end on tiny data: the loss falls, resume is exact, checkpoints hold what they promise."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitlab.errors import VitlabError
from vitlab.train import checkpoint as ckpt
from vitlab.train.config import RECIPES, TrainAugment, TrainConfig, override
from vitlab.train.loop import Trainer

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64, "patch_size": 4}


def digits_config(out: Path, **changes) -> TrainConfig:
    """scikit-learn's 8×8 digits: 1,437 training images, 2×2 patches of 4 px, a few seconds per run."""
    base = TrainConfig(model="vit-mini-p4-28", model_overrides=TINY, dataset="digits", img_size=8, epochs=3,
                       batch_size=64, lr=3e-3, weight_decay=0.05, warmup_steps=5, out=str(out), progress=False,
                       eval_every_epochs=1.0, checkpoint_every_steps=7, deterministic=True, threads=1)
    return dataclasses.replace(base, **changes)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_accuracy_beats_chance(tmp_path: Path) -> None:
    result = Trainer(digits_config(tmp_path)).fit()
    records = metrics(tmp_path)
    assert len(records) == 3
    assert records[-1]["train_loss"] < records[0]["train_loss"] < 2.4
    assert result["test_top1"] > 0.5  # chance is 0.1
    for key in ("step", "epoch", "train_loss", "lr", "test_loss", "test_top1", "test_top5", "img_per_s",
                "elapsed_s"):
        assert key in records[-1]
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(("amp", "augment"), [("fp32", TrainAugment()), ("bf16", TrainAugment()),
                                               ("fp32", TrainAugment(random_resized_crop=True, scale=(0.5, 1.0)))],
                         ids=["fp32", "bf16", "crops"])
def test_killed_run_resumes_bit_identically(tmp_path: Path, amp: str, augment: TrainAugment) -> None:
    config = digits_config(tmp_path / "a", ema_decay=0.9, checkpoint_every_steps=10, amp=amp, augment=augment)
    Trainer(config).fit()
    killed = dataclasses.replace(config, out=str(tmp_path / "b"))
    # Simulate a kill after step 30 by training the full schedule but stopping the loop early.
    trainer = Trainer(killed)
    original_save = trainer._save
    saves = []

    def save_then_die(name, *args, **kwargs):
        original_save(name, *args, **kwargs)
        saves.append(name)
        if name == "last" and args[4] == 30:
            raise KeyboardInterrupt

    trainer._save = save_then_die
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    Trainer(killed, resume=True).fit()
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("model/", "train/", "optim/")))
    assert [r["test_top1"] for r in metrics(tmp_path / "a")] == [r["test_top1"] for r in metrics(tmp_path / "b")]


def test_checkpoint_contents(tmp_path: Path) -> None:
    Trainer(digits_config(tmp_path, epochs=1)).fit()
    tensors = load_file(tmp_path / "last.safetensors")
    state = json.loads((tmp_path / "last.json").read_text())
    assert {"model/pos_embed", "model/head.weight", "rng/torch"} <= set(tensors)
    assert any(key.startswith("optim/") for key in tensors)
    assert state["model_config"]["family"] == "vit" and state["train_config"]["dataset"] == "digits"
    assert {"step", "sha256", "scheduler", "optimizer_groups", "classes"} <= set(state)
    assert (tmp_path / "best.safetensors").exists()


def test_torn_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, "last", {"w": torch.zeros(3)}, {"step": 1})
    ckpt.save_checkpoint(tmp_path, "last", {"w": torch.ones(3)}, {"step": 2})
    data = (tmp_path / "last.safetensors").read_bytes()
    (tmp_path / "last.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="torn"):
        tensors, state = ckpt.load_checkpoint(tmp_path, "last")
    assert state["step"] == 1 and torch.equal(tensors["w"], torch.zeros(3))


def test_unwritable_output_is_refused_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(VitlabError, match="not writable"):
        Trainer(digits_config(blocker / "out")).fit()


def test_non_finite_loss_stops_with_the_step(tmp_path: Path) -> None:
    from vitlab.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="at step 2"):  # step 1 moves the weights by about 1e37
        Trainer(digits_config(tmp_path, lr=1e36, warmup_steps=0, grad_clip=0.0, epochs=1)).fit()


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    Trainer(digits_config(tmp_path, epochs=1)).fit()
    other = digits_config(tmp_path, model_overrides={**TINY, "embed_dim": 16})
    with pytest.raises(VitlabError, match="cannot resume"):
        Trainer(other, resume=True).fit()


def test_recipes_are_complete_and_overridable() -> None:
    assert {"fmnist-vit", "fmnist-vit-long", "fmnist-vit-p4", "paper-pretrain-i21k", "paper-finetune"} <= set(RECIPES)
    for name, recipe in RECIPES.items():
        assert f"--recipe {name}" in recipe.command and recipe.expected and recipe.description, name
    paper = RECIPES["paper-finetune"].config
    assert (paper.optimizer, paper.momentum, paper.weight_decay, paper.grad_clip) == ("sgd", 0.9, 0.0, 1.0)
    changed = override(RECIPES["fmnist-vit"].config, {"lr": "0.01", "ema_decay": "0.99", "hflip": "false"})
    assert (changed.lr, changed.ema_decay, changed.hflip) == (0.01, 0.99, False)
    with pytest.raises(VitlabError, match="lrr"):
        override(changed, {"lrr": "1"})
    with pytest.raises(VitlabError, match="must be a number"):
        override(changed, {"lr": "fast"})


def test_bf16_autocast_on_a_cpu_without_bf16_instructions_warns(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from vitlab import precision

    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    with pytest.warns(UserWarning, match="slower than in fp32"):
        assert Trainer(digits_config(tmp_path, amp="bf16")).autocast
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not Trainer(digits_config(tmp_path, amp="auto")).autocast  # auto keeps this CPU in fp32
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AVX512-BF16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer(digits_config(tmp_path, amp="bf16")).autocast
        assert Trainer(digits_config(tmp_path, amp="auto")).autocast  # native bf16: auto takes it
        assert not Trainer(digits_config(tmp_path, amp="fp32")).autocast
        assert not Trainer(digits_config(tmp_path, amp="none")).autocast  # older records' name for fp32
