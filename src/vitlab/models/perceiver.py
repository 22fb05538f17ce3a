"""The Perceiver (Jaegle et al., 2021, arXiv 2103.03206) as the paper builds it for ImageNet.

Every pixel is one input element: its channels concatenated with 2-D Fourier position features (Sec. 3.2). A learned
latent array (N × D) reads the pixels through cross-attention, is processed by a latent Transformer tower, and reads
them again; the paper's ImageNet model does this 8 times with 6-block towers. Layout (Appendix C):
- cross-attend: LayerNorm on the latents and on the inputs, then query/key/value linears whose width is the smaller
  of the two channel counts (261 on ImageNet), one head, an output linear back to D, a residual on the latents, and
  a dense block;
- latent Transformer blocks: pre-norm GPT-2 style self-attention and dense blocks (the ViT's `Block`);
- dense blocks: LayerNorm → Linear → GELU → Linear with widening factor 1; no dropout;
- output: the mean over the latents, projected to the classes by one linear layer (no final LayerNorm).

Weight sharing follows the parameter count the paper reports (44.9M, Table 7): the first cross-attend has its own
weights, cross-attends 2..8 share one set, and all towers share one set of blocks. `share_weights=False` gives every
cross-attend and tower its own weights (326.2M).

The parameters do not depend on the image size (the Fourier features are computed for each input's own grid,
crop-relative in [-1, 1]), so a Perceiver runs, and fine-tunes, at any resolution.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError
from vitlab.models import checks
from vitlab.models.family import CROSS_ATTENTION, Family
from vitlab.models.layers import ACTIVATIONS, Mlp, lecun_normal_, set_activation, truncated_normal_, zero_head
from vitlab.models.vit import Block


@dataclass(frozen=True)
class PerceiverConfig:
    """Everything that defines a Perceiver's shape; the defaults are the paper's ImageNet model."""

    img_size: tuple[int, int] = (224, 224)  # what the data pipeline feeds; the weights work at any size
    in_chans: int = 3
    num_classes: int = 1000
    num_latents: int = 512
    latent_dim: int = 1024
    num_cross_attends: int = 8
    latent_blocks: int = 6  # self-attention blocks per latent Transformer tower
    cross_heads: int = 1
    latent_heads: int = 8
    mlp_ratio: float = 1.0  # dense-block widening factor
    num_bands: int = 64  # Fourier bands per spatial dimension, spaced linearly from 1 to max_resolution / 2
    max_resolution: int = 224
    share_weights: bool = True
    layer_norm_eps: float = 1e-5
    act: str = "gelu"  # the dense blocks' GELU (`vitlab.models.layers.ACTIVATIONS`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", checks.image_size(self.img_size))
        checks.require_choice("act", self.act, ACTIVATIONS)
        for name in ("in_chans", "num_latents", "latent_dim", "num_cross_attends", "latent_blocks", "cross_heads",
                     "latent_heads", "num_bands", "max_resolution"):
            checks.require_positive_int(name, getattr(self, name))
        checks.require_class_count(self.num_classes)
        checks.require_positive_number("mlp_ratio", self.mlp_ratio)
        checks.require_positive_number("layer_norm_eps", self.layer_norm_eps)
        checks.require_bool("share_weights", self.share_weights)
        if self.mlp_dim < 1:
            raise VitlabError(f"mlp_ratio {self.mlp_ratio} gives latent_dim {self.latent_dim} no dense units")
        checks.require_divisible("latent_dim", self.latent_dim, "latent_heads", self.latent_heads)
        if self.cross_attention_dim % self.cross_heads:
            raise VitlabError(f"the cross-attention width {self.cross_attention_dim} (the smaller of latent_dim and "
                              f"the {self.input_channels} input channels) is not divisible by cross_heads "
                              f"{self.cross_heads}")

    @property
    def position_channels(self) -> int:
        """Per spatial dimension: the raw coordinate, then num_bands sines and num_bands cosines."""
        return 2 * (2 * self.num_bands + 1)

    @property
    def input_channels(self) -> int:
        return self.in_chans + self.position_channels

    @property
    def cross_attention_dim(self) -> int:
        """Appendix C: queries, keys and values have the smaller of the two inputs' channel counts."""
        return min(self.latent_dim, self.input_channels)

    @property
    def mlp_dim(self) -> int:
        return round(self.latent_dim * self.mlp_ratio)


def fourier_position_features(height: int, width: int, num_bands: int, max_resolution: int,
                              device: torch.device | str | None = None,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The paper's Fourier position encoding of an H×W grid, shape (H*W, 2(2K+1)), rows in raster order.

    Coordinates run from -1 to 1 across the grid (crop-relative); frequencies f_1..f_K are spaced linearly from 1 to
    max_resolution / 2 (the Nyquist frequency of that sampling rate). For the row coordinate and then the column
    coordinate the channels are [x, sin(π f_1 x) .. sin(π f_K x), cos(π f_1 x) .. cos(π f_K x)].
    """
    rows = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(height * width, 2)
    freqs = torch.linspace(1.0, max_resolution / 2, num_bands, device=device, dtype=dtype)
    features = []
    for axis in range(2):
        coordinate = grid[:, axis:axis + 1]
        angles = math.pi * coordinate * freqs
        features += [coordinate, angles.sin(), angles.cos()]
    return torch.cat(features, dim=1)


class CrossAttention(nn.Module):
    """Latents (queries) attend to the input array (keys and values), linear in the number of inputs."""

    def __init__(self, latent_dim: int, input_dim: int, attn_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = attn_dim // num_heads
        self.q = nn.Linear(latent_dim, attn_dim)
        self.k = nn.Linear(input_dim, attn_dim)
        self.v = nn.Linear(input_dim, attn_dim)
        self.proj = nn.Linear(attn_dim, latent_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, heads, M, head_dim) keys and values; computed once per set of weights and reused by shared ones."""
        return self._heads(self.k(inputs)), self._heads(self.v(inputs))

    def forward(self, latents: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        batch, count, _ = latents.shape
        q = self._heads(self.q(latents))
        if return_attention:
            probs = (q * self.head_dim ** -0.5 @ keys.transpose(-2, -1)).softmax(dim=-1)
            out = probs @ values
        else:
            out = F.scaled_dot_product_attention(q, keys, values)
        out = self.proj(out.transpose(1, 2).reshape(batch, count, -1))
        return (out, probs) if return_attention else out


class CrossAttendBlock(nn.Module):
    """latents + CrossAttention(LN(latents), LN(inputs)), then latents + MLP(LN(latents))."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        dim, eps = config.latent_dim, config.layer_norm_eps
        self.norm_latents = nn.LayerNorm(dim, eps=eps)
        self.norm_inputs = nn.LayerNorm(config.input_channels, eps=eps)
        self.attn = CrossAttention(dim, config.input_channels, config.cross_attention_dim, config.cross_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, config.mlp_dim, act=config.act)

    def keys_values(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.keys_values(self.norm_inputs(inputs))

    def forward(self, latents: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        attended = self.attn(self.norm_latents(latents), keys, values, return_attention=return_attention)
        if return_attention:
            attended, probs = attended
        latents = latents + attended
        latents = latents + self.mlp(self.norm2(latents))
        return (latents, probs) if return_attention else latents


class Perceiver(nn.Module):
    """Perceiver with the same API as VisionTransformer: forward_features, forward_head, forward,
    reset_classifier, and `forward(x, return_attention=True)` for the cross-attention maps."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.latent_dim
        self.latents = nn.Parameter(torch.empty(config.num_latents, dim))
        cross_count = min(config.num_cross_attends, 2) if config.share_weights else config.num_cross_attends
        self.cross_attends = nn.ModuleList(CrossAttendBlock(config) for _ in range(cross_count))
        tower_count = 1 if config.share_weights else config.num_cross_attends
        self.towers = nn.ModuleList(
            nn.ModuleList(Block(dim, config.latent_heads, config.mlp_dim, True, 0.0, 0.0, 0.0, config.layer_norm_eps,
                                config.act)
                          for _ in range(config.latent_blocks))
            for _ in range(tower_count))
        self.num_features = dim
        self.head: nn.Module = zero_head(self.num_features, config.num_classes)
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @torch.no_grad()
    def init_weights(self) -> None:
        """Latents: truncated normal, std 0.02, bounds ±2 std (Appendix C); LeCun-normal linears, zero biases."""
        truncated_normal_(self.latents, 0.02)
        for module in [*self.cross_attends.modules(), *self.towers.modules()]:
            if isinstance(module, nn.Linear):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one before fine-tuning."""
        self.head = zero_head(self.num_features, num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def set_numerics(self, act: str | None = None) -> None:
        """Switch the dense blocks' GELU in place (the parameters stay)."""
        if act is not None:
            self.config = dataclasses.replace(self.config, act=act)
            set_activation(self, act)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass; the cross-attention maps (N × H·W per image)
        are the largest activations, so this matters most at ImageNet resolution."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return {"latents"}

    def embed_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image → (B, H*W, C + 2(2K+1)) input array: each pixel's channels, then its position."""
        if x.ndim != 4 or x.shape[1] != self.config.in_chans:
            raise VitlabError(f"the Perceiver takes (B, {self.config.in_chans}, H, W) images, got shape "
                              f"{tuple(x.shape)}")
        batch, _, height, width = x.shape
        position = fourier_position_features(height, width, self.config.num_bands, self.config.max_resolution,
                                             device=x.device, dtype=x.dtype)
        pixels = x.flatten(2).transpose(1, 2)
        return torch.cat([pixels, position.expand(batch, -1, -1)], dim=2)

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Image → latents (B, N, D) after the last tower; optionally each cross-attend's (B, heads, N, H*W)
        attention from the latents to the pixels (raster order)."""
        inputs = self.embed_inputs(x)
        latents = self.latents.expand(x.shape[0], -1, -1)
        keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        attentions: list[torch.Tensor] = []
        for step in range(self.config.num_cross_attends):
            index = min(step, len(self.cross_attends) - 1)
            cross = self.cross_attends[index]
            if index not in keys_values:  # shared cross-attends see the same inputs: project them once
                keys_values[index] = cross.keys_values(inputs)
            if return_attention:
                latents, probs = cross(latents, *keys_values[index], return_attention=True)
                attentions.append(probs)
            else:
                latents = self._run(cross, latents, *keys_values[index])
            for block in self.towers[min(step, len(self.towers) - 1)]:
                latents = self._run(block, latents)
        return (latents, attentions) if return_attention else latents

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Latents → logits: the mean over the latents, then one linear layer."""
        x = features.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits; with `return_attention=True` also every cross-attend's (B, heads, N, H*W) probabilities."""
        if return_attention:
            features, attentions = self.forward_features(x, return_attention=True)
            return self.forward_head(features), attentions
        return self.forward_head(self.forward_features(x))


FAMILY = Family("perceiver", "Perceiver", PerceiverConfig, Perceiver,
                architecture_fields=("num_latents", "latent_dim", "num_cross_attends", "latent_blocks", "cross_heads",
                                     "latent_heads", "mlp_ratio", "num_bands", "max_resolution", "share_weights"),
                capabilities=frozenset({CROSS_ATTENTION}))
