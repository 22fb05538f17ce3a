"""Field checks for model configs, written once for every family: each failure is a VitlabError that names the
field and the bad value, so a `--set` or a checkpoint's JSON with a wrong entry is reported as such rather than as
a shape error deep in torch. Each family's config calls them from its `__post_init__`."""

from __future__ import annotations

import math
import numbers
from typing import Any

from vitlab.errors import VitlabError
from vitlab.models.layers import to_2tuple


def require_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise VitlabError(f"{name} must be a positive integer, got {value!r}")


def require_class_count(value: Any) -> None:
    """0 classes is allowed: the model is then a feature extractor without a head."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise VitlabError(f"num_classes must be a non-negative integer, got {value!r}")


def require_probability(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise VitlabError(f"{name} must be a probability in [0, 1], got {value!r}")


def require_positive_number(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0.0 < value < math.inf:
        raise VitlabError(f"{name} must be a positive number, got {value!r}")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise VitlabError(f"{name} must be one of {choices}, got {value!r}")


def require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise VitlabError(f"{name} must be true or false, got {value!r}")


def require_divisible(name: str, value: int, by_name: str, by: int) -> None:
    """`value` (a width) splits evenly into `by` parts (heads, groups)."""
    if value % by:
        raise VitlabError(f"{name} {value} is not divisible by {by_name} {by}")


def block_counts(name: str, value: Any, optional: bool = False) -> tuple[int, ...] | None:
    """A non-empty tuple of positive block counts (a JSON list becomes a tuple); None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or not value:
        allowed = "None or a non-empty tuple" if optional else "a non-empty tuple"
        raise VitlabError(f"{name} must be {allowed} of block counts, got {value!r}")
    for count in value:
        require_positive_int(name, count)
    return value


def image_size(value: Any) -> tuple[int, int]:
    """(height, width) from an int or a pair, both positive integers."""
    size = to_2tuple(value)
    for side in size:
        require_positive_int("img_size", side)
    return size


def require_grid(img_size: tuple[int, int], stride: int, by: str = "patch_size") -> None:
    """Both sides of the image are a whole number of patches (`stride` pixels each)."""
    if any(side % stride for side in img_size):
        raise VitlabError(f"img_size {img_size} is not divisible by {by} {stride}")
