"""The ViT family: exact sizes, the uniform API, any input size, and explicit vs fused attention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import vitlab
from helpers import TINY_VIT, count, random_model
from vitlab.errors import VitlabError
from vitlab.models import (
    CROSS_ATTENTION,
    Family,
    build_model,
    capabilities,
    get_family,
    get_spec,
    list_families,
    model_config,
)
from vitlab.models.layers import Attention, resample_position_embedding, sincos_2d_position_embedding

# The official repo's models_test.py and timm give these counts at 224 px with a 1000-class head.
PAPER_COUNTS = {
    "vit-ti16": 5_717_416,
    "vit-s16": 22_050_664,
    "vit-b16": 86_567_656,
    "vit-b32": 88_224_232,
    "vit-l16": 304_326_632,
    "vit-h14": 632_045_800,
}


@pytest.mark.parametrize("name,expected", PAPER_COUNTS.items())
def test_parameter_counts_match_the_official_code(name: str, expected: int) -> None:
    with torch.device("meta"):
        model = vitlab.create_model(name)
    assert count(model) == expected


def test_registry_lists_every_paper_size() -> None:
    names = vitlab.list_models("vit-")
    for name in ("vit-ti16", "vit-s16", "vit-s32", "vit-b16", "vit-b32", "vit-b8", "vit-l16", "vit-l32", "vit-h14"):
        assert name in names


def test_unknown_model_and_option_are_named() -> None:
    with pytest.raises(VitlabError, match="vit-b61"):
        vitlab.create_model("vit-b61")
    with pytest.raises(VitlabError, match="embed_dimm"):
        vitlab.create_model("vit-ti16", embed_dimm=3)
    with pytest.raises(VitlabError, match="not divisible"):
        vitlab.create_model("vit-ti16", img_size=100)


def test_head_is_zero_initialised_and_reset_classifier_replaces_it() -> None:
    model = vitlab.create_model("vit-mini-p4-28")
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    model.reset_classifier(3)
    assert model.head.out_features == 3 and model.config.num_classes == 3
    assert torch.count_nonzero(model.head.weight) == 0
    model.reset_classifier(0)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, model.num_features)


def test_uniform_api_shapes() -> None:
    model = random_model(representation_size=24)
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, 1 + 16, 32)
    assert model.forward_head(features, pre_logits=True).shape == (2, 24)
    assert torch.allclose(model.forward_head(features), model(x))


@pytest.mark.parametrize("pool,posemb", [("token", "learned"), ("gap", "sincos2d"), ("token", "none"),
                                         ("gap", "learned")])
def test_explicit_attention_equals_fused_path(pool: str, posemb: str) -> None:
    model = random_model(pool=pool, posemb=posemb)
    x = torch.randn(3, 3, 32, 32)
    logits, attentions = model(x, return_attention=True)
    assert torch.allclose(logits, model(x), atol=1e-5)
    assert len(attentions) == 2
    tokens = 16 + (pool == "token")
    assert attentions[0].shape == (3, 4, tokens, tokens)
    # The probabilities are softmax(QK^T / sqrt(d)) of the block's own projections.
    block = model.blocks[0]
    h = block.norm1(model.embed(x))
    q, k, _ = block.attn.qkv(h).reshape(3, tokens, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
    assert torch.allclose(attentions[0], expected, atol=1e-6)
    assert torch.allclose(attentions[1].sum(-1), torch.ones(3, 4, tokens), atol=1e-5)


def test_rectangular_and_resized_inputs_run() -> None:
    model = random_model(img_size=(32, 48))
    assert model.pos_embed.shape == (1, 1 + 4 * 6, 32)
    assert model(torch.randn(1, 3, 32, 48)).shape == (1, 5)
    # At run time the learned embedding is resampled in 2D to any divisible size.
    assert model(torch.randn(1, 3, 64, 24)).shape == (1, 5)
    with pytest.raises(VitlabError, match="not divisible"):
        model(torch.randn(1, 3, 30, 48))


def test_official_resampling_is_bilinear_align_corners() -> None:
    grid = torch.arange(9.0).reshape(1, 3, 3, 1)
    posemb = torch.cat([torch.full((1, 1, 1), -1.0), grid.reshape(1, 9, 1)], dim=1)
    resized = resample_position_embedding(posemb, (5, 5), 1, mode="official")
    assert resized[0, 0, 0] == -1.0  # the class row is kept as is
    new = resized[0, 1:, 0].reshape(5, 5)
    # align_corners=True keeps the corners and puts exact midpoints in between (scipy zoom order=1).
    expected = torch.tensor([[0, .5, 1, 1.5, 2], [1.5, 2, 2.5, 3, 3.5], [3, 3.5, 4, 4.5, 5],
                             [4.5, 5, 5.5, 6, 6.5], [6, 6.5, 7, 7.5, 8]])
    assert torch.allclose(new, expected)
    same = resample_position_embedding(posemb, (3, 3), 1, mode="bicubic")
    assert torch.equal(same, posemb)


def test_runtime_resampling_matches_explicit_resample() -> None:
    model = random_model()
    x = torch.randn(1, 3, 48, 48)
    expected = resample_position_embedding(model.pos_embed, (6, 6), 1, (4, 4), mode="official")
    assert torch.allclose(model.position_embedding((6, 6)), expected)
    assert model(x).shape == (1, 5)


def test_sincos2d_embedding_is_big_vision_layout() -> None:
    table = sincos_2d_position_embedding(2, 3, 8)
    assert table.shape == (6, 8)
    # First quarter is sin(x * omega) with omega[0] = 1: x coordinates 0,1,2 repeat along rows.
    assert torch.allclose(table[:, 0], torch.tensor([0.0, 1, 2, 0, 1, 2]).sin())
    assert torch.allclose(table[:, 4], torch.tensor([0.0, 0, 0, 1, 1, 1]).sin())


def test_drop_path_and_dropout_only_in_training() -> None:
    model = random_model(drop_path=0.5, dropout=0.3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.equal(first, model(x))


def test_matches_timm_on_the_same_weights() -> None:
    timm = pytest.importorskip("timm")
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=(64, 96)).eval()
    for param in reference.parameters():
        torch.nn.init.normal_(param, std=0.05)
    model = vitlab.create_model("vit-ti16", num_classes=7, img_size=(64, 96)).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 96)
    assert torch.allclose(model(x), reference(x), atol=1e-4)


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_patch_dropout_keeps_a_random_subset_of_patch_tokens_in_training_only(pool: str) -> None:
    config = dataclasses.replace(TINY_VIT, img_size=(32, 32), patch_size=4, pool=pool, patch_dropout=0.5)
    model = random_model(config)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        embedded = model.embed(x)
        prefix = model.num_prefix_tokens
        model.train()
        torch.manual_seed(1)
        kept = model.drop_patches(embedded)
        assert kept.shape == (3, prefix + 32, 32)  # half of the 8×8 grid
        assert torch.equal(kept[:, :prefix], embedded[:, :prefix])
        for image in range(3):  # every kept token is one of the image's own tokens, none twice
            rows = [int(torch.nonzero((embedded[image, prefix:] == token).all(dim=1))[0])
                    for token in kept[image, prefix:]]
            assert len(set(rows)) == 32
        torch.manual_seed(1)
        assert model(x).shape == (3, 5)
        model.eval()
        assert model.forward_features(x).shape == (3, prefix + 64, 32)


def test_patch_dropout_must_be_a_probability() -> None:
    with pytest.raises(VitlabError, match="patch_dropout"):
        dataclasses.replace(TINY_VIT, patch_dropout=1.5)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model = random_model().train()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed, rtol=1e-5, atol=1e-6)


def test_patch_kernel_init_is_lecun_normal_truncated_at_two_std() -> None:
    torch.manual_seed(0)
    model = vitlab.create_model("vit-b16", num_classes=0)
    weight = model.patch_embed.proj.weight  # fan-in 3·16·16 = 768
    assert abs(weight.std().item() - 768 ** -0.5) < 0.01 * 768 ** -0.5
    assert weight.abs().max().item() <= 2 * 768 ** -0.5 / .87962566103423978 + 1e-7


@pytest.mark.parametrize("batch", [1, Attention.EXPLICIT_MIN_BATCH])
@pytest.mark.parametrize("tokens", [9, Attention.KEY_MAJOR_MAX_TOKENS, Attention.EXPLICIT_MAX_TOKENS,
                                    Attention.EXPLICIT_MAX_TOKENS + 1, 50])
def test_attention_equals_sdpa_on_either_side_of_the_short_sequence_paths(tokens: int, batch: int) -> None:
    torch.manual_seed(0)
    attention = Attention(32, num_heads=4).eval()
    x = torch.randn(batch, tokens, 32)
    q, k, v = attention.qkv(x).reshape(batch, tokens, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = attention.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, 32))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)
    out, probs = attention(x, return_attention=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, (q @ k.transpose(-2, -1) * 8 ** -0.5).softmax(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("batch", "tokens", "sdpa"), [
    (1, 9, True), (Attention.EXPLICIT_MIN_BATCH - 1, 9, True), (Attention.EXPLICIT_MIN_BATCH, 9, False),
    (Attention.EXPLICIT_MIN_BATCH, Attention.EXPLICIT_MAX_TOKENS, False),
    (Attention.EXPLICIT_MIN_BATCH, Attention.EXPLICIT_MAX_TOKENS + 1, True)])
@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_attention_calls_sdpa_for_short_sequences_only_in_small_batches(
        batch: int, tokens: int, sdpa: bool, bf16: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32: SDPA except for short sequences from EXPLICIT_MIN_BATCH up; bf16: SDPA only for short sequences in
    small batches."""
    calls = []
    fused = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return fused(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        Attention(32, num_heads=4)(torch.randn(batch, tokens, 32))
    short_in_small_batch = tokens <= Attention.EXPLICIT_MAX_TOKENS and batch < Attention.EXPLICIT_MIN_BATCH
    assert bool(calls) == (short_in_small_batch if bf16 else sdpa)


@pytest.mark.parametrize("tokens", [9, 50, 197])
def test_bf16_attention_on_cpu_takes_the_explicit_path_and_matches_fp32(tokens: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU bf16 autocast, SDPA's flash kernel (slow bf16 backward there) is not called at any length, and
    the explicit bf16 path stays within bf16's precision of the fp32 result, gradients included."""
    torch.manual_seed(0)
    attention = Attention(64, num_heads=2)
    x = torch.randn(Attention.EXPLICIT_MIN_BATCH, tokens, 64, requires_grad=True)
    expected = attention(x)
    expected.square().sum().backward()
    expected_grad, x.grad = x.grad.clone(), None

    def refuse(*args, **kwargs):
        raise AssertionError("SDPA called under CPU bf16 autocast")

    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(x)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.02)
    assert (x.grad - expected_grad).norm() < 0.05 * expected_grad.norm()


@pytest.mark.parametrize("family", list_families(), ids=lambda family: family.name)
def test_each_family_declares_what_generic_code_needs(family: Family) -> None:
    """A family's declaration names real config fields, builds its own models, and its analysis capabilities
    match what those models return with `return_attention=True`."""
    fields = {field.name for field in dataclasses.fields(family.config_type)}
    assert set(family.architecture_fields) <= fields
    name = next(name for name in vitlab.list_models() if get_spec(name).family == family.name and "mini" in name)
    config = model_config(name)
    model = build_model(config)
    assert type(family.build(config)) is type(model) and get_family(config) is family
    assert capabilities(model) == family.capabilities
    images = torch.randn(1, config.in_chans, *config.img_size)
    if family.capabilities:
        _, maps = model.eval()(images, return_attention=True)
        cross = CROSS_ATTENTION in family.capabilities
        queries = config.num_latents if cross else model.num_prefix_tokens + math.prod(config.grid_size)
        assert maps[0].shape[-2] == queries
    assert capabilities(torch.nn.Linear(1, 1)) == frozenset()


def test_activation_is_part_of_the_config_and_saved_with_it() -> None:
    config = dataclasses.replace(TINY_VIT, act="gelu_tanh")
    data = vitlab.models.config_to_dict(config)
    assert data["act"] == "gelu_tanh" and vitlab.models.config_from_dict(data) == config
    del data["act"]  # files written before the field existed load with the exact GELU they were computed with
    assert vitlab.models.config_from_dict(data).act == "gelu"
    model, tanh = random_model(TINY_VIT), random_model(config)
    assert tanh.blocks[0].mlp.act.approximate == "tanh" and model.blocks[0].mlp.act.approximate == "none"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert 1e-6 < (model(x) - tanh(x)).abs().max() < 1e-2  # the same weights, a slightly different function
        model.set_numerics(act="gelu_tanh")
        assert torch.equal(model(x), tanh(x)) and model.config == config
    with pytest.raises(VitlabError, match="act must be one of"):
        vitlab.create_model("vit-ti16", act="relu")
