"""BiT ResNet-v2: exact sizes, timm parity, Google's BiT `.npz` layout, the uniform API, training and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import vitlab
from helpers import count, one_error_line, randomised
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.models.resnet import ResNet, ResNetConfig
from vitlab.train.config import TrainConfig
from vitlab.train.loop import Trainer
from vitlab.weights import load_model, load_weights, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")

R50_PARAMETERS = 25_549_352  # timm's resnetv2_50x1_bit with 1000 classes
MINI_PARAMETERS = 865_898


@pytest.fixture(scope="module")
def timm_r50() -> torch.nn.Module:
    """timm's R50x1 with random weights and a 7-class head (built on meta: timm's initialisers are slow)."""
    with torch.device("meta"):
        model = timm.create_model("resnetv2_50x1_bit", num_classes=7)
    return randomised(model.to_empty(device="cpu"))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def bit_npz_arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A timm state dict written in BiT's `.npz` names (big_transfer's layout: `resnet/`, `unit01`, HWIO)."""
    def hwio(key: str) -> np.ndarray:
        return state[key].numpy().transpose(2, 3, 1, 0)

    arrays = {"resnet/root_block/standardized_conv2d/kernel": hwio("stem.conv.weight"),
              "resnet/group_norm/gamma": state["norm.weight"].numpy(),
              "resnet/group_norm/beta": state["norm.bias"].numpy(),
              "resnet/head/conv2d/kernel": hwio("head.fc.weight"),
              "resnet/head/conv2d/bias": state["head.fc.bias"].numpy()}
    for key in state:
        parts = key.split(".")
        if parts[0] != "stages" or parts[-1] != "weight" or "conv" not in parts[-2]:
            continue
        stage, unit = int(parts[1]), int(parts[3])
        unit_name = f"resnet/block{stage + 1}/unit{unit + 1:02d}/"
        if parts[4] == "downsample":
            arrays[unit_name + "a/proj/standardized_conv2d/kernel"] = hwio(key)
            continue
        letter = "abc"[int(parts[4][-1]) - 1]
        norm = key.replace(f"conv{parts[4][-1]}.weight", f"norm{parts[4][-1]}.")
        arrays[f"{unit_name}{letter}/standardized_conv2d/kernel"] = hwio(key)
        arrays[f"{unit_name}{letter}/group_norm/gamma"] = state[norm + "weight"].numpy()
        arrays[f"{unit_name}{letter}/group_norm/beta"] = state[norm + "bias"].numpy()
    return arrays


# ------------------------------------------------------------------------------------------------ sizes
def test_parameter_counts_match_timm() -> None:
    with torch.device("meta"):
        reference = count(timm.create_model("resnetv2_50x1_bit", num_classes=1000))
        r50 = vitlab.create_model("resnet50-bit")
        mini = vitlab.create_model("resnet-bit-mini-28")
    assert count(r50) == reference == R50_PARAMETERS
    assert count(mini) == MINI_PARAMETERS


def test_config_errors_name_the_field() -> None:
    for overrides, field in (({"width": 48}, "width"), ({"stem": "deep"}, "stem"), ({"layers": ()}, "layers"),
                             ({"layers": (3, 0)}, "layers"), ({"num_classes": -1}, "num_classes"),
                             ({"drop_path": 2.0}, "drop_path"), ({"depth": 3}, "depth")):
        with pytest.raises(VitlabError, match=field):
            vitlab.create_model("resnet-bit-mini-28", **overrides)


# ------------------------------------------------------------------------------------------------ parity
def test_logits_equal_timm_through_a_timm_file(timm_r50, images, tmp_path: Path) -> None:
    save_file(timm_r50.state_dict(), tmp_path / "r50.safetensors")
    model = load_model(tmp_path / "r50.safetensors")  # the config comes from the shapes
    assert model.config == ResNetConfig(num_classes=7)
    with torch.no_grad():
        expected = timm_r50(images)
        assert (model(images) - expected).abs().max() < 1e-4
        # the uniform API: features are the normalised final map, pre-logits its average
        features = model.forward_features(images)
        assert features.shape == (2, 2048, 2, 2)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True),
                                   timm_r50.forward_head(timm_r50.forward_features(images), pre_logits=True),
                                   atol=1e-4, rtol=0)
    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero outputs


def test_bit_npz_loads_with_timm_logits(timm_r50, images, tmp_path: Path) -> None:
    np.savez(tmp_path / "BiT-M-R50x1.npz", **bit_npz_arrays(timm_r50.state_dict()))
    model = load_model(tmp_path / "BiT-M-R50x1.npz", "resnet50-bit")
    with torch.no_grad():
        assert (model(images) - timm_r50(images)).abs().max() < 1e-4
    # vitlab writes the same layout back
    save_weights(model, tmp_path / "again.npz", "npz")
    with np.load(tmp_path / "again.npz") as written, np.load(tmp_path / "BiT-M-R50x1.npz") as original:
        assert sorted(written.files) == sorted(original.files)
    # a checkpoint with another head loads into a 10-class model only with a new zero head
    target = vitlab.create_model("resnet50-bit", num_classes=10)
    with pytest.raises(VitlabError, match=r"head\.fc\.weight \(7, 2048, 1, 1\).*reset_head"):
        load_weights(target, tmp_path / "BiT-M-R50x1.npz")
    load_weights(target, tmp_path / "BiT-M-R50x1.npz", reset_head=True)
    assert target.head.fc.weight.abs().sum() == 0
    torch.testing.assert_close(target.stem.conv.weight, timm_r50.stem.conv.weight)


def test_small_model_round_trips_every_format(tmp_path: Path) -> None:
    model = randomised(vitlab.create_model("resnet-bit-mini-28"))
    digits = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(digits)
    for name, fmt in (("mini.safetensors", "vitlab"), ("mini.npz", "npz"), ("mini_timm.safetensors", "timm")):
        save_weights(model, tmp_path / name, fmt)
        loaded = load_model(tmp_path / name, "resnet-bit-mini-28")
        assert loaded.config == model.config
        with torch.no_grad():
            torch.testing.assert_close(loaded(digits), expected)
    with pytest.raises(VitlabError, match="ViT"):
        save_weights(model, tmp_path / "hf", "hf")


def test_a_checkpoint_of_another_model_is_refused_by_name(timm_r50, tmp_path: Path) -> None:
    save_file(timm_r50.state_dict(), tmp_path / "r50.safetensors")
    np.savez(tmp_path / "r50.npz", **bit_npz_arrays(timm_r50.state_dict()))
    with pytest.raises(VitlabError, match=r"r50\.npz holds resnet weights.*VisionTransformer"):
        load_weights(vitlab.create_model("vit-ti16"), tmp_path / "r50.npz")
    with pytest.raises(VitlabError, match=r"holds resnet weights, not a vit-b16"):
        load_model(tmp_path / "r50.npz", "vit-b16")
    with pytest.raises(VitlabError, match=r"not hold a resnet-bit-mini-28: layers \(3, 4, 6, 3\)"):
        load_model(tmp_path / "r50.safetensors", "resnet-bit-mini-28")
    vit = vitlab.create_model("vit-ti16", num_classes=7)
    save_weights(vit, tmp_path / "vit.safetensors")
    with pytest.raises(VitlabError, match=r"holds vit weights.*ResNet"):
        load_weights(ResNet(ResNetConfig(num_classes=7)), tmp_path / "vit.safetensors")
    state = dict(timm_r50.state_dict(), **{"stages.0.blocks.0.norm1.running_mean": torch.zeros(64)})
    save_file(state, tmp_path / "bn.safetensors")
    with pytest.raises(VitlabError, match="BatchNorm"):
        load_model(tmp_path / "bn.safetensors")


def test_truncated_bit_npz_names_the_missing_array(timm_r50, tmp_path: Path) -> None:
    arrays = bit_npz_arrays(timm_r50.state_dict())
    del arrays["resnet/block2/unit03/b/group_norm/gamma"]
    np.savez(tmp_path / "cut.npz", **arrays)
    with pytest.raises(VitlabError, match=r"cut\.npz.*block2/unit03/b/group_norm/gamma"):
        load_model(tmp_path / "cut.npz")


# ------------------------------------------------------------------------------------------------ model API
def test_api_any_size_new_head_and_checkpointing() -> None:
    model = randomised(vitlab.create_model("resnet-bit-mini-28", drop_path=0.1))
    assert model.num_features == 512 and model.num_classes == 10
    x = torch.randn(2, 1, 20, 36)  # a ResNet runs at any size
    assert model.forward_features(x).shape == (2, 512, 5, 9)
    model.reset_classifier(3)
    assert model.config.num_classes == 3 and model.head.fc.weight.abs().sum() == 0
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    with pytest.raises(VitlabError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 3, 28, 28))
    # gradient checkpointing recomputes, it does not change the gradients
    model = randomised(vitlab.create_model("resnet-bit-mini-28"))
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append(model.stem.conv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------------------------------------ training, CLI
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resnet_run")
    config = TrainConfig(model="resnet-bit-mini-28", dataset="digits", subset=500, img_size=8, epochs=3,
                         batch_size=50, lr=3e-3, weight_decay=0.05, warmup_steps=3, out=str(out), progress=False,
                         eval_every_epochs=1.0, deterministic=True, threads=1)
    Trainer(config).fit()
    return out


@pytest.mark.slow
def test_trainer_loss_falls(trained: Path) -> None:
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_top1"] > 0.5  # chance is 0.1
    state = json.loads((trained / "last.json").read_text())
    assert state["model_config"]["family"] == "resnet"


@pytest.mark.slow
def test_cli_eval_fewshot_predict_and_analyze(trained: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(trained), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 0.5
    assert main(["fewshot", str(trained), "--shots", "5", "--seeds", "1"]) == 0
    assert "5-shot" in capsys.readouterr().out
    image = tmp_path / "digit.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)).save(image)
    assert main(["predict", str(trained), str(image)]) == 0
    assert "digit.png" in capsys.readouterr().out
    assert main(["convert", str(trained), str(tmp_path / "mini.npz")]) == 0
    assert "ResNet" in capsys.readouterr().out
    assert main(["analyze", str(trained), "--images", str(image), "--out", str(tmp_path / "analysis")]) == 2
    one_error_line(capsys, "Vision Transformer", "ResNet")


@pytest.mark.slow
def test_finetune_from_a_run_at_another_size(trained: Path, tmp_path: Path) -> None:
    config = TrainConfig(model="resnet-bit-mini-28", dataset="digits", subset=100, img_size=12, epochs=1,
                         batch_size=50, lr=1e-3, out=str(tmp_path / "ft"), progress=False, threads=1,
                         init_from=str(trained), new_head=True)
    result = Trainer(config).fit()
    assert 0.0 <= result["test_top1"] <= 1.0
    assert load_model(tmp_path / "ft").config.img_size == (12, 12)
