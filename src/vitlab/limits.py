"""The ranges training options must lie in, checked on the command line before a config is built.

TrainConfig checks types, finiteness and signs; values within those but beyond what the trainer can use (an epoch
count whose step count overflows, a seed wider than torch's generators, a label smoothing of 5) would otherwise
surface as a traceback deep in training. `check_training_options` applies this table to `--epochs`, `--seed`,
`--set` and `--device`, naming the option and value in one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from vitlab.errors import VitlabError, printable


@dataclass(frozen=True)
class Range:
    """Closed bounds, each made open by its flag; `whole` asks for an integer."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    whole: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        low, high = (f"{bound:g}" if not self.whole else str(int(bound)) for bound in (self.low, self.high))
        return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


# The trainer seeds torch generators with seed · 1,000,003 + epoch, which must stay within their 64 bits.
SEED_MAX = 2 ** 32 - 1
RANGES: dict[str, Range] = {
    "epochs": Range(0, 1e6, low_open=True),
    "seed": Range(0, SEED_MAX, whole=True),
    "label_smoothing": Range(0, 1, high_open=True),
    "momentum": Range(0, 1, high_open=True),
    "randaugment_magnitude": Range(0, 30, whole=True),  # torchvision's RandAugment has 31 magnitude bins
}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_value(option: str, name: str, value: Any) -> None:
    """Refuse a number outside RANGES[name]; other types, and NaN or infinity, are left to TrainConfig's checks."""
    limits = RANGES.get(name)
    if limits is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        return
    if not limits.contains(value) or (limits.whole and isinstance(value, float) and not value.is_integer()):
        raise VitlabError(f"{option}: {name} must be {limits.describe()}, got {printable(value)}")


def check_device(option: str, name: str) -> None:
    """Refuse a device torch cannot name, or one this machine lacks (`auto` always works)."""
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise VitlabError(f"{option}: unknown device {printable(repr(name))}; use auto, {', '.join(DEVICE_TYPES)}")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device.type]:
        raise VitlabError(f"{option}: device {printable(repr(name))} is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise VitlabError(f"{option}: device {printable(repr(name))}: this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")


def check_training_options(epochs: float | None, seed: int | None, settings: list[str],
                           device: str | None = None) -> None:
    """Apply RANGES and the device check to the command line's `--epochs`, `--seed`, `--set FIELD=VALUE` and
    `--device`, before any config, model or data is made."""
    if epochs is not None:
        check_value("--epochs", "epochs", epochs)
    if seed is not None:
        check_value("--seed", "seed", seed)
    if device is not None:
        check_device("--device", device)
    for item in settings:
        name, separator, text = item.partition("=")
        name = name.strip()
        if not separator:
            continue  # the config's parser names the malformed item
        if name == "device":
            check_device(f"--set {name}", text)
            continue
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            continue
        check_value(f"--set {name}", name, value)
