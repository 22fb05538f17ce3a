"""What generic code needs to know about a model family, declared once in the family's own module.

Each family module ends with a `FAMILY = Family(...)`; `vitlab.models.registry` registers it and names its sizes.
Weight files, analysis and the CLI ask the family (`registry.get_family`) instead of testing a model's class or
attributes, so a new family is its module plus one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

ATTENTION = "attention"  # forward(x, return_attention=True) gives self-attention maps over a patch grid
CROSS_ATTENTION = "cross_attention"  # forward(x, return_attention=True) gives latent → pixel cross-attention maps
CAPABILITIES = (ATTENTION, CROSS_ATTENTION)


@dataclass(frozen=True)
class Family:
    """A model family: its config class and constructor, and what the generic code may ask of it.

    `architecture_fields` are the config fields that a weight file recording its config and a model name given
    with it must agree on; `capabilities` are the analyses its models support (`ATTENTION`, `CROSS_ATTENTION`).
    """

    name: str
    label: str  # how messages name the family
    config_type: type
    build: Callable[[Any], nn.Module]
    architecture_fields: tuple[str, ...]
    capabilities: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = sorted(self.capabilities - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"{self.name}: unknown capabilities {unknown}; known: {CAPABILITIES}")
