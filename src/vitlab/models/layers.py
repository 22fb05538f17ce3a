"""Building blocks shared by the transformer models: attention, MLP, drop-path and position embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.errors import VitlabError

RESAMPLE_MODES = ("official", "bicubic")
# The MLPs' GELU: exact (erf), as PyTorch, timm and Hugging Face compute it, or the tanh approximation, the default
# of Flax's `nn.gelu` that Google's own code (vision_transformer, big_vision) trains and evaluates its checkpoints with.
ACTIVATIONS = ("gelu", "gelu_tanh")


def to_2tuple(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's key layout).

    The default path calls `F.scaled_dot_product_attention`, so CUDA picks flash or memory-efficient kernels.
    With `return_attention=True` the same Q and K are multiplied explicitly, so the probabilities returned are
    exactly the ones the fused kernel uses internally. On CPU, sequences of at most `EXPLICIT_MAX_TOKENS` take the
    explicit path too, from a batch of `EXPLICIT_MIN_BATCH` up: there SDPA's flash kernel costs more than three
    plain matmuls, while smaller batches, where Python's per-op cost dominates, keep SDPA's single call. Below
    `KEY_MAJOR_MAX_TOKENS` the scores are laid out keys × queries, because PyTorch's CPU softmax over a short last
    dim is slow. Under bf16 autocast on CPU longer sequences take the explicit path too, because the flash kernel's
    bf16 backward is slow there. docs/performance.md has the measurements behind these thresholds.
    """

    EXPLICIT_MAX_TOKENS = 32
    EXPLICIT_MIN_BATCH = 8
    KEY_MAJOR_MAX_TOKENS = 24

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise VitlabError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout = self.attn_drop if self.training else 0.0
        on_cpu = x.device.type == "cpu"
        short = tokens <= self.EXPLICIT_MAX_TOKENS
        few_calls = short and batch < self.EXPLICIT_MIN_BATCH  # per-op cost dominates: one SDPA call is cheaper
        if return_attention or (on_cpu and not few_calls and (short or q.dtype == torch.bfloat16)):
            if tokens < self.KEY_MAJOR_MAX_TOKENS and on_cpu:
                # PyTorch's CPU softmax is slow over a short last dim, so it runs over dim -2 instead
                probs = (k @ (q * self.scale).transpose(-2, -1)).softmax(dim=-2).transpose(-2, -1)
            else:
                probs = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)
            out = F.dropout(probs, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))
        return (out, probs) if return_attention else out


def zero_head(num_features: int, num_classes: int) -> nn.Module:
    """The classifier every family starts from: a zero-initialised linear layer (so the first logits are uniform),
    or no head at all for `num_classes=0`, which makes the model a feature extractor."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(num_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def gelu(act: str = "gelu") -> nn.GELU:
    """The GELU that `act` names (one of `ACTIVATIONS`)."""
    if act not in ACTIVATIONS:
        raise VitlabError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")


class Mlp(nn.Module):
    """Dense → GELU → Dense, with dropout after each dense layer as in the paper; `act` picks the GELU."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = gelu(act)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def set_activation(model: nn.Module, act: str) -> None:
    """Switch every `Mlp` in `model` to the GELU `act` names, in place (GELU has no parameters)."""
    for module in model.modules():
        if isinstance(module, Mlp):
            module.act = gelu(act)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample, rescaling the survivors."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"prob={self.prob}"


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10_000.0,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """big_vision's fixed 2D sin-cos embedding, shape (grid_h * grid_w, dim), rows in raster order."""
    if dim % 4:
        raise VitlabError(f"sincos2d position embedding needs embed_dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                          indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / max(quarter - 1, 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).to(dtype)


def resample_grid(grid: torch.Tensor, new_size: tuple[int, int], mode: str = "official") -> torch.Tensor:
    """Resample position embeddings laid out as (1, H, W, D) to (1, H', W', D).

    `official` is bilinear with align_corners=True, which equals the scipy.ndimage.zoom(order=1) of the
    google-research/vision_transformer loader; `bicubic` (antialiased) is what timm uses for its own weights.
    """
    if mode not in RESAMPLE_MODES:
        raise VitlabError(f"unknown position-embedding resample mode {mode!r}; choose one of {RESAMPLE_MODES}")
    if tuple(grid.shape[1:3]) == tuple(new_size) and not torch.jit.is_tracing():  # a traced size is not fixed
        return grid
    dtype = grid.dtype
    chw = grid.permute(0, 3, 1, 2).float()
    if mode == "official":
        chw = F.interpolate(chw, size=new_size, mode="bilinear", align_corners=True)
    else:
        chw = F.interpolate(chw, size=new_size, mode="bicubic", align_corners=False, antialias=True)
    return chw.permute(0, 2, 3, 1).to(dtype)


def resample_position_embedding(posemb: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int,
                                old_grid: tuple[int, int] | None = None, mode: str = "official") -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) embedding to a new patch grid, keeping the prefix (class token) rows.

    `old_grid` defaults to a square grid, which is what every published checkpoint uses.
    """
    if posemb.ndim != 3 or posemb.shape[1] <= num_prefix_tokens:
        raise VitlabError(f"position embedding of shape {tuple(posemb.shape)} has no grid rows to resample")
    prefix, flat = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(flat.shape[1])
        if side * side != flat.shape[1]:
            raise VitlabError(f"position embedding has {flat.shape[1]} grid rows, which is not a square; "
                             "pass old_grid=(height, width)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != flat.shape[1]:
        raise VitlabError(f"position embedding has {flat.shape[1]} grid rows, not {old_grid[0]}x{old_grid[1]}")
    grid = resample_grid(flat.reshape(1, old_grid[0], old_grid[1], -1), new_grid, mode)
    return torch.cat([prefix, grid.reshape(1, new_grid[0] * new_grid[1], -1)], dim=1)


def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """A normal draw truncated at ±2 std, by inverting the CDF over the kept range (what Flax and Haiku's
    truncated normals sample); several times faster than torch's `trunc_normal_` with bounds this tight."""
    bound = math.erf(2.0 / math.sqrt(2.0))  # 2·Φ(2) - 1
    with torch.no_grad():
        return tensor.uniform_(-bound, bound).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(-2.0 * std, 2.0 * std)


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's default kernel init (`lecun_normal`): a normal truncated at ±2 std whose std is rescaled so the
    truncated draw has variance 1/fan_in. The fan-in of a (out, in, ...) torch weight is one output's size."""
    return truncated_normal_(weight, math.sqrt(1.0 / weight[0].numel()) / .87962566103423978)
