"""MLP-Mixer (Tolstikhin et al., 2021, arXiv 2105.01601), parameter-for-parameter as google-research's
`models_mixer.py`.

Each block mixes across patches with a token MLP (width D_S = 0.5·C) applied to every channel, then across
channels with a channel MLP (width D_C = 4·C) applied to every patch, both pre-norm and residual. Module names
follow timm's `MlpMixer` (`stem.proj`, `blocks.i.norm1`, `blocks.i.mlp_tokens.fc1`, `blocks.i.mlp_channels.fc2`,
`norm`, `head`) so timm state dicts load without renaming; Google's `.npz` is mapped in
`vitlab.weights.npz_mixer`.

The token MLP's weights have one row per patch, so a Mixer runs at exactly its configured image size: another
size is refused, and fine-tuning at another resolution (as the ViT does by resampling its position embedding) is
not supported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError
from vitlab.models import checks
from vitlab.models.family import Family
from vitlab.models.layers import ACTIVATIONS, DropPath, Mlp, lecun_normal_, set_activation, zero_head
from vitlab.models.vit import PatchEmbed


@dataclass(frozen=True)
class MixerConfig:
    """Everything that defines a Mixer's shape; the registry names concrete sizes (paper Table 1)."""

    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768  # the paper's hidden size C
    depth: int = 12
    tokens_mlp_dim: int = 384  # D_S
    channels_mlp_dim: int = 3072  # D_C
    dropout: float = 0.0
    drop_path: float = 0.0
    layer_norm_eps: float = 1e-6
    act: str = "gelu"  # the MLPs' GELU: exact (timm), or `gelu_tanh` (Flax; what Google's `.npz` files load with)

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", checks.image_size(self.img_size))
        checks.require_choice("act", self.act, ACTIVATIONS)
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "tokens_mlp_dim", "channels_mlp_dim"):
            checks.require_positive_int(name, getattr(self, name))
        checks.require_class_count(self.num_classes)
        for name in ("dropout", "drop_path"):
            checks.require_probability(name, getattr(self, name))
        checks.require_positive_number("layer_norm_eps", self.layer_norm_eps)
        checks.require_grid(self.img_size, self.patch_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


class MixerBlock(nn.Module):
    """x + TokenMLP(LN(x)ᵀ)ᵀ, then x + ChannelMLP(LN(x))."""

    def __init__(self, config: MixerConfig, drop_path: float) -> None:
        super().__init__()
        dim, eps = config.embed_dim, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp_tokens = Mlp(config.num_patches, config.tokens_mlp_dim, drop=config.dropout, act=config.act)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp_channels = Mlp(dim, config.channels_mlp_dim, drop=config.dropout, act=config.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class MlpMixer(nn.Module):
    """MLP-Mixer with the same API as VisionTransformer: forward_features, forward_head, forward,
    reset_classifier."""

    def __init__(self, config: MixerConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = PatchEmbed(config.patch_size, config.in_chans, config.embed_dim)
        rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(MixerBlock(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.num_features = config.embed_dim
        self.head: nn.Module = zero_head(self.num_features, config.num_classes)
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official (Flax default) initialisation: LeCun-normal stem and dense kernels, zero biases and head."""
        lecun_normal_(self.stem.proj.weight)
        nn.init.zeros_(self.stem.proj.bias)
        for block in self.blocks:
            for linear in (block.mlp_tokens.fc1, block.mlp_tokens.fc2, block.mlp_channels.fc1,
                           block.mlp_channels.fc2):
                lecun_normal_(linear.weight)
                nn.init.zeros_(linear.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one, as the paper does before fine-tuning."""
        self.head = zero_head(self.num_features, num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def set_numerics(self, act: str | None = None) -> None:
        """Switch the MLPs' GELU in place, e.g. to compute as the library the loaded weights come from."""
        if act is not None:
            self.config = dataclasses.replace(self.config, act=act)
            set_activation(self, act)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, more time."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image → normalised patch tokens (B, H*W/P², C)."""
        size = tuple(x.shape[-2:])
        if size != self.config.img_size:
            height, width = self.config.img_size
            raise VitlabError(f"this MLP-Mixer takes {height}x{width} images only (its token-mixing MLP is fixed "
                              f"to {self.config.num_patches} patches), got {size[0]}x{size[1]}")
        x = self.stem(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens → logits through global average pooling; `pre_logits=True` stops before the classifier."""
        x = features.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


FAMILY = Family("mixer", "MLP-Mixer", MixerConfig, MlpMixer,
                architecture_fields=("patch_size", "embed_dim", "depth", "tokens_mlp_dim", "channels_mlp_dim"))
