"""The trainer's parts on their own: the nested augmentation config, layered recipes, run records, batch sources."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from vitlab.analysis.plots import plot_training_curves
from vitlab.data import ImageTensors
from vitlab.errors import VitlabError
from vitlab.train.batches import TensorBatches, batch_source
from vitlab.train.config import (
    FAMILY_RECIPES,
    FINETUNE,
    RECIPES,
    STUDY_BASE,
    TrainAugment,
    TrainConfig,
    config_from_json,
    config_to_json,
    override,
)
from vitlab.train.distributed import Distributed
from vitlab.train.run_dir import RunDir

FLAT_AUGMENT = ["crop_padding", "hflip", "randaugment_ops", "randaugment_magnitude", "mixup_alpha", "cutmix_alpha",
                "random_resized_crop", "scale", "ratio"]


def test_augmentation_is_one_nested_config_named_flat_or_dotted() -> None:
    config = override(TrainConfig(), {"crop_padding": "2", "augment.hflip": "true", "mixup_alpha": 0.2})
    assert config.augment == TrainAugment(crop_padding=2, hflip=True, mixup_alpha=0.2)
    assert (config.crop_padding, config.hflip) == (2, True)
    with pytest.raises(VitlabError, match="randaugment_ops must not be negative"):
        override(config, {"augment.randaugment_ops": "-1"})
    with pytest.raises(VitlabError, match="unknown training option.*augment.nothing"):
        override(config, {"augment.nothing": "1"})
    with pytest.raises(AttributeError):
        _ = config.nothing
    data = config.augment.to_data()
    assert (data.crop_padding, data.hflip, data.mixup_alpha) == (2, True, 0.2)


def test_random_resized_crop_is_set_checked_and_recorded() -> None:
    config = override(RECIPES["fmnist-vit"].config,
                      {"augment.random_resized_crop": "true", "augment.scale": "[0.35,1]"})
    assert config.augment.scale == (0.35, 1.0) and config.augment.ratio == (3 / 4, 4 / 3)
    data = config.augment.to_data()
    assert (data.random_resized_crop, data.scale, data.ratio) == (True, (0.35, 1.0), (3 / 4, 4 / 3))
    record = json.loads(json.dumps(config_to_json(config)))
    assert record["scale"] == [0.35, 1.0] and config_from_json(record, "last.json") == config
    older = {key: value for key, value in record.items() if key not in ("random_resized_crop", "scale", "ratio")}
    assert config_from_json(older, "last.json").augment == TrainAugment(hflip=True)
    for value, message in (("[0,1]", "scale must be"), ("[0.5,0.4]", "scale must be"), ("[0.2,1.5]", "scale must")):
        with pytest.raises(VitlabError, match=message):
            override(config, {"augment.scale": value})
    with pytest.raises(VitlabError, match="ratio must be"):
        override(config, {"ratio": "[1.5,0.5]"})
    with pytest.raises(VitlabError, match="scale must be a list of 2 numbers"):
        override(config, {"scale": "0.5"})


def test_records_keep_the_flat_keys_of_earlier_versions() -> None:
    config = override(RECIPES["bv-s16-i1k"].config, {"crop_padding": "3"})
    record = json.loads(json.dumps(config_to_json(config)))
    keys = list(record)
    assert "augment" not in record and keys[keys.index("ema_decay") + 1:keys.index("init_from")] == FLAT_AUGMENT
    assert (record["crop_padding"], record["randaugment_magnitude"], record["mixup_alpha"]) == (3, 10, 0.2)
    assert config_from_json(record, "last.json") == config
    with pytest.raises(VitlabError, match="last.json.*hflip"):
        config_from_json({**record, "hflip": "yes"}, "last.json")


def test_layered_recipe_changes_only_its_fields() -> None:
    source = override(RECIPES["fmnist-vit"].config, {"mixup_alpha": "0.5", "ema_decay": "0.99"})
    tuned = FINETUNE.over(source)
    assert (tuned.model, tuned.model_overrides, tuned.img_size, tuned.hflip) == (
        source.model, source.model_overrides, source.img_size, True)
    assert (tuned.optimizer, tuned.lr, tuned.weight_decay, tuned.ema_decay, tuned.mixup_alpha) == (
        "sgd", 0.01, 0.0, None, 0.0)
    assert RECIPES["fmnist-vit"].over(source) is RECIPES["fmnist-vit"].config


def test_study_families_are_recipes_sharing_the_study_settings() -> None:
    assert list(FAMILY_RECIPES) == ["vit", "resnet", "mixer", "perceiver"]
    for family, recipe in FAMILY_RECIPES.items():
        assert recipe is RECIPES[f"study-{family}"]
        assert (recipe.config.hflip, recipe.config.checkpoint_every_steps) == (True, 250)
        assert recipe.config.augment == STUDY_BASE.augment
    for recipe in RECIPES.values():
        assert recipe.expected.startswith("≈ ") and "\n" not in recipe.expected
        assert not re.search(r"\d{4}-\d{2}-\d{2}|measured", recipe.expected), recipe.expected


def test_run_dir_appends_truncates_and_reads_back(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.metrics() == [] and run.last_metrics() is None and run.record() is None
    for step in (10, 20, 30):
        run.append_metrics({"step": step, "test_top1": step / 100})
    with open(run.metrics_path, "a") as handle:
        handle.write('{"step": 40, "test_')  # torn by a kill
    assert [record["step"] for record in run.metrics()] == [10, 20, 30]
    assert run.metrics_at(20)["test_top1"] == 0.2
    with pytest.raises(VitlabError, match="no evaluation at the run's last step 25"):
        run.metrics_at(25)
    run.truncate_metrics(20)
    assert run.metrics_path.read_text().splitlines() == ['{"step": 10, "test_top1": 0.1}',
                                                         '{"step": 20, "test_top1": 0.2}']
    run.record_path().write_text("[1, 2]")
    with pytest.raises(VitlabError, match="last.json: a run record must be a JSON object"):
        run.record()
    run.record_path().write_text(json.dumps({"model_config": {"img_size": [21, 21]},
                                             "train_config": config_to_json(TrainConfig(lr=0.5))}))
    assert run.img_size() == 21 and run.train_config().lr == 0.5


def test_training_curves_are_drawn_from_records(tmp_path: Path) -> None:
    assert plot_training_curves([], tmp_path / "none.png") is None
    records = [{"step": step, "train_loss": 1 / step, "test_loss": 2 / step, "test_top1": 0.5, "test_top5": 0.9}
               for step in (1, 2)]
    assert plot_training_curves(records, tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def labels_only(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images.float(), labels


def test_tensor_batches_resume_at_any_step_and_split_by_rank() -> None:
    data = ImageTensors(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10), tuple(map(str, range(10))),
                        "toy")
    source = batch_source(data, 4, 0, Distributed(), (2, 2), 1, labels_only)
    assert isinstance(source, TensorBatches)
    steps = [labels for _, labels in itertools.islice(source.batches(0), 6)]
    assert all(len(labels) == 4 for labels in steps)
    assert len(set(torch.cat(steps[:2]).tolist())) == 8  # no image twice in an epoch
    assert not torch.equal(torch.cat(steps[:2]), torch.cat(steps[2:4]))  # a fresh order each epoch
    assert [labels.tolist() for _, labels in itertools.islice(source.batches(3), 3)] == [
        labels.tolist() for labels in steps[3:]]
    halves = [TensorBatches(data, 4, 0, Distributed(rank=rank, world_size=2), 1, labels_only) for rank in (0, 1)]
    shares = [next(half.batches(1))[1] for half in halves]
    assert torch.equal(torch.stack(shares, 1).flatten(), steps[1])
