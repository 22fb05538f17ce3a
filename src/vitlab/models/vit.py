"""The Vision Transformer of Dosovitskiy et al. (2021), parameter-for-parameter as google-research/vision_transformer.

Module names follow timm (`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.i.attn.qkv`, ...) so timm state
dicts load with no renaming; Google's `.npz` and Hugging Face layouts are mapped in `vitlab.weights`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vitlab.errors import VitlabError
from vitlab.models import checks
from vitlab.models.family import ATTENTION, Family
from vitlab.models.layers import (ACTIVATIONS, RESAMPLE_MODES, Attention, DropPath, Mlp, lecun_normal_,
                                  resample_position_embedding, set_activation, sincos_2d_position_embedding,
                                  zero_head)
from vitlab.models.resnet import NUMERICS, ResNet, ResNetConfig

POOLS = ("token", "gap")
POSEMBS = ("learned", "sincos2d", "none")


@dataclass(frozen=True)
class ViTConfig:
    """Everything that defines a ViT's shape; the registry names concrete sizes."""

    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    pool: str = "token"
    posemb: str = "learned"
    posemb_resample: str = "official"
    representation_size: int | None = None
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    patch_dropout: float = 0.0  # FLIP: train on a random subset of patch tokens; fewer tokens, cheaper steps
    layer_norm_eps: float = 1e-6
    # The hybrid (paper §3.1): the stages of a post-activation ResNet stem whose feature map is cut into patches,
    # e.g. (3, 4, 9) for R50+ViT-B/16 (stride 16, 1×1 patches); None is the pure ViT.
    hybrid_layers: tuple[int, ...] | None = None
    # The MLPs' GELU (`ACTIVATIONS`): exact, as timm and Hugging Face, or `gelu_tanh`, as Google's Flax code, which
    # is what models read from Google's `.npz` files use. The pre-logits layer is Dense + tanh either way.
    act: str = "gelu"
    # How the hybrid stem standardises its kernels and normalises (`vitlab.models.resnet.NUMERICS`): as timm, or
    # `flax`, as the official models_resnet.py, which is what hybrids read from Google's `.npz` files use.
    hybrid_numerics: str = "timm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hybrid_layers",
                           checks.block_counts("hybrid_layers", self.hybrid_layers, optional=True))
        object.__setattr__(self, "img_size", checks.image_size(self.img_size))
        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim"):
            checks.require_positive_int(name, getattr(self, name))
        checks.require_positive_int("representation_size", self.representation_size or 1)  # 0 or None: no layer
        checks.require_class_count(self.num_classes)
        checks.require_divisible("embed_dim", self.embed_dim, "num_heads", self.num_heads)
        for name in ("dropout", "attn_dropout", "drop_path", "patch_dropout"):
            checks.require_probability(name, getattr(self, name))
        checks.require_positive_number("layer_norm_eps", self.layer_norm_eps)
        checks.require_choice("pool", self.pool, POOLS)
        checks.require_choice("posemb", self.posemb, POSEMBS)
        checks.require_choice("act", self.act, ACTIVATIONS)
        checks.require_choice("hybrid_numerics", self.hybrid_numerics, NUMERICS)
        checks.require_choice("posemb_resample", self.posemb_resample, RESAMPLE_MODES)
        checks.require_grid(self.img_size, self.stride, "patch_size" if self.hybrid_layers is None
                            else "the hybrid's stride")

    @property
    def backbone(self) -> ResNetConfig | None:
        """The hybrid's ResNet stem: the official one, with GroupNorm, TF SAME padding and post-activation units."""
        if self.hybrid_layers is None:
            return None
        return ResNetConfig(img_size=self.img_size, in_chans=self.in_chans, num_classes=0, layers=self.hybrid_layers,
                            stem="same", preact=False, numerics=self.hybrid_numerics)

    @property
    def stride(self) -> int:
        """Pixels per token side: the patch size, times the ResNet stem's stride in a hybrid."""
        backbone = self.backbone
        return self.patch_size * (1 if backbone is None else backbone.stride)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.stride, self.img_size[1] // self.stride)

    @property
    def class_token(self) -> bool:
        """The paper's `token` classifier prepends a learned class token; `gap` averages the patch tokens."""
        return self.pool == "token"


class PatchEmbed(nn.Module):
    """A P×P convolution with stride P: the paper's linear projection of flattened patches."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise VitlabError(f"input size {height}x{width} is not divisible by patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class HybridEmbed(nn.Module):
    """The hybrid's input (paper §3.1): a ResNet feature map cut into P×P patches (1×1 in the paper), projected to D.

    `backbone` and `proj` are timm's names, so its `vit_*_r50_*` state dicts load unchanged."""

    def __init__(self, backbone: ResNetConfig, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.backbone = ResNet(backbone)
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone.forward_features(x)).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, qkv_bias: bool, dropout: float,
                 attn_dropout: float, drop_path: float, eps: float, act: str = "gelu") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_dropout, proj_drop=dropout)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, drop=dropout, act=act)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if return_attention:
            attended, probs = self.attn(self.norm1(x), return_attention=True)
        else:
            attended = self.attn(self.norm1(x))
        x = x + self.drop_path1(attended)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return (x, probs) if return_attention else x


class PreLogits(nn.Module):
    """The pre-training head's hidden layer (Dense + tanh), present when `representation_size` is set."""

    def __init__(self, dim: int, representation_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, representation_size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT with timm's uniform API: forward_features, forward_head, forward, reset_classifier."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.num_prefix_tokens = 1 if config.class_token else 0
        self.patch_embed: nn.Module = (PatchEmbed(config.patch_size, config.in_chans, dim) if config.backbone is None
                                       else HybridEmbed(config.backbone, config.patch_size, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if config.class_token else None
        grid_h, grid_w = config.grid_size
        if config.posemb == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid_h * grid_w, dim))
        else:
            self.pos_embed = None
        if config.posemb == "sincos2d":  # fixed: computed once, not every forward; not part of the state dict
            self.register_buffer("sincos_table", sincos_2d_position_embedding(grid_h, grid_w, dim)[None],
                                 persistent=False)
        self.pos_drop = nn.Dropout(config.dropout)
        self.grad_checkpointing = False
        drop_rates = [config.drop_path * i / max(config.depth - 1, 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_dim, config.qkv_bias, config.dropout, config.attn_dropout,
                  rate, config.layer_norm_eps, config.act)
            for rate in drop_rates)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.pre_logits = PreLogits(dim, config.representation_size) if config.representation_size else None
        self.num_features = config.representation_size or dim
        self.head: nn.Module = zero_head(self.num_features, config.num_classes)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official (Flax) initialisation: LeCun-normal patch and pre-logits kernels, Xavier-uniform dense
        kernels (q, k and v each as its own D×D matrix), tiny MLP biases, N(0, 0.02) position embeddings and a
        zero class token and head."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            dim = block.attn.qkv.in_features
            bound = math.sqrt(6.0 / (dim + dim))
            nn.init.uniform_(block.attn.qkv.weight, -bound, bound)
            nn.init.xavier_uniform_(block.attn.proj.weight)
            for linear in (block.attn.qkv, block.attn.proj):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            for linear in (block.mlp.fc1, block.mlp.fc2):
                nn.init.xavier_uniform_(linear.weight)
                nn.init.normal_(linear.bias, std=1e-6)
        if self.pre_logits is not None:
            fc = self.pre_logits.fc
            lecun_normal_(fc.weight)
            nn.init.zeros_(fc.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one, as the paper does before fine-tuning."""
        self.head = zero_head(self.num_features, num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def set_numerics(self, act: str | None = None, hybrid_numerics: str | None = None) -> None:
        """Switch the MLPs' GELU and the hybrid stem's standardisation in place (the parameters stay), e.g. to
        compute as the library the loaded weights come from."""
        changes = {name: value for name, value in (("act", act), ("hybrid_numerics", hybrid_numerics))
                   if value is not None}
        self.config = dataclasses.replace(self.config, **changes)
        set_activation(self, self.config.act)
        if isinstance(self.patch_embed, HybridEmbed):
            self.patch_embed.backbone.set_numerics(self.config.hybrid_numerics)

    def grid_size_for(self, height: int, width: int) -> tuple[int, int]:
        stride = self.config.stride
        if height % stride or width % stride:
            what = "patch size" if self.config.hybrid_layers is None else "the hybrid's stride"
            raise VitlabError(f"input size {height}x{width} is not divisible by {what} {stride}")
        return (height // stride, width // stride)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """Position embeddings for a patch grid; learned ones are resampled in 2D when the grid differs."""
        if self.config.posemb == "none":
            return None
        if self.config.posemb == "sincos2d":
            table = self.sincos_table
            if grid == self.config.grid_size and table.dtype == self.patch_embed.proj.weight.dtype \
                    and not torch.jit.is_tracing():  # a traced grid comes from the input's shape
                return table
            return sincos_2d_position_embedding(*grid, self.config.embed_dim, dtype=self.patch_embed.proj.weight.dtype
                                                ).to(self.patch_embed.proj.weight.device)[None]
        posemb = self.pos_embed
        # Under the ONNX tracer `grid` comes from the input's shape, so always resample: the graph then does it too.
        if grid != self.config.grid_size or torch.jit.is_tracing():
            posemb = resample_position_embedding(posemb, grid, self.num_prefix_tokens, self.config.grid_size,
                                                 self.config.posemb_resample)
        return posemb

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + position embedding, ready for the first block."""
        grid = self.grid_size_for(*x.shape[-2:])
        tokens = self.patch_embed(x)
        posemb = self.position_embedding(grid)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        else:  # the patch embedding's transpose is strided; left so, every residual add and LayerNorm copies it
            tokens = tokens.contiguous()
        if posemb is not None:
            if posemb.shape[1] != tokens.shape[1]:  # sincos2d has no class-token row
                posemb = torch.cat([posemb.new_zeros(1, self.num_prefix_tokens, posemb.shape[2]), posemb], dim=1)
            tokens = tokens + posemb
        return self.pos_drop(tokens)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass: less memory, for a second forward pass."""
        self.grad_checkpointing = enable

    def drop_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keep a random `1 - patch_dropout` share of each image's patch tokens (prefix tokens always stay)."""
        prefix, patches = tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
        batch, count, dim = patches.shape
        keep = max(1, round(count * (1.0 - self.config.patch_dropout)))
        kept = torch.rand(batch, count, device=tokens.device).argsort(dim=1)[:, :keep]
        patches = patches.gather(1, kept.unsqueeze(-1).expand(-1, -1, dim))
        return torch.cat([prefix, patches], dim=1)

    def forward_features(self, x: torch.Tensor, return_attention: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Image → normalised token sequence (B, prefix + H*W/P², D); optionally each layer's attention.

        In training mode with `patch_dropout`, the sequence holds only the kept patch tokens."""
        x = self.embed(x)
        if self.training and self.config.patch_dropout > 0:
            x = self.drop_patches(x)
        attentions: list[torch.Tensor] = []
        for block in self.blocks:
            if return_attention:
                x, probs = block(x, return_attention=True)
                attentions.append(probs)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.norm(x)
        return (x, attentions) if return_attention else x

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "token":
            return features[:, 0]
        return features[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens → logits; `pre_logits=True` stops before the classifier (the features few-shot probes use)."""
        x = self.pool(features)
        if self.pre_logits is not None:
            x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits; with `return_attention=True` also every layer's (B, heads, T, T) attention probabilities."""
        if return_attention:
            features, attentions = self.forward_features(x, return_attention=True)
            return self.forward_head(features), attentions
        return self.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}


FAMILY = Family("vit", "ViT", ViTConfig, VisionTransformer,
                architecture_fields=("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "hybrid_layers"),
                capabilities=frozenset({ATTENTION}))
