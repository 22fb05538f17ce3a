"""Field checks for model configs: each failure is a VitlabError that names the field and the bad value, so a
`--set` or a checkpoint's JSON with a wrong entry is reported as such rather than as a shape error deep in torch."""

from __future__ import annotations

import math
import numbers
from typing import Any

from vitlab.errors import VitlabError


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
