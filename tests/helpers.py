"""Helpers shared by several test modules."""

from __future__ import annotations

import dataclasses
import importlib.util
import signal
import sys
from collections.abc import Container, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

import vitlab
from vitlab.models.vit import ViTConfig, VisionTransformer

TINY_VIT = ViTConfig(img_size=(32, 32), patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, num_classes=5)


def random_model(config: ViTConfig = TINY_VIT, seed: int = 0, **overrides: Any) -> VisionTransformer:
    """A model with every parameter random, including the zero-initialised head and class token."""
    torch.manual_seed(seed)
    model = VisionTransformer(dataclasses.replace(config, **overrides)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def tiny_vit(name: str = "vit-mini-p7-28", depth: int = 2, **overrides: Any) -> torch.nn.Module:
    """A registered small ViT cut to `depth` blocks, seeded and in eval mode, for tests of what runs on top of it."""
    torch.manual_seed(0)
    return vitlab.create_model(name, depth=depth, **overrides).eval()


def count(model: torch.nn.Module) -> int:
    """The number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def randomised(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norm scales around 1), so a zero head or unit norm hides nothing."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.normal_(1.0, 0.2)
            else:
                parameter.normal_(0.0, std)
    return model.eval()


def slow_when(values: Iterable[Any], slow: Container[Any]) -> list[Any]:
    """`values` for `pytest.mark.parametrize`, those in `slow` marked `slow` (left out by `make test-fast`)."""
    return [pytest.param(value, marks=pytest.mark.slow) if value in slow else value for value in values]


def one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The CLI's stderr is exactly one line, no traceback, containing every needle."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


def load_benchmark(name: str) -> ModuleType:
    """A script from benchmarks/ imported as a module, so tests can run its reduced form."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is being executed
    spec.loader.exec_module(module)
    return module


def interruptible() -> None:
    """`preexec_fn` for a child that must get Ctrl-C: SIGINT back to its default, even when this test process was
    started in the background with SIGINT ignored (which children would inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
