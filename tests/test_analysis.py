"""vitlab.analysis: attention maps, rollout, attention distance and embedding structure on tiny, handmade models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from helpers import tiny_vit
from vitlab import VitlabError
from vitlab.analysis import (
    attention_maps,
    attention_rollout,
    mean_attention_distance,
    patch_embedding_components,
    position_embedding_similarity,
    rollout_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def images(batch: int = 2, height: int = 28, width: int = 28, channels: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def make_self_attending(model: torch.nn.Module) -> torch.nn.Module:
    """Every head of every layer attends only to the query token itself, through the real attention code.

    Token t enters as the zero-mean vector e_t - 1/d (repeated in each head's d dims) via the position embedding
    (patch embedding and class token zeroed). Norm1 keeps these as they are up to scale; q = k = c·x makes the
    score of a token with itself exceed every other score by c²/σ²/√d, far past where exp underflows, so the
    softmax is exactly one-hot. Zero attention-output and MLP-output projections keep the tokens fixed, so
    every layer sees the same input.
    """
    dim, heads = model.config.embed_dim, model.config.num_heads
    head_dim = dim // heads
    tokens = model.pos_embed.shape[1]
    assert tokens <= head_dim
    basis = torch.eye(head_dim)[:tokens] - 1.0 / head_dim
    model.pos_embed.copy_(basis.repeat(1, heads)[None])
    model.patch_embed.proj.weight.zero_()
    model.patch_embed.proj.bias.zero_()
    if model.cls_token is not None:
        model.cls_token.zero_()
    for block in model.blocks:
        block.attn.qkv.weight.zero_()
        block.attn.qkv.bias.zero_()
        block.attn.qkv.weight[:2 * dim] = 100.0 * torch.eye(dim).repeat(2, 1)
        for linear in (block.attn.proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    return model


@torch.no_grad()
def make_uniform(model: torch.nn.Module) -> torch.nn.Module:
    """Zero query and key projections: every score is 0, so every token attends uniformly to all T tokens."""
    dim = model.config.embed_dim
    for block in model.blocks:
        block.attn.qkv.weight[:2 * dim] = 0.0
        block.attn.qkv.bias[:2 * dim] = 0.0
    return model


def mean_pairwise_distance(grid: tuple[int, int], patch: int) -> float:
    centres = [(row * patch, col * patch) for row in range(grid[0]) for col in range(grid[1])]
    pairs = list(itertools.product(centres, centres))
    return sum(math.dist(a, b) for a, b in pairs) / len(pairs)


# --- attention_maps -----------------------------------------------------------------------------------------------


def test_attention_maps_shape_eval_mode_and_restores_training():
    model = tiny_vit(attn_dropout=0.5).train()
    x = images(3)
    maps = attention_maps(model, x)
    assert maps.shape == (2, 3, 4, 17, 17)  # (L, B, H, T, T): 4x4 grid + class token
    assert model.training  # put back as it was
    assert not maps.requires_grad
    assert torch.equal(maps, attention_maps(model, x))  # no attention dropout although the model is training
    assert torch.allclose(maps.sum(-1), torch.ones(()), atol=1e-5)


def test_explicit_attention_equals_softmax_recomputed_from_qkv_weights():
    model = tiny_vit("vit-mini-p4-28", depth=3)
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for block in model.blocks]
    maps = attention_maps(model, images(2))
    for hook in hooks:
        hook.remove()
    heads, head_dim = model.config.num_heads, model.config.embed_dim // model.config.num_heads
    for layer, (block, x) in enumerate(zip(model.blocks, inputs, strict=True)):
        batch, tokens, dim = x.shape
        h = torch.nn.functional.layer_norm(x, (dim,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
        q, k, _ = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        torch.testing.assert_close(maps[layer], expected, atol=1e-6, rtol=1e-5)


def test_attention_maps_rejects_wrong_channels():
    with pytest.raises(VitlabError, match="channels"):
        attention_maps(tiny_vit(), images(channels=3))


# --- rollout ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.95])
def test_rollout_of_self_attention_is_identity_and_class_map_is_zero(discard_ratio):
    # Fused attention I, so each layer is (I + I) / 2 = I and the rollout is I: the class token's row keeps all
    # of its mass on itself and gives exactly nothing to the patches.
    model = make_self_attending(tiny_vit())
    assert torch.equal(attention_maps(model, images()), torch.eye(17).expand(2, 2, 4, 17, 17))
    heatmap, matrix = attention_rollout(model, images(), discard_ratio=discard_ratio, return_matrix=True)
    assert torch.equal(matrix, torch.eye(17).expand(2, 17, 17))
    assert torch.equal(heatmap, torch.zeros(2, 4, 4))


def test_rollout_of_self_attention_without_class_token_is_uniform():
    # GAP: no prefix token, the map is the mean row of I, i.e. exactly 1/N on every patch.
    model = make_self_attending(tiny_vit(pool="gap"))
    assert model.num_prefix_tokens == 0
    heatmap = attention_rollout(model, images())
    assert torch.equal(heatmap, torch.full((2, 4, 4), 1.0 / 16))


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3, 0.9])
def test_rollout_rows_stay_stochastic(head_fusion, discard_ratio):
    model = tiny_vit("vit-mini-p4-28", depth=3)
    heatmap, matrix = attention_rollout(model, images(2), head_fusion, discard_ratio, return_matrix=True)
    assert matrix.shape == (2, 50, 50) and heatmap.shape == (2, 7, 7)
    assert (matrix >= 0).all()
    torch.testing.assert_close(matrix.sum(-1), torch.ones(2, 50), atol=1e-6, rtol=0)
    # the map is the class token's row over the patches, in raster order, not re-normalised
    assert torch.equal(heatmap.flatten(1), matrix[:, 0, 1:])
    assert (heatmap.sum((1, 2)) < 1).all()


def test_rollout_matches_naive_product_of_half_attention_plus_half_identity():
    model = tiny_vit("vit-mini-p4-28", depth=3)
    maps = attention_maps(model, images(2)).double()
    expected = torch.eye(50, dtype=torch.float64).expand(2, 50, 50)
    for layer in maps:
        expected = (0.5 * layer.mean(1) + 0.5 * torch.eye(50, dtype=torch.float64)) @ expected
    torch.testing.assert_close(rollout_matrix(maps, "mean").double(), expected)


def test_rollout_discards_the_lowest_weights_but_never_the_class_tokens_own():
    torch.manual_seed(3)
    attention = torch.rand(1, 1, 1, 10, 10)
    attention[..., 0, 0] = 1e-4  # the smallest weight of all: would go first if it were not protected
    attention = attention / attention.sum(-1, keepdim=True)
    matrix = rollout_matrix(attention, discard_ratio=0.5)[0]
    # independently: drop the int(100 · 0.5) = 50 smallest entries other than (0, 0), add I, re-normalise rows
    flat = attention[0, 0, 0].flatten().clone()
    lowest = flat[1:].argsort()[:50] + 1
    flat[lowest] = 0.0
    expected = flat.reshape(10, 10) + torch.eye(10)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(matrix, expected)
    assert int((flat == 0).sum()) == 50 and flat[0] > 0
    torch.testing.assert_close(matrix.sum(-1), torch.ones(10))


def test_rollout_on_rectangular_grid():
    model = tiny_vit("vit-mini-p4-28")
    heatmap, matrix = attention_rollout(model, images(2, 28, 20), return_matrix=True)
    assert heatmap.shape == (2, 7, 5)
    assert torch.equal(heatmap.flatten(1), matrix[:, 0, 1:])


def test_rollout_rejects_bad_arguments():
    model = tiny_vit()
    with pytest.raises(VitlabError, match="head_fusion"):
        attention_rollout(model, images(), head_fusion="median")
    with pytest.raises(VitlabError, match="discard_ratio"):
        attention_rollout(model, images(), discard_ratio=1.0)


# --- mean attention distance --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_attention_distance_of_self_attention_is_zero(pool):
    model = make_self_attending(tiny_vit(pool=pool))
    distance = mean_attention_distance(model, images(3))
    assert distance.shape == (2, 4)
    assert torch.equal(distance, torch.zeros(2, 4))


@pytest.mark.parametrize("name,size,grid,pool", [("vit-mini-p7-28", (28, 28), (4, 4), "token"),
                                                  ("vit-mini-p4-28", (28, 20), (7, 5), "token"),
                                                  ("vit-mini-p4-28", (28, 28), (7, 7), "gap")])
def test_attention_distance_of_uniform_attention_is_mean_pairwise_patch_distance(name, size, grid, pool):
    model = make_uniform(tiny_vit(name, pool=pool))
    expected = mean_pairwise_distance(grid, model.config.patch_size)
    distance = mean_attention_distance(model, images(5, *size), batch_size=2)  # several chunks, uneven last one
    torch.testing.assert_close(distance, torch.full((2, model.config.num_heads), expected), atol=1e-4, rtol=1e-6)


def test_attention_distance_batches_agree():
    model = tiny_vit("vit-mini-p4-28")
    x = images(5)
    torch.testing.assert_close(mean_attention_distance(model, x, batch_size=2), mean_attention_distance(model, x))


# --- embeddings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,overrides,grid", [("vit-mini-p4-28", {}, None),
                                                 ("vit-mini-p4-28", {}, (5, 3)),   # rectangular, resampled
                                                 ("vit-mini-p4-28", {}, (9, 9)),   # larger, resampled
                                                 ("vit-mini-p4-28", {"img_size": (28, 16)}, None),
                                                 ("vit-mini-p4-28", {"posemb": "sincos2d"}, (3, 6)),
                                                 ("vit-mini-p4-28", {"pool": "gap"}, (6, 4))])
def test_position_similarity_diagonal_is_one_and_layout_is_raster(name, overrides, grid):
    model = tiny_vit(name, **overrides)
    similarity = position_embedding_similarity(model, grid)
    rows, columns = grid or model.config.grid_size
    assert similarity.shape == (rows, columns, rows, columns)
    flat = similarity.reshape(rows * columns, rows * columns)
    torch.testing.assert_close(flat.diagonal(), torch.ones(rows * columns))
    torch.testing.assert_close(flat, flat.T)
    posemb = model.position_embedding((rows, columns))[0, -rows * columns:]  # patch rows, no class row
    a, b = (1, columns - 1), (rows - 1, 0)
    expected = torch.cosine_similarity(posemb[a[0] * columns + a[1]], posemb[b[0] * columns + b[1]], dim=0)
    torch.testing.assert_close(similarity[a[0], a[1], b[0], b[1]], expected)


def test_position_similarity_errors():
    with pytest.raises(VitlabError, match="posemb 'none'"):
        position_embedding_similarity(tiny_vit(posemb="none"))
    with pytest.raises(VitlabError, match="grid"):
        position_embedding_similarity(tiny_vit(), (0, 3))


@pytest.mark.parametrize("name,k,expected", [("vit-mini-p7-28", 28, 28), ("vit-mini-p4-28", 28, 16),
                                             ("vit-mini-p4-32", 5, 5)])
def test_patch_embedding_components_are_orthonormal_and_capped_at_rank(name, k, expected):
    model = tiny_vit(name)
    components = patch_embedding_components(model, k)
    patch, channels = model.config.patch_size, model.config.in_chans
    assert components.shape == (expected, channels, patch, patch)
    flat = components.reshape(expected, -1).double()
    torch.testing.assert_close(flat @ flat.T, torch.eye(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    # principal: the filters' variance along the components comes out in decreasing order
    filters = model.patch_embed.proj.weight.detach().reshape(model.config.embed_dim, -1).double()
    variance = ((filters - filters.mean(0)) @ flat.T).var(0)
    assert (variance[:-1] >= variance[1:] - 1e-9).all()
    torch.testing.assert_close(components, patch_embedding_components(model, k))  # signs are deterministic


def test_patch_embedding_components_rejects_bad_k():
    with pytest.raises(VitlabError, match="k must be"):
        patch_embedding_components(tiny_vit(), 0)
