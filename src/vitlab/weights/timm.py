"""timm `VisionTransformer` state dicts ⇄ vitlab.

vitlab uses timm's module names, so the map is the identity for the plain ViT. What needs care is what timm
can express and vitlab cannot (and back): those are refused with the reason rather than silently dropped.

A state dict holds no activation. timm computes with the exact GELU, so timm weights load with it; a model that
uses the tanh GELU (one read from Google's `.npz`) is written with safetensors metadata `act_layer="gelu_tanh"`,
timm's name for it (`timm.create_model(name, act_layer="gelu_tanh")` for a ViT, `act_layer=GELUTanh` for a Mixer),
which vitlab reads back. A hybrid or ResNet that standardises its kernels as the Flax code does is recorded as
`weight_std="flax"`, which timm's StdConv2d cannot compute: writing it warns.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from vitlab.errors import VitlabError
from vitlab.models.layers import ACTIVATIONS
from vitlab.models.resnet import NUMERICS, ResNetConfig
from vitlab.models.vit import ViTConfig

# Key fragments of timm ViT variants whose computation vitlab's ViT does not have.
_UNSUPPORTED = (
    ("fc_norm.", "a LayerNorm after pooling (timm's fc_norm, the default for global_pool='avg'); vitlab's gap "
                 "pools the already-normalised tokens, so build the timm model with fc_norm=False"),
    ("norm_pre.", "a LayerNorm before the blocks (timm's pre_norm, CLIP-style)"),
    ("reg_token", "register tokens"),
    ("dist_token", "a distillation token (DeiT distilled)"),
    ("head_dist.", "a distillation head (DeiT distilled)"),
    (".ls1.", "layer scale"),
    (".ls2.", "layer scale"),
    ("attn_pool.", "an attention-pooling (MAP) head"),
    (".q_norm.", "query/key normalisation"),
    (".k_norm.", "query/key normalisation"),
    (".norm.weight", "a norm inside attention or MLP (scale_attn_norm / scale_mlp_norm)"),
    ("patch_embed.norm.", "a norm after the patch embedding"),
)
# The same for the CNN of a hybrid, whose keys (under `patch_embed.backbone.`) the list above does not judge.
_BACKBONE = "patch_embed.backbone."
_UNSUPPORTED_BACKBONE = (
    (_BACKBONE + "conv.", "a stem-only hybrid patch embedding (vitlab's hybrids have ResNet stages)"),
    (".running_mean", "a BatchNorm CNN (vitlab's hybrid stem uses GroupNorm, as the paper's)"),
)


def looks_like_timm(keys: set[str]) -> bool:
    return "patch_embed.proj.weight" in keys and any(key.startswith("blocks.") for key in keys)


def strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the `module.` / `_orig_mod.` prefixes that DDP and torch.compile add to every key."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def to_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """A timm ViT state dict in vitlab's layout; refuses the timm variants vitlab's ViT cannot compute."""
    state = strip_wrapper_prefix(dict(state))
    backbone = {key for key in state if key.startswith(_BACKBONE)}
    for keys, unsupported in ((set(state) - backbone, _UNSUPPORTED), (backbone, _UNSUPPORTED_BACKBONE)):
        for fragment, feature in unsupported:
            found = sorted(key for key in keys if fragment in key)
            if found:
                raise VitlabError(f"{source}: key {found[0]!r} belongs to {feature}, which vitlab's ViT does "
                                  "not implement")
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        raise VitlabError(f"{source}: no 4-d 'patch_embed.proj.weight'; not a timm ViT state dict")
    if weight.shape[2] != weight.shape[3]:
        raise VitlabError(f"{source}: non-square patches {weight.shape[2]}x{weight.shape[3]} are not supported")
    posemb = state.get("pos_embed")
    if "cls_token" in state and posemb is not None and posemb.ndim == 3:
        rows = posemb.shape[1]
        # timm's no_embed_class models add the table to the patches only; a zero class-token row is the same.
        if math.isqrt(rows) ** 2 == rows and math.isqrt(rows - 1) ** 2 != rows - 1:
            state["pos_embed"] = torch.cat([posemb.new_zeros(1, 1, posemb.shape[2]), posemb], dim=1)
    return state


def from_state_dict(state: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """A vitlab state dict as timm keys; refuses what timm's VisionTransformer has no place for."""
    if config.representation_size:
        raise VitlabError("timm's VisionTransformer has no pre-logits layer; this model has "
                          f"representation_size={config.representation_size}, which timm cannot hold")
    if config.posemb == "sincos2d":
        raise VitlabError("timm's VisionTransformer learns its position embedding; this model uses fixed "
                          "sincos2d embeddings, which a timm state dict cannot express")
    return dict(state)


def _numerics_field(config: Any) -> str | None:
    """The config field that says how a ResNet (or a hybrid's stem) standardises its kernels, if it has one."""
    if isinstance(config, ResNetConfig):
        return "numerics"
    if isinstance(config, ViTConfig) and config.hybrid_layers is not None:
        return "hybrid_numerics"
    return None


def metadata(config: Any) -> dict[str, str]:
    """safetensors metadata for a timm-layout file of `config`'s model: what a state dict cannot say about how it
    computes. Warns (one line) when timm cannot compute it."""
    out = {"format": "pt"}
    act = getattr(config, "act", "gelu")
    if act != "gelu":
        out["act_layer"] = act  # timm's get_act_layer knows "gelu_tanh"
    field = _numerics_field(config)
    if field is not None and getattr(config, field) != "timm":
        out["weight_std"] = getattr(config, field)
        warnings.warn(f"timm's StdConv2d cannot compute {field}={getattr(config, field)!r} (the official Flax weight "
                      "standardisation); the file records it for vitlab, timm's logits will differ slightly",
                      stacklevel=3)
    return out


def numerics_from_metadata(metadata: dict[str, str], config_type: type, source: str) -> dict[str, str]:
    """The config fields a timm-layout file's metadata sets (see `metadata`); timm's defaults when it has none."""
    fields = {}
    if config_type is not ResNetConfig:
        act = metadata.get("act_layer", "gelu")
        if act not in ACTIVATIONS:
            raise VitlabError(f"{source}: metadata act_layer={act!r} is not supported; vitlab computes "
                              f"{', '.join(repr(name) for name in ACTIVATIONS)}")
        fields["act"] = act
    weight_std = metadata.get("weight_std", "timm")
    if weight_std not in NUMERICS:
        raise VitlabError(f"{source}: metadata weight_std={weight_std!r} is not one of {NUMERICS}")
    if config_type is ResNetConfig:
        fields["numerics"] = weight_std
    elif config_type is ViTConfig:
        fields["hybrid_numerics"] = weight_std
    return fields


def model_args(config: ViTConfig) -> dict[str, Any]:
    """Keyword arguments for timm's `VisionTransformer` that build `config`'s architecture (a timm config.json's
    `model_args`); hybrids and LayerNorm epsilons other than timm's 1e-6 have no JSON-able form there."""
    if config.hybrid_layers is not None:
        raise VitlabError("a hybrid ViT's timm config needs a ResNet backbone object; write a single file instead")
    if config.layer_norm_eps != 1e-6:
        raise VitlabError(f"timm's config.json cannot set layer_norm_eps={config.layer_norm_eps} (timm uses 1e-6)")
    return {"img_size": list(config.img_size), "patch_size": config.patch_size, "in_chans": config.in_chans,
            "num_classes": config.num_classes, "embed_dim": config.embed_dim, "depth": config.depth,
            "num_heads": config.num_heads, "mlp_ratio": config.mlp_dim / config.embed_dim,
            "qkv_bias": config.qkv_bias, "class_token": config.pool == "token",
            "global_pool": "token" if config.pool == "token" else "avg", "fc_norm": False,
            "pos_embed": "none" if config.posemb == "none" else "learn",
            **({"act_layer": config.act} if config.act != "gelu" else {})}  # timm's get_act_layer knows gelu_tanh


def config_from_model_args(args: dict[str, Any], source: str) -> ViTConfig:
    """The inverse of `model_args`: the ViTConfig a timm config.json's `model_args` describe."""
    if args.get("fc_norm") or args.get("pos_embed", "learn") not in ("learn", "none"):
        raise VitlabError(f"{source}: model_args {args} describe a timm ViT variant vitlab does not implement")
    try:
        embed_dim = int(args.get("embed_dim", 768))
        return ViTConfig(img_size=args.get("img_size", 224), patch_size=int(args.get("patch_size", 16)),
                         in_chans=int(args.get("in_chans", 3)), num_classes=int(args.get("num_classes", 1000)),
                         embed_dim=embed_dim, depth=int(args.get("depth", 12)),
                         num_heads=int(args.get("num_heads", 12)),
                         mlp_dim=round(float(args.get("mlp_ratio", 4.0)) * embed_dim),
                         qkv_bias=bool(args.get("qkv_bias", True)),
                         pool="token" if args.get("global_pool", "token") == "token" else "gap",
                         posemb="none" if args.get("pos_embed") == "none" else "learned",
                         act=args.get("act_layer") or "gelu")
    except (TypeError, ValueError) as error:  # VitlabError is a ValueError
        raise VitlabError(f"{source}: invalid model_args ({error})") from None
