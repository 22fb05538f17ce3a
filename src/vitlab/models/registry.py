"""Model names → configs and constructors. The only place that names concrete model sizes."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vitlab.errors import VitlabError
from vitlab.models import mixer, perceiver, resnet, vit
from vitlab.models.checks import check_sane_sizes
from vitlab.models.family import Family
from vitlab.models.mixer import MixerConfig
from vitlab.models.perceiver import PerceiverConfig
from vitlab.models.resnet import ResNetConfig
from vitlab.models.vit import ViTConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    config: Any
    build: Callable[[Any], nn.Module]
    description: str


_FAMILIES: dict[str, Family] = {family.name: family for family in (vit.FAMILY, resnet.FAMILY, mixer.FAMILY,
                                                                    perceiver.FAMILY)}
_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, family: str, config: Any, description: str) -> None:
    declared = _FAMILIES[family]
    if not isinstance(config, declared.config_type):
        raise TypeError(f"{name}: config must be a {declared.config_type.__name__}")
    _REGISTRY[name] = ModelSpec(name, family, config, declared.build, description)


def list_models(pattern: str = "") -> list[str]:
    """Registered model names containing `pattern`, sorted."""
    return sorted(name for name in _REGISTRY if pattern in name)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
        raise VitlabError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """dataclasses.replace with an error that names the unknown fields and lists the valid ones."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise VitlabError(f"unknown option(s) {', '.join(unknown)} for {type(config).__name__}; "
                         f"valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **overrides)


def model_config(name: str, num_classes: int | None = None, img_size: int | tuple[int, int] | None = None,
                 **overrides: Any) -> Any:
    """The config `create_model` would build, with the same overrides."""
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    return apply_overrides(get_spec(name).config, overrides)


def family_of(config: Any) -> str:
    for family in _FAMILIES.values():
        if isinstance(config, family.config_type):
            return family.name
    raise TypeError(f"{type(config).__name__} is not a registered model config")


def get_family(family: str | Any) -> Family:
    """The declaration of a family, given by name or by one of its configs."""
    return _FAMILIES[family if isinstance(family, str) else family_of(family)]


def list_families() -> list[Family]:
    """Every registered family, in registration order."""
    return list(_FAMILIES.values())


def capabilities(model: nn.Module) -> frozenset[str]:
    """What analyses `model` supports (`vitlab.models.family.CAPABILITIES`); none for a model of no family."""
    config = getattr(model, "config", None)
    family = next((family for family in _FAMILIES.values() if isinstance(config, family.config_type)), None)
    return frozenset() if family is None else family.capabilities


def build_model(config: Any) -> nn.Module:
    """A freshly initialised model from any registered family's config."""
    return get_family(config).build(config)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready form of a config, with its family, for checkpoints."""
    data = dataclasses.asdict(config)
    data = {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}
    return {"family": family_of(config), **data}


# Config fields that a run sets from its data and command line, not part of what a model is called.
_RUN_FIELDS = ("num_classes", "img_size")


def describe_config(config: Any) -> tuple[str, dict[str, Any]]:
    """A registry name and the overrides that turn its config into `config` (class count and image size aside):
    the registered model of the same family and architecture with the fewest overrides, or, when none has that
    architecture, `FAMILY-custom` with the architecture fields themselves, so that a run record names what it
    trained."""
    family = get_family(config)
    candidates = []
    for spec in _REGISTRY.values():
        if spec.family != family.name or any(getattr(spec.config, name) != getattr(config, name)
                                             for name in family.architecture_fields):
            continue
        changed = {item.name: getattr(config, item.name) for item in dataclasses.fields(config)
                   if item.name not in _RUN_FIELDS and getattr(config, item.name) != getattr(spec.config, item.name)}
        candidates.append((len(changed), spec.name, changed))
    if candidates:
        _, name, changed = min(candidates, key=lambda candidate: candidate[:2])
        return name, {key: list(value) if isinstance(value, tuple) else value for key, value in changed.items()}
    fields = {name: getattr(config, name) for name in family.architecture_fields}
    return f"{family.name}-custom", {key: list(value) if isinstance(value, tuple) else value
                                     for key, value in fields.items()}


def config_from_dict(data: dict[str, Any], source: str = "config") -> Any:
    """Inverse of `config_to_dict`; `source` (a file name) is named in errors."""
    data = dict(data)
    family = data.pop("family", "vit")
    if family not in _FAMILIES:
        raise VitlabError(f"{source}: unknown model family {family!r}; known: {', '.join(_FAMILIES)}")
    config_type = _FAMILIES[family].config_type
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise VitlabError(f"{source}: unknown model config field(s) {', '.join(unknown)}")
    try:
        config = config_type(**data)
    except (TypeError, ValueError) as error:
        raise VitlabError(f"{source}: invalid model config: {error}") from None
    check_sane_sizes(config, source)
    return config


# The paper's sizes (Table 1) and the Ti/S sizes of the AugReg release: (width, depth, heads, MLP width).
_VIT_SIZES = {
    "ti": (192, 12, 3, 768),
    "s": (384, 12, 6, 1536),
    "b": (768, 12, 12, 3072),
    "l": (1024, 24, 16, 4096),
    "h": (1280, 32, 16, 5120),
}
_VIT_PATCHES = {"ti": (16, 32), "s": (8, 16, 32), "b": (8, 16, 32), "l": (16, 32), "h": (14,)}

for _size, (_dim, _depth, _heads, _mlp) in _VIT_SIZES.items():
    for _patch in _VIT_PATCHES[_size]:
        register(f"vit-{_size}{_patch}", "vit",
                 ViTConfig(patch_size=_patch, embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_dim=_mlp),
                 f"ViT-{_size.upper() if _size != 'ti' else 'Ti'}/{_patch}, 224 px")

# Small ViTs for 28×28 (Fashion-MNIST, digits upsampled) and 32×32 (CIFAR) inputs.
register("vit-mini-p4-28", "vit",
         ViTConfig(img_size=(28, 28), patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                   num_heads=4, mlp_dim=256),
         "small ViT for 28×28 grayscale images, 7×7 patch grid")
register("vit-mini-p7-28", "vit",
         ViTConfig(img_size=(28, 28), patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                   num_heads=4, mlp_dim=256),
         "small ViT for 28×28 grayscale images, 4×4 patch grid")
register("vit-mini-p4-32", "vit",
         ViTConfig(img_size=(32, 32), patch_size=4, in_chans=3, num_classes=10, embed_dim=192, depth=6,
                   num_heads=3, mlp_dim=384),
         "small ViT for 32×32 RGB images (CIFAR), 8×8 patch grid")
# The paper's hybrid (§3.1): ViT-B on 1×1 patches of an R50 stem whose stage 4 is folded into stage 3 (stride 16).
register("vit-b16-r50", "vit",
         ViTConfig(patch_size=1, hybrid_layers=(3, 4, 9), embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
         "R50+ViT-B/16 hybrid, 224 px: ResNet stages (3, 4, 9), stride 16, 1×1 patches (14×14 grid)")


# BiT ResNet-v2 (Kolesnikov et al., 2020): R50x1 as timm's resnetv2_50x1_bit, and a small one for 28×28 inputs
# whose 3×3/1 stem keeps a 7×7 map after three stages (about the size of vit-mini-p4-28).
register("resnet50-bit", "resnet", ResNetConfig(layers=(3, 4, 6, 3), width=64),
         "BiT-M R50x1, 224 px: pre-activation bottlenecks (3, 4, 6, 3), GroupNorm + weight standardisation")
register("resnet-bit-mini-28", "resnet",
         ResNetConfig(img_size=(28, 28), in_chans=1, num_classes=10, layers=(2, 2, 2), width=32, stem="small"),
         "small BiT ResNet for 28×28 grayscale images: 3×3 stem, stages (2, 2, 2), width 32, 7×7 final map")


# MLP-Mixer (paper Table 1): hidden width C and block count; token MLP D_S = 0.5·C, channel MLP D_C = 4·C.
_MIXER_SIZES = {"s": (512, 8), "b": (768, 12), "l": (1024, 24)}

for _size, (_dim, _depth) in _MIXER_SIZES.items():
    for _patch in (16, 32):
        register(f"mixer-{_size}{_patch}", "mixer",
                 MixerConfig(patch_size=_patch, embed_dim=_dim, depth=_depth, tokens_mlp_dim=_dim // 2,
                             channels_mlp_dim=4 * _dim),
                 f"Mixer-{_size.upper()}/{_patch}, 224 px")
register("mixer-mini-p4-28", "mixer",
         MixerConfig(img_size=(28, 28), patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                     tokens_mlp_dim=64, channels_mlp_dim=512),
         "small MLP-Mixer for 28×28 grayscale images, 7×7 patch grid")

# The Perceiver's ImageNet model (paper Sec. 4.1 and App. C; 44.9M parameters with its weight sharing) and a small
# one for 28×28 inputs, whose dense blocks widen 4× so that it has about the size of vit-mini-p4-28.
register("perceiver-imagenet", "perceiver", PerceiverConfig(),
         "Perceiver (FF), 224 px: 512×1024 latents, 8 cross-attends, 6-block tower, shared weights")
register("perceiver-mini-28", "perceiver",
         PerceiverConfig(img_size=(28, 28), in_chans=1, num_classes=10, num_latents=64, latent_dim=128,
                         num_cross_attends=2, latent_blocks=2, latent_heads=4, mlp_ratio=4.0, num_bands=16,
                         max_resolution=28),
         "small Perceiver for 28×28 grayscale images: 64×128 latents, 2 cross-attends, 2-block tower")

