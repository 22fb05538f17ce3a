"""What the embeddings learn: position-embedding similarity and patch-embedding filters (ViT paper, Fig. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError


def _check_grid(grid: object) -> tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in grid)):
        raise VitlabError(f"grid must be (rows, columns) of positive integers, got {grid!r}")
    return (grid[0], grid[1])


def position_embedding_similarity(model: nn.Module, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Cosine similarity between every pair of patch position embeddings, shape (gh, gw, gh, gw).

    `sim[i, j]` is the (gh, gw) map of how similar patch (i, j)'s embedding is to every other patch's: in a
    trained ViT it peaks at (i, j) and shows the row/column structure the model learned (Fig. 7 centre).
    Taken from `model.position_embedding(grid)`, so a grid other than the training one shows the resampled
    embeddings the model would actually add, and fixed sin-cos embeddings work too; the class token's row is
    left out. `grid` defaults to the model's own grid.
    """
    grid = model.config.grid_size if grid is None else _check_grid(grid)
    if model.config.posemb == "none":
        raise VitlabError("position_embedding_similarity: this model has posemb 'none', so it has no position "
                          "embeddings to compare")
    with torch.no_grad():
        posemb = model.position_embedding(tuple(grid))
    if posemb is None:
        raise VitlabError("position_embedding_similarity: the model returned no position embeddings")
    rows = posemb[0]
    patches = grid[0] * grid[1]
    if rows.shape[0] == patches + model.num_prefix_tokens:
        rows = rows[model.num_prefix_tokens:]
    elif rows.shape[0] != patches:
        raise VitlabError(f"position embedding has {rows.shape[0]} rows, which does not fit a "
                          f"{grid[0]}x{grid[1]} grid")
    unit = F.normalize(rows.float(), dim=-1)
    return (unit @ unit.T).reshape(grid[0], grid[1], grid[0], grid[1])


def patch_embedding_components(model: nn.Module, k: int = 28) -> torch.Tensor:
    """Top-k principal components of the patch-embedding filters, shape (k, C, P, P), orthonormal.

    The D filters of the P×P projection are D samples of C·P·P pixel weights; after centring, the leading right
    singular vectors are the directions the embedding is most sensitive to. The paper (Fig. 7 left) shows the
    first 28 of ViT-L/32 and finds plausible basis functions for a patch's fine structure. `k` is capped at the
    rank of the centred filters (at most min(D - 1, C·P·P)). Signs are fixed so each component's largest-magnitude
    entry is positive, so repeated calls agree.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise VitlabError(f"k must be a positive integer, got {k!r}")
    weight = model.patch_embed.proj.weight.detach()
    samples = weight.reshape(weight.shape[0], -1).double()
    centred = samples - samples.mean(dim=0, keepdim=True)
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    tolerance = singular.max().clamp_min(1e-300) * max(centred.shape) * torch.finfo(torch.float64).eps
    rank = int((singular > tolerance).sum())
    components = right[:min(k, rank)]
    peak = components.abs().argmax(dim=1, keepdim=True)
    components = components * components.gather(1, peak).sign()
    return components.reshape(-1, *weight.shape[1:]).to(weight.dtype)
