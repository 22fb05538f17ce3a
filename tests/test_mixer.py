"""MLP-Mixer: the paper's sizes, logits equal to timm's on the same weights, Google's .npz layout, training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from helpers import count
from vitlab import create_model
from vitlab.errors import VitlabError
from vitlab.models.mixer import MixerConfig, MlpMixer
from vitlab.models.registry import config_from_dict, config_to_dict, list_models
from vitlab.train.config import TrainConfig
from vitlab.train.loop import Trainer
from vitlab.weights import load_model, load_weights, npz, save_weights
from vitlab.weights import mixer as mixer_weights

# Parameter counts with the 1000-class head; each equals timm's `mixer_*_224`. Without the head they are the
# paper's Table 1 sizes: S/16 18.0M, S/32 18.6M, B/16 59.1M, B/32 59.5M, L/16 207.2M, L/32 205.9M.
PAPER_COUNTS = {
    "mixer-s16": 18_528_264,
    "mixer-s32": 19_104_624,
    "mixer-b16": 59_880_472,
    "mixer-b32": 60_293_428,
    "mixer-l16": 208_196_168,
    "mixer-l32": 206_939_264,
}
MINI_COUNT = 835_376
TINY = MixerConfig(img_size=(16, 16), patch_size=4, in_chans=3, num_classes=7, embed_dim=24, depth=2,
                   tokens_mlp_dim=12, channels_mlp_dim=96)


def random_mixer(config: MixerConfig = TINY, seed: int = 0) -> MlpMixer:
    """Every parameter random, the zero-initialised head and the LayerNorms included."""
    torch.manual_seed(seed)
    model = MlpMixer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS))
def test_parameter_counts_equal_the_paper_and_timm(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
        reference = timm.create_model(f"mixer_{name.split('-')[1]}_224")
    assert count(model) == PAPER_COUNTS[name] == count(reference)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    config = model.config
    assert config.tokens_mlp_dim * 2 == config.embed_dim and config.channels_mlp_dim == 4 * config.embed_dim


def test_mini_model_is_small_and_registered() -> None:
    assert {"mixer-s16", "mixer-b16", "mixer-l16", "mixer-s32", "mixer-b32", "mixer-l32",
            "mixer-mini-p4-28"} <= set(list_models("mixer"))
    model = create_model("mixer-mini-p4-28")
    assert count(model) == MINI_COUNT
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_logits_equal_timm_on_the_same_weights() -> None:
    torch.manual_seed(0)
    reference = timm.create_model("mixer_b16_224").eval()
    with torch.no_grad():  # timm zeroes the head and sets LayerNorms to 1/0; make them count too
        for name, parameter in reference.named_parameters():
            if name.startswith("head"):
                parameter.normal_(0.0, 0.1)
            elif "norm" in name:
                parameter.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    model = create_model("mixer-b16").eval()
    state = reference.state_dict()
    assert mixer_weights.looks_like_timm(set(state))
    assert mixer_weights.config_from_state_dict(state, "timm") == model.config
    model.load_state_dict(state, strict=True)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference(image)
        features = model.forward_features(image)
        logits = model.forward_head(features)
        pooled = model.forward_head(features, pre_logits=True)
    assert expected.abs().max() > 0.1
    assert (logits - expected).abs().max() < 1e-4
    assert (pooled - reference.forward_head(reference.forward_features(image), pre_logits=True)).abs().max() < 1e-4
    assert features.shape == (1, 196, 768) and model.num_features == 768


def test_npz_round_trip_in_the_official_layout(tmp_path: Path) -> None:
    model = random_mixer(dataclasses.replace(TINY, act="gelu_tanh"))  # .npz files load with Flax's tanh GELU
    arrays = mixer_weights.from_state_dict(model.state_dict(), model.config)
    assert set(arrays) == {
        "stem/kernel", "stem/bias", "pre_head_layer_norm/scale", "pre_head_layer_norm/bias", "head/kernel",
        "head/bias", *(f"MixerBlock_{i}/{part}" for i in range(2) for part in (
            "LayerNorm_0/scale", "LayerNorm_0/bias", "LayerNorm_1/scale", "LayerNorm_1/bias",
            *(f"{mlp}/Dense_{j}/{kind}" for mlp in ("token_mixing", "channel_mixing") for j in range(2)
              for kind in ("kernel", "bias"))))}
    assert arrays["stem/kernel"].shape == (4, 4, 3, 24)  # HWIO
    assert arrays["MixerBlock_0/token_mixing/Dense_0/kernel"].shape == (16, 12)  # (patches, D_S)
    assert arrays["MixerBlock_0/channel_mixing/Dense_1/kernel"].shape == (96, 24)  # (D_C, C)
    path = tmp_path / "Mixer-T_4.npz"
    npz.write_npz(path, arrays)

    state, config = mixer_weights.to_state_dict(npz.read_npz(path), str(path))
    assert config == model.config
    loaded = MlpMixer(config).eval()
    loaded.load_state_dict(state, strict=True)
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(image), model(image))


def test_npz_prefixes_bf16_and_errors() -> None:
    model = random_mixer()
    arrays = mixer_weights.from_state_dict(model.state_dict(), model.config)
    headless = {f"params/{key}": value for key, value in arrays.items() if not key.startswith("head/")}
    state, config = mixer_weights.to_state_dict(headless, "prefixed")
    assert config.num_classes == 0 and "head.weight" not in state
    assert torch.equal(state["blocks.1.mlp_tokens.fc2.weight"], model.blocks[1].mlp_tokens.fc2.weight)

    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = {key: value.astype(ml_dtypes.bfloat16) for key, value in arrays.items()}
    state, _ = mixer_weights.to_state_dict(bf16, "bf16")
    assert torch.allclose(state["stem.proj.weight"], model.stem.proj.weight, rtol=1e-2, atol=1e-2)

    with pytest.raises(VitlabError, match="extra.*no vitlab MLP-Mixer parameter takes"):
        mixer_weights.to_state_dict({**arrays, "MixerBlock_0/extra": np.zeros(3, np.float32)}, "extra")
    with pytest.raises(VitlabError, match="missing array 'MixerBlock_1/LayerNorm_1/bias'"):
        mixer_weights.to_state_dict({k: v for k, v in arrays.items() if k != "MixerBlock_1/LayerNorm_1/bias"}, "f")
    with pytest.raises(VitlabError, match="not an MLP-Mixer checkpoint"):
        mixer_weights.to_state_dict({"embedding/kernel": np.zeros((4, 4, 3, 8), np.float32)}, "vit.npz")
    assert mixer_weights.is_mixer_npz(headless) and not mixer_weights.is_mixer_npz({"cls": np.zeros(1)})


def test_other_input_sizes_are_refused() -> None:
    model = random_mixer()
    with pytest.raises(VitlabError, match=r"16x16 images only .*16 patches\), got 32x32"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(VitlabError, match="not divisible by patch_size"):
        MixerConfig(img_size=30, patch_size=4)


@pytest.mark.parametrize("field, value", [("embed_dim", 0), ("depth", 2.5), ("tokens_mlp_dim", True),
                                          ("num_classes", -1), ("drop_path", 1.5), ("layer_norm_eps", 0.0)])
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(VitlabError, match=field):
        dataclasses.replace(TINY, **{field: value})


def test_config_json_round_trip_and_new_head() -> None:
    config = create_model("mixer-mini-p4-28").config
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["family"] == "mixer" and config_from_dict(data) == config
    model = random_mixer()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.config.num_classes == 3
    assert torch.count_nonzero(model.head.weight) == 0 and model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 24)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = random_mixer()
    images = torch.randn(2, 3, 16, 16)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(images).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


@pytest.mark.slow
def test_trains_with_the_trainer(tmp_path: Path) -> None:
    config = TrainConfig(model="mixer-mini-p4-28", dataset="digits", img_size=8, epochs=2, batch_size=64, lr=3e-3,
                         weight_decay=0.05, warmup_steps=5, out=str(tmp_path), progress=False, eval_every_epochs=1.0,
                         deterministic=True, threads=1)
    result = Trainer(config).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert result["test_top1"] > 0.3  # chance is 0.1


def test_fine_tuning_at_another_resolution_is_refused(tmp_path: Path) -> None:
    weights = save_weights(random_mixer(dataclasses.replace(TINY, in_chans=1, img_size=8, patch_size=2)),
                           tmp_path / "mixer.safetensors")
    config = TrainConfig(init_from=str(weights), dataset="digits", img_size=16, epochs=1, batch_size=64,
                         out=str(tmp_path / "run"), progress=False)
    with pytest.raises(VitlabError, match=r"cannot be carried over to img_size=16: blocks\.0\.mlp_tokens\.fc1\.weight "
                                          r"is \(12, 16\) in the checkpoint but \(12, 64\)"):
        Trainer(config).fit()


def test_load_and_save_through_the_weight_io(tmp_path: Path) -> None:
    model = random_mixer(dataclasses.replace(TINY, act="gelu_tanh"))  # a Google-derived model: every format keeps it
    image = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(image)
    for name, fmt in (("mixer.npz", "npz"), ("mixer_timm.safetensors", "timm"), ("mixer.safetensors", "vitlab")):
        loaded = load_model(save_weights(model, tmp_path / name, format=fmt)).eval()
        assert loaded.config == model.config, fmt
        with torch.no_grad():
            assert torch.equal(loaded(image), expected), fmt
    fresh = load_weights(MlpMixer(dataclasses.replace(TINY, num_classes=3)), tmp_path / "mixer.npz", reset_head=True)
    assert torch.equal(fresh.blocks[1].mlp_channels.fc2.weight, model.blocks[1].mlp_channels.fc2.weight)
    with pytest.raises(VitlabError, match="holds mixer weights"):
        load_weights(create_model("vit-mini-p7-28"), tmp_path / "mixer.npz")
    with pytest.raises(VitlabError, match="does not hold a mixer-s16: patch_size 4 \\(file\\) vs 16"):
        load_model(tmp_path / "mixer.npz", "mixer-s16")
    with pytest.raises(VitlabError, match="hf weights exist only for ViT models"):
        save_weights(model, tmp_path / "hf", format="hf")
