"""What the attention layers do: raw maps, attention rollout and mean attention distance (ViT paper, Fig. 6-7).

Everything here goes through the model's `forward(x, return_attention=True)` path, which multiplies the same Q
and K the fused kernel uses, so normal training and inference stay on `scaled_dot_product_attention`.
Attention tensors are stacked as (L, B, H, T, T): layer, image, head, query token, key token, where the first
`model.num_prefix_tokens` tokens are the class token (if any) and the rest are patches in raster order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models import CROSS_ATTENTION, capabilities

HEAD_FUSIONS = ("mean", "max", "min")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the caller's train/eval state is put back afterwards,
    so analysing a model mid-training neither drops attention out nor flips it to eval for good."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) on the model's device and dtype; a single (C, H, W) image becomes a batch of one."""
    if not isinstance(images, torch.Tensor):
        raise VitlabError(f"images must be a tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] == 0:
        raise VitlabError(f"images must have shape (B, C, H, W) with B >= 1, got {tuple(images.shape)}")
    in_chans = model.config.in_chans
    if images.shape[1] != in_chans:
        raise VitlabError(f"images have {images.shape[1]} channels but the model expects {in_chans}")
    parameter = next(model.parameters())
    return images.to(device=parameter.device, dtype=parameter.dtype)


def patch_grid(model: nn.Module, images: torch.Tensor) -> tuple[int, int]:
    """The (rows, columns) patch grid these images produce in this model."""
    return tuple(model.grid_size_for(*images.shape[-2:]))  # type: ignore[return-value]


def attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Every layer's and head's attention probabilities, shape (L, B, H, T, T), rows summing to 1.

    Layers come first so `maps[i]` is layer i's (B, H, T, T) tensor, as `forward(return_attention=True)` returns
    them. Computed in eval mode (no attention dropout) without gradients.
    """
    images = _check_images(model, images)
    with _eval_mode(model):
        _, attentions = model(images, return_attention=True)
    return torch.stack(attentions)


def cross_attention_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """A Perceiver's attention from its latents to the pixels at every cross-attend, shape (S, B, heads, N, H*W):
    cross-attend, image, head, latent, pixel in raster order; each latent's row sums to 1 (paper Fig. 3 and 7
    show these maps). Computed in eval mode without gradients."""
    if CROSS_ATTENTION not in capabilities(model):
        raise VitlabError(f"cross_attention_maps needs a Perceiver, got {type(model).__name__}")
    images = _check_images(model, images)
    with _eval_mode(model):
        _, attentions = model(images, return_attention=True)
    return torch.stack(attentions)


def _fuse_heads(attentions: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return attentions.mean(dim=2)
    if head_fusion == "max":
        return attentions.amax(dim=2)
    if head_fusion == "min":
        return attentions.amin(dim=2)
    raise VitlabError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def rollout_matrix(attentions: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   num_prefix_tokens: int = 1) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) of stacked (L, B, H, T, T) maps, shape (B, T, T).

    Per layer: fuse the heads, set the lowest `discard_ratio` fraction of the T×T weights of each image to 0
    (never the prefix tokens' attention to themselves, so the class token keeps its own path), add the identity
    for the residual connection and re-normalise each row to sum to 1; then multiply the layers, last on the
    left. Row i of the result says how much of output token i traces back to each input token; every row is a
    probability distribution. With no discarding each layer is exactly Abnar & Zuidema's 0.5·A + 0.5·I.
    """
    if attentions.ndim != 5 or attentions.shape[-1] != attentions.shape[-2]:
        raise VitlabError(f"attentions must have shape (L, B, H, T, T), got {tuple(attentions.shape)}")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitlabError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    tokens = attentions.shape[-1]
    if not 0 <= num_prefix_tokens <= tokens:
        raise VitlabError(f"num_prefix_tokens must be in [0, {tokens}], got {num_prefix_tokens}")
    fused = _fuse_heads(attentions.double(), head_fusion)  # (L, B, T, T); float64 keeps long products exact
    eye = torch.eye(tokens, dtype=fused.dtype, device=fused.device)
    protected = torch.arange(num_prefix_tokens, device=fused.device) * (tokens + 1)  # flat (i, i), i < prefix
    discard = min(int(tokens * tokens * discard_ratio), tokens * tokens - num_prefix_tokens)
    result = eye.expand(fused.shape[1], tokens, tokens).clone()
    for layer in fused:
        if discard > 0:
            flat = layer.reshape(layer.shape[0], -1).clone()
            ranking = flat.clone()
            ranking[:, protected] = float("inf")
            lowest = ranking.topk(discard, dim=-1, largest=False).indices
            layer = flat.scatter(1, lowest, 0.0).reshape_as(layer)
        augmented = layer + eye
        augmented = augmented / augmented.sum(dim=-1, keepdim=True)
        result = augmented @ result
    return result.to(attentions.dtype)


def rollout_readout(matrix: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """The (B, gh, gw) map a rollout matrix assigns to the patches.

    With a class token: the class token's row over the patch columns, not re-normalised, so the map is the share
    of the class token's final representation that comes from each patch (it sums to 1 minus the share kept by
    the prefix tokens; all zero if the class token only ever attended to itself). Without one (GAP): the mean
    of all rows, i.e. what the averaged output token draws from each patch (sums to 1).
    """
    if num_prefix_tokens > 0:
        patches = matrix[:, 0, num_prefix_tokens:]
    else:
        patches = matrix.mean(dim=1)
    if patches.shape[-1] != grid[0] * grid[1]:
        raise VitlabError(f"rollout has {patches.shape[-1]} patch tokens, not a {grid[0]}x{grid[1]} grid")
    return patches.reshape(matrix.shape[0], *grid)


def attention_rollout(model: nn.Module, images: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0,
                      return_matrix: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Which input patches the prediction draws on (ViT paper Fig. 6, App. D.8), shape (B, gh, gw).

    See `rollout_matrix` for the fusion and `rollout_readout` for how the map is read off (class token's row,
    or the mean row for GAP models). Rectangular inputs give rectangular grids. With `return_matrix=True` also
    returns the full (B, T, T) row-stochastic rollout matrix.
    """
    images = _check_images(model, images)
    grid = patch_grid(model, images)
    matrix = rollout_matrix(attention_maps(model, images), head_fusion, discard_ratio, model.num_prefix_tokens)
    heatmap = rollout_readout(matrix, grid, model.num_prefix_tokens)
    return (heatmap, matrix) if return_matrix else heatmap


def class_token_attention(attentions: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int) -> torch.Tensor:
    """Per layer and head, how the class token spreads its attention over the patches: (L, B, H, gh, gw).

    GAP models have no class token; for them this is the attention each patch receives averaged over all
    query tokens, the closest analogue of what the pooled output looks at.
    """
    if num_prefix_tokens > 0:
        patches = attentions[..., 0, num_prefix_tokens:]
    else:
        patches = attentions.mean(dim=-2)
    return patches.reshape(*attentions.shape[:3], *grid)


def patch_distances(grid: tuple[int, int], patch_size: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) Euclidean distances in input pixels between patch centres, patches in raster order."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1) * patch_size
    return torch.cdist(centres, centres).to(dtype=dtype, device=device)


def mean_attention_distance(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Per layer and head, the attention-weighted mean pixel distance between query and key patches, (L, H).

    The ViT paper's "attention distance" (Fig. 7 right, App. D.7, computed there over 128 images), the analogue
    of a CNN's receptive field size: for each query patch, the distance (patch-index distance × pixels per
    patch, which a hybrid's ResNet stem multiplies) to every key patch weighted by attention, then averaged over
    query patches and images. Prefix tokens have no position, so they are dropped and each query's attention over
    the patches is re-normalised to sum to 1.
    Images are processed `batch_size` at a time so large models do not hold every map at once.
    """
    images = _check_images(model, images)
    if batch_size < 1:
        raise VitlabError(f"batch_size must be at least 1, got {batch_size}")
    grid = patch_grid(model, images)
    prefix = model.num_prefix_tokens
    distances = patch_distances(grid, model.config.stride, device=images.device)
    total: torch.Tensor | None = None
    for start in range(0, images.shape[0], batch_size):
        maps = attention_maps(model, images[start:start + batch_size]).double()[..., prefix:, prefix:]
        maps = maps / maps.sum(dim=-1, keepdim=True)
        per_query = (maps * distances).sum(dim=-1)  # (L, b, H, N)
        chunk = per_query.sum(dim=(1, 3))
        total = chunk if total is None else total + chunk
    assert total is not None
    return (total / (images.shape[0] * grid[0] * grid[1])).to(images.dtype)
