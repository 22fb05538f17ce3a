"""The hybrid ViT (paper §3.1): exact size and logits of timm's vit_base_r50_s16_224, the official `.npz` layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import vitlab
from helpers import count, randomised
from vitlab.cli import main
from vitlab.errors import VitlabError
from vitlab.weights import load_model, load_weights, npz, save_weights

pytestmark = pytest.mark.usefixtures("one_thread")

HYBRID_PARAMETERS = 98_659_112  # timm's vit_base_r50_s16_224 with 1000 classes
HYBRID_FEATURES_PARAMETERS = 97_890_112  # without a head: timm's default (the in21k weights' head is dropped)
SMALL_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2}  # timm's names; the R50 stem stays full size


def timm_hybrid(**kwargs) -> torch.nn.Module:
    """timm's R50+ViT-B/16 at 64 px (a 4×4 token grid) with random weights, built on meta (its init is slow)."""
    with torch.device("meta"):
        model = timm.create_model("vit_base_r50_s16_224", img_size=64, **kwargs)
    return randomised(model.to_empty(device="cpu"), std=0.05)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def small_timm() -> torch.nn.Module:
    return timm_hybrid(num_classes=5, **SMALL_VIT)


def small_vitlab(**overrides) -> torch.nn.Module:
    return vitlab.create_model("vit-b16-r50", img_size=64, num_classes=5, embed_dim=64, depth=2, num_heads=2,
                               mlp_dim=256, **overrides)


def official_npz_arrays(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, np.ndarray]:
    """`R50+ViT-B_16.npz`'s layout: the ViT arrays (vitlab's writer, tested against timm elsewhere) plus the ResNet
    stem under the official models_resnet.py names, written here from timm's keys."""
    backbone = "patch_embed.backbone."
    plain = dataclasses.replace(model.config, hybrid_layers=None, patch_size=1, img_size=(4, 4))
    arrays = npz.from_state_dict({k: v for k, v in state.items() if not k.startswith(backbone)}, plain)

    def hwio(key: str) -> np.ndarray:
        return state[backbone + key].numpy().transpose(2, 3, 1, 0)

    arrays["conv_root/kernel"] = hwio("stem.conv.weight")
    arrays["gn_root/scale"] = state[backbone + "stem.norm.weight"].numpy()
    arrays["gn_root/bias"] = state[backbone + "stem.norm.bias"].numpy()
    for key in state:
        if not key.startswith(backbone + "stages.") or not key.endswith(".weight"):
            continue
        parts = key[len(backbone):].split(".")  # stages, s, blocks, u, conv1 | norm1 | downsample, ...
        unit = f"block{int(parts[1]) + 1}/unit{int(parts[3]) + 1}/"
        layer = parts[4] if parts[4] != "downsample" else {"conv": "conv_proj", "norm": "gn_proj"}[parts[5]]
        if layer.startswith("conv"):
            arrays[f"{unit}{layer}/kernel"] = state[key].numpy().transpose(2, 3, 1, 0)
        else:
            name = layer.replace("norm", "gn")
            arrays[f"{unit}{name}/scale"] = state[key].numpy()
            arrays[f"{unit}{name}/bias"] = state[key[:-len("weight")] + "bias"].numpy()
    return arrays


def test_parameter_counts_match_timm() -> None:
    with torch.device("meta"):
        assert count(vitlab.create_model("vit-b16-r50")) == HYBRID_PARAMETERS == count(
            timm.create_model("vit_base_r50_s16_224", num_classes=1000))
        assert count(vitlab.create_model("vit-b16-r50", num_classes=0)) == HYBRID_FEATURES_PARAMETERS == count(
            timm.create_model("vit_base_r50_s16_224"))
    config = vitlab.models.model_config("vit-b16-r50")
    assert config.stride == 16 and config.grid_size == (14, 14)


def test_full_size_logits_equal_timm(images) -> None:
    reference = timm_hybrid(num_classes=1000)
    with torch.device("meta"):
        model = vitlab.create_model("vit-b16-r50", img_size=64)
    model = model.to_empty(device="cpu").eval()
    model.load_state_dict(reference.state_dict(), strict=True)  # timm's names, unchanged
    with torch.no_grad():
        expected = reference(images)
        assert (model(images) - expected).abs().max() < 1e-4
    assert expected.abs().max() > 0.01


def test_timm_file_and_official_npz_load_with_timm_logits(small_timm, images, tmp_path: Path) -> None:
    with torch.no_grad():
        expected = small_timm(images)
    save_file(small_timm.state_dict(), tmp_path / "hybrid.safetensors")
    model = load_weights(small_vitlab(), tmp_path / "hybrid.safetensors").eval()
    with torch.no_grad():
        assert (model(images) - expected).abs().max() < 1e-4

    arrays = official_npz_arrays(small_timm.state_dict(), model)
    np.savez(tmp_path / "R50+ViT.npz", **arrays)
    loaded = load_model(tmp_path / "R50+ViT.npz")  # everything, image size included, from the arrays
    # ... and it computes as the official Flax code: tanh GELU, Flax weight standardisation (tests/test_reference.py)
    assert loaded.config == dataclasses.replace(model.config, act="gelu_tanh", hybrid_numerics="flax")
    as_timm = load_model(tmp_path / "R50+ViT.npz", act="gelu", hybrid_numerics="timm")
    with torch.no_grad():
        assert (as_timm(images) - expected).abs().max() < 1e-4
    save_weights(loaded, tmp_path / "again.npz", "npz")
    with np.load(tmp_path / "again.npz") as written:
        assert sorted(written.files) == sorted(arrays)
    # timm's StdConv2d cannot compute the Flax standardisation: said when writing, kept for vitlab in the metadata
    with pytest.warns(UserWarning, match="StdConv2d"):
        save_weights(loaded, tmp_path / "timm.safetensors", "timm")
    again = load_model(tmp_path / "timm.safetensors", "vit-b16-r50", embed_dim=64, depth=2, num_heads=2, mlp_dim=256)
    assert (again.config.act, again.config.hybrid_numerics) == ("gelu_tanh", "flax")
    with torch.no_grad():
        assert torch.equal(again(images), loaded(images))
        assert (loaded(images) - as_timm(images)).abs().max() > 1e-5  # the two numerics differ visibly here
    # fine-tuning at a higher resolution resamples the 4×4 position grid to 6×6
    assert load_model(tmp_path / "R50+ViT.npz", img_size=96).pos_embed.shape == (1, 37, 64)


def test_hybrid_mistakes_are_named(small_timm, tmp_path: Path) -> None:
    np.savez(tmp_path / "hybrid.npz", **official_npz_arrays(small_timm.state_dict(), small_vitlab()))
    with pytest.raises(VitlabError, match=r"not hold a vit-b16: patch_size 1 \(file\) vs 16.*hybrid_layers"):
        load_model(tmp_path / "hybrid.npz", "vit-b16")
    with pytest.raises(VitlabError, match="stride 16"):
        vitlab.create_model("vit-b16-r50", img_size=200)
    with pytest.raises(VitlabError, match="hybrid_layers"):
        vitlab.create_model("vit-b16-r50", hybrid_layers=(3, 0))
    with pytest.raises(VitlabError, match="hybrid"):
        save_weights(small_vitlab(), tmp_path / "hf", "hf")


def test_analyze_a_hybrid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = vitlab.create_model("vit-b16-r50", img_size=32, hybrid_layers=(1, 1), num_classes=3, embed_dim=32,
                                depth=2, num_heads=2, mlp_dim=64)
    save_weights(randomised(model, std=0.05), tmp_path / "tiny.safetensors")
    image = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
    assert main(["analyze", str(tmp_path / "tiny.safetensors"), "--images", str(image), "--out",
                 str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "attention_distance.png").is_file()
    assert not (tmp_path / "out" / "embedding_components.png").exists()  # 1×1 filters over ResNet channels
