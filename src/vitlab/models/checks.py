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


# The largest value each size field may take in a config read from a file or a record (a weight file's metadata, a
# run's last.json): far beyond any real model, far below what would exhaust memory before a later check fails.
# Fields not named here take `_DEFAULT_BOUND`; tuples (image size, stage depths) are bounded item by item.
SIZE_BOUNDS: dict[str, int] = {
    "img_size": 16384, "max_resolution": 16384, "num_classes": 1 << 20, "depth": 1024, "layers": 1024,
    "hybrid_layers": 1024, "latent_blocks": 1024, "num_cross_attends": 1024, "num_bands": 1024, "mlp_ratio": 64,
}
_DEFAULT_BOUND = 1 << 20
MAX_TOKENS = 1 << 16  # patches per image of a patch-based model (a 4096-px image in 16-px patches)
MAX_PIXELS = 1 << 22  # pixels per image of a model that attends to every pixel (the Perceiver)
MAX_PARAMETERS = 10 ** 11  # several times the largest ViT trained (22 billion)


def check_sane_sizes(config: Any, source: str = "config") -> None:
    """Refuse a model config whose sizes no real model has, before anything is built from it: every numeric field
    within its bound (`SIZE_BOUNDS`), and the tokens (or pixels) per image within `MAX_TOKENS` (`MAX_PIXELS`).
    `source` (a file or record) is named in the error."""
    for name, value in vars(config).items():
        values = value if isinstance(value, tuple) else (value,)
        bound = SIZE_BOUNDS.get(name, _DEFAULT_BOUND)
        for item in values:
            if isinstance(item, numbers.Real) and not isinstance(item, bool) and not -bound <= item <= bound:
                raise VitlabError(f"{source}: the model it describes cannot be built: {name} {value!r} is beyond "
                                  f"any real model (at most {bound})")
    height, width = getattr(config, "img_size", (1, 1))
    patch = getattr(config, "stride", getattr(config, "patch_size", None))  # a hybrid's tokens are stem-strided
    if patch is not None and (height // patch) * (width // patch) > MAX_TOKENS:
        raise VitlabError(f"{source}: img_size {config.img_size} in {patch}-pixel patches makes "
                          f"{(height // patch) * (width // patch)} tokens per image (at most {MAX_TOKENS})")
    if patch is None and height * width > MAX_PIXELS:
        raise VitlabError(f"{source}: img_size {config.img_size} has {height * width} pixels (at most {MAX_PIXELS})")


def check_parameter_count(model: Any, source: str = "config") -> None:
    """Refuse a model (built without storage, on the meta device) with more than `MAX_PARAMETERS` parameters: for a
    config that is built without weights to check it against."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise VitlabError(f"{source}: the model it describes has {parameters:.3g} parameters (at most "
                          f"{MAX_PARAMETERS:.0e})")
