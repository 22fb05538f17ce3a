"""Perceiver: the paper's ImageNet parameter counts, Fourier features, cross-attention maps, training."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import count, one_error_line
from vitlab import create_model
from vitlab.analysis import cross_attention_maps
from vitlab.cli import main
from vitlab.commands.analyze import load_images
from vitlab.errors import VitlabError
from vitlab.models.perceiver import Perceiver, PerceiverConfig, fourier_position_features
from vitlab.models.registry import config_from_dict, config_to_dict, list_models
from vitlab.train.config import TrainConfig
from vitlab.train.loop import Trainer
from vitlab.weights import load_model, save_weights

# Paper Table 7: 44.9M with weight sharing, 326.2M without. Analytically: latents 512·1024 = 524,288; a cross-attend
# (LayerNorms on 1024 latent and 261 input channels, q/k/v of width 261, output back to 1024, a dense block of
# widening 1) 2,776,395; a latent self-attention block 6,301,696; the 1000-class head 1,025,000.
SHARED_COUNT = 524_288 + 2 * 2_776_395 + 6 * 6_301_696 + 1_025_000
UNSHARED_COUNT = 524_288 + 8 * 2_776_395 + 8 * 6 * 6_301_696 + 1_025_000
MINI_COUNT = 723_660
TINY = PerceiverConfig(img_size=(12, 12), in_chans=3, num_classes=5, num_latents=8, latent_dim=32,
                       num_cross_attends=3, latent_blocks=2, latent_heads=4, mlp_ratio=2.0, num_bands=6,
                       max_resolution=12)


def random_perceiver(config: PerceiverConfig = TINY, seed: int = 0) -> Perceiver:
    torch.manual_seed(seed)
    model = Perceiver(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def test_imagenet_model_has_the_papers_parameter_count() -> None:
    with torch.device("meta"):
        model = create_model("perceiver-imagenet")
    assert count(model) == SHARED_COUNT == 44_912_254
    assert f"{count(model) / 1e6:.1f}M" == "44.9M"
    config = model.config
    assert (config.num_latents, config.latent_dim, config.num_cross_attends, config.latent_blocks) == (512, 1024, 8, 6)
    assert (config.cross_heads, config.latent_heads, config.mlp_ratio) == (1, 8, 1.0)
    assert config.input_channels == 261 and config.cross_attention_dim == 261
    # the first cross-attend is unique, cross-attends 2..8 share one set, the towers share one set of 6 blocks
    assert len(model.cross_attends) == 2 and len(model.towers) == 1 and len(model.towers[0]) == 6


def test_without_weight_sharing_it_has_326_million_parameters() -> None:
    with torch.device("meta"):
        model = create_model("perceiver-imagenet", share_weights=False)
    assert count(model) == UNSHARED_COUNT == 326_241_856
    assert f"{count(model) / 1e6:.1f}M" == "326.2M"
    assert len(model.cross_attends) == 8 and len(model.towers) == 8


def test_mini_model_is_small_and_registered() -> None:
    assert {"perceiver-imagenet", "perceiver-mini-28"} <= set(list_models("perceiver"))
    model = create_model("perceiver-mini-28")
    assert count(model) == MINI_COUNT
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_fourier_features_follow_the_paper() -> None:
    bands, height, width = 64, 224, 224
    features = fourier_position_features(height, width, bands, max_resolution=224, dtype=torch.float64)
    assert features.shape == (height * width, 2 * (2 * bands + 1)) == (50_176, 258)
    grid = features.reshape(height, width, -1)
    rows, cols = grid[..., 0], grid[..., 2 * bands + 1]  # the raw coordinates, one per spatial dimension
    assert rows.min() == -1.0 and rows.max() == 1.0 and cols.min() == -1.0 and cols.max() == 1.0
    assert torch.equal(rows[:, 0], torch.linspace(-1, 1, height, dtype=torch.float64))  # rows vary down the image
    assert torch.equal(cols[0], torch.linspace(-1, 1, width, dtype=torch.float64))
    freqs = torch.linspace(1.0, 112.0, bands, dtype=torch.float64)  # linear from 1 to max_resolution / 2
    x = cols[5, 17]
    assert torch.allclose(grid[5, 17, 2 * bands + 2:3 * bands + 2], torch.sin(math.pi * freqs * x))
    assert torch.allclose(grid[5, 17, 3 * bands + 2:], torch.cos(math.pi * freqs * x))
    assert torch.allclose(grid[5, 17, 1:bands + 1], torch.sin(math.pi * freqs * rows[5, 17]))
    # the last column sits exactly at x = 1
    assert torch.allclose(grid[0, -1, 3 * bands + 2:], torch.cos(math.pi * freqs))


def test_cross_attention_maps_are_distributions_over_the_pixels() -> None:
    model = random_perceiver()
    images = torch.randn(2, 3, 12, 10)  # any size: the Fourier features follow the input's own grid
    maps = cross_attention_maps(model, images)
    assert maps.shape == (3, 2, 1, 8, 12 * 10)  # (cross-attends, images, heads, latents, H*W)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(3, 2, 1, 8))
    assert (maps >= 0).all()
    with torch.no_grad():
        logits, attentions = model(images, return_attention=True)
        assert torch.allclose(logits, model(images), atol=1e-5)  # the explicit path equals the fused kernel
    assert len(attentions) == 3 and not model.training


def test_shared_cross_attend_reuses_its_weights() -> None:
    model = random_perceiver()
    images = torch.randn(1, 3, 12, 12)
    model(images).sum().backward()
    # cross-attends 2 and 3 are the same module, so its gradient collects both uses
    assert len(model.cross_attends) == 2 and all(p.grad is not None for p in model.parameters())
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    model(images).sum().backward()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), grads, strict=True))
    unshared = random_perceiver(dataclasses.replace(TINY, share_weights=False))
    assert len(unshared.cross_attends) == 3 and len(unshared.towers) == 3


def test_input_errors_and_other_resolutions() -> None:
    model = random_perceiver()
    with pytest.raises(VitlabError, match=r"\(B, 3, H, W\) images, got shape \(1, 1, 12, 12\)"):
        model(torch.randn(1, 1, 12, 12))
    with pytest.raises(VitlabError, match="1 channels but the model expects 3"):
        cross_attention_maps(model, torch.randn(1, 3, 12))
    with pytest.raises(VitlabError, match="needs a Perceiver"):
        cross_attention_maps(create_model("vit-mini-p7-28"), torch.randn(1, 1, 28, 28))
    assert model(torch.randn(1, 3, 20, 16)).shape == (1, 5)


@pytest.mark.parametrize("field, value", [("num_latents", 0), ("latent_dim", 1.5), ("cross_heads", 7),
                                          ("latent_heads", 3), ("mlp_ratio", -1.0), ("share_weights", 1),
                                          ("num_classes", -2), ("num_bands", 0)])
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(VitlabError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_saved_weights_reload_with_equal_logits(tmp_path: Path) -> None:
    model = random_perceiver()
    data = json.loads(json.dumps(config_to_dict(model.config)))
    assert data["family"] == "perceiver" and config_from_dict(data) == model.config
    loaded = load_model(save_weights(model, tmp_path / "perceiver.safetensors")).eval()
    images = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    model.reset_classifier(2)
    assert model.num_classes == 2 and torch.count_nonzero(model.head.weight) == 0
    assert model.forward_head(model.forward_features(images), pre_logits=True).shape == (2, 32)


@pytest.mark.slow
def test_trains_with_the_trainer(tmp_path: Path) -> None:
    # 16 latents instead of 64 keep the run to a few seconds on one thread
    config = TrainConfig(model="perceiver-mini-28", model_overrides={"num_latents": 16}, dataset="digits", img_size=8,
                         epochs=2, batch_size=64, lr=2e-3, weight_decay=0.05, warmup_steps=5, out=str(tmp_path),
                         progress=False, eval_every_epochs=1.0, deterministic=True, threads=1)
    result = Trainer(config).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result["test_top1"] > 0.3  # chance is 0.1


def test_fine_tunes_at_another_resolution(tmp_path: Path) -> None:
    weights = save_weights(random_perceiver(), tmp_path / "perceiver.safetensors")  # 12 px, 5 classes, RGB
    config = TrainConfig(init_from=str(weights), dataset="digits", img_size=16, epochs=0.1, batch_size=64,
                         out=str(tmp_path / "run"), progress=False, threads=1)
    Trainer(config).fit()
    tuned = load_model(tmp_path / "run").eval()
    assert tuned.config.img_size == (16, 16) and tuned.config.num_classes == 10
    assert tuned(torch.randn(1, 3, 16, 16)).shape == (1, 10)


def perceiver_checkpoint(directory: Path) -> Path:
    """perceiver-mini-28 with 16 latents and random weights (a fresh one attends almost evenly), saved for the CLI."""
    torch.manual_seed(0)
    model = create_model("perceiver-mini-28", num_latents=16).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return save_weights(model, directory / "perceiver.safetensors")


@pytest.mark.usefixtures("one_thread")
def test_analyze_draws_the_cross_attention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = perceiver_checkpoint(tmp_path)
    rng = np.random.default_rng(0)
    paths = [tmp_path / "rgb.png", tmp_path / "gray.png"]  # both become the model's 28×28 gray input
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(paths[1])
    out = tmp_path / "report"
    assert main(["analyze", str(checkpoint), "--images", *map(str, paths), "--out", str(out)]) == 0, \
        capsys.readouterr().err
    pngs = ["cross_attention_0.png", "cross_attention_1.png", "cross_attention_entropy.png"]
    assert sorted(path.name for path in out.glob("*.png")) == pngs
    page = (out / "index.html").read_text()
    assert all(f'src="{name}"' in page for name in pngs)
    numbers = json.loads((out / "analysis.json").read_text())
    summary = numbers["cross_attention_entropy"]["data"]
    assert summary["shape"] == [2, 2, 1, 16, 28 * 28]  # cross-attends, images, heads, latents, pixels
    entropy = np.array(summary["entropy"])
    assert entropy.shape == (2,) and np.isfinite(entropy).all()
    assert (entropy > 0).all() and (entropy < math.log(28 * 28)).all()
    # the numbers are the library's maps for the saved model on the prepared images
    maps = cross_attention_maps(load_model(checkpoint), load_images(paths, 1, (28, 28))).double()
    assert np.allclose(entropy, -torch.special.xlogy(maps, maps).sum(-1).mean(dim=(1, 2, 3)).numpy(), atol=1e-6)
    latents = np.array(numbers["cross_attention_0"]["data"]["latents"])
    assert latents.shape == (2, 8) and len(set(latents[0])) == 8

    assert main(["analyze", str(checkpoint), "--images", str(paths[0]), "--head", "1", "--out", str(out)]) == 2
    one_error_line(capsys, "--head must be in [0, 0]", "cross-attention")


def test_analyze_refuses_a_resnet_naming_the_supported_families(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_weights(create_model("resnet-bit-mini-28"), tmp_path / "resnet.safetensors")
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 128).save(image)
    assert main(["analyze", str(checkpoint), "--images", str(image), "--out", str(tmp_path / "report")]) == 2
    one_error_line(capsys, "Vision Transformers and Perceivers", "ResNet")
