"""A checkpoint ready to predict with: the model on its device, its card (class names, preprocessing), and image
files turned into its input as the checkpoint expects. `vitlab predict`, `eval`, `analyze` and `serve` share it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from vitlab.data import EvalTransform
from vitlab.data.images import load_image, read_image
from vitlab.errors import VitlabError
from vitlab.precision import select_device
from vitlab.weights import load_model
from vitlab.weights.card import ModelCard
from vitlab.weights.hub import looks_like_name
from vitlab.weights.io import model_card


def load_for_use(checkpoint: str, model_name: str | None, device: str = "auto") -> tuple[nn.Module, torch.device]:
    """The model of a checkpoint file, run directory or catalogue name, in eval mode on the device."""
    path = Path(checkpoint)
    if not path.exists() and not looks_like_name(checkpoint):
        raise VitlabError(f"{path}: no such checkpoint")
    target = select_device(device)
    model = load_model(checkpoint, model_name=model_name).to(target).eval()
    return model, target


def card_of(model: nn.Module) -> ModelCard:
    """The class names and preprocessing `load_model` attached (an empty card for a model built otherwise)."""
    return model_card(model)


def normalize_with(transform: Callable[[torch.Tensor], torch.Tensor], mean: tuple[float, ...], std: tuple[float, ...]
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An eval transform (one that normalises with vitlab's mean = std = 0.5, or none) with a checkpoint's own mean
    and std instead; the data set's images are decoded at the model's size already."""
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def apply(images: torch.Tensor) -> torch.Tensor:
        scaled = transform(images) * 0.5 + 0.5  # EvalTransform's (x - 0.5) / 0.5 undone: back to [0, 1]
        channels = scaled.shape[-3]
        return (scaled - mean_t[:channels].to(scaled.device)) / std_t[:channels].to(scaled.device)

    return apply


def image_batch(model: nn.Module, path: Path) -> torch.Tensor:
    """One image file as the model's (1, C, H, W) input: with the checkpoint's preprocessing when its card has
    one, else shorter side fitted and centre-cropped, bicubic, mean = std = 0.5."""
    mode = "L" if model.config.in_chans == 1 else "RGB"
    size = tuple(model.config.img_size)
    preprocessing = card_of(model).preprocessing
    if preprocessing is not None:
        return preprocessing.transform(size)(load_image(path, mode))[None]
    return EvalTransform(size)(torch.from_numpy(read_image(path, mode, size))[None])
