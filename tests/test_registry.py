"""Every registered model: its exact parameter count, and a training step for the small ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitlab
from helpers import count, randomised

# Parameters at the registered size (224 px and a 1000-class head for the paper sizes). A model registered without
# an entry here fails `test_parameter_count`.
EXPECTED_COUNTS = {
    # ViT: the official repo's models_test.py for Ti/16, S/16, B/16, B/32, L/16, H/14 (shared/REFERENCE.md §A);
    # every size equals timm's `vit_{tiny,small,base,large,huge}_patch{P}_224` built with 1000 classes, and
    # Ti/32 (no timm name) equals timm's VisionTransformer with patch 32, width 192, depth 12, 3 heads.
    "vit-ti16": 5_717_416,
    "vit-ti32": 6_131_560,
    "vit-s8": 22_055_272,
    "vit-s16": 22_050_664,
    "vit-s32": 22_878_952,
    "vit-b8": 86_576_872,
    "vit-b16": 86_567_656,
    "vit-b32": 88_224_232,
    "vit-l16": 304_326_632,
    "vit-l32": 306_535_400,
    "vit-h14": 632_045_800,
    # vitlab's small ViTs: no published count; each equals timm's VisionTransformer at the same configuration.
    "vit-mini-p4-28": 805_130,
    "vit-mini-p7-28": 805_130,  # as p4: 33 fewer position rows, 33 more pixels per patch, both of width 128
    "vit-mini-p4-32": 1_806_538,
    # R50+ViT-B/16 hybrid: timm's `vit_base_r50_s16_224`.
    "vit-b16-r50": 98_659_112,
    # MLP-Mixer: the paper's Table 1 sizes plus the 1000-class head, equal to timm's `mixer_*_224`; the small one
    # equals timm's MlpMixer at its configuration.
    "mixer-s16": 18_528_264,
    "mixer-s32": 19_104_624,
    "mixer-b16": 59_880_472,
    "mixer-b32": 60_293_428,
    "mixer-l16": 208_196_168,
    "mixer-l32": 206_939_264,
    "mixer-mini-p4-28": 835_376,
    # BiT: timm's `resnetv2_50x1_bit`; the small one has no published or timm counterpart (vitlab's own count).
    "resnet50-bit": 25_549_352,
    "resnet-bit-mini-28": 865_898,
    # Perceiver: the paper's Table 7 (44.9M with weight sharing), derived layer by layer in test_perceiver.py; the
    # small one is vitlab's own count.
    "perceiver-imagenet": 44_912_254,
    "perceiver-mini-28": 723_660,
}

# Models under this many parameters also run a forward and backward pass on the CPU.
SMALL = 10_000_000


@pytest.mark.parametrize("name", vitlab.list_models())
def test_parameter_count(name: str) -> None:
    assert name in EXPECTED_COUNTS, f"{name} is registered without an expected parameter count in {__file__}"
    with torch.device("meta"):
        model = vitlab.create_model(name)
    assert count(model) == EXPECTED_COUNTS[name]


def test_expected_counts_name_only_registered_models() -> None:
    assert sorted(EXPECTED_COUNTS) == sorted(vitlab.list_models())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", [name for name in vitlab.list_models() if EXPECTED_COUNTS.get(name, SMALL) < SMALL])
def test_small_model_trains_one_step(name: str) -> None:
    """Logits of the configured shape, and a finite, non-zero gradient for every parameter."""
    model = randomised(vitlab.create_model(name)).train()  # random weights: a zero head would zero every gradient
    config = model.config
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_chans, *config.img_size, generator=generator)
    y = torch.randint(0, config.num_classes, (2,), generator=generator)
    logits = model(x)
    assert logits.shape == (2, config.num_classes)
    F.cross_entropy(logits, y).backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name
