"""Batched train and eval pipelines on uint8 image tensors, built on `torchvision.transforms.v2`.

Whole batches are augmented at once (per-sample crops and flips are vectorised; RandAugment draws one policy per
small group of images), so on two CPU cores the data pipeline stays a few percent of a training step.
All randomness comes from torch's global generator, whose state the trainer checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitlab.errors import VitlabError

MEAN = 0.5  # the official ViT normalisation: (x - 127.5) / 127.5 for every channel
STD = 0.5


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. In-memory tensor sets use `crop_padding` (random translation); image folders and
    shards use a random-resized crop of `scale` (share of the area) and `ratio` (aspect) instead, timm's defaults."""

    crop_padding: int = 0
    hflip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    randaugment_group: int = 16
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return TF.resize(images, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float-in-[0,255] → float32 in [-1, 1]."""
    return (images.float() / 255.0 - MEAN) / STD


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per-sample random translation by up to `padding` pixels (zero-padded), as RandomCrop(pad) per image."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (batch,))
    left = torch.randint(0, 2 * padding + 1, (batch,))
    rows = (top[:, None] + torch.arange(height))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, None, :]
    batch_index = torch.arange(batch)[:, None, None, None]
    channel_index = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch_index, channel_index, rows, cols]


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey → RGB by repetition, RGB → grey by the ITU-R 601 luma, so any data set feeds any model."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1)
    if channels == 1 and images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(images.dtype)
    raise VitlabError(f"cannot feed {images.shape[1]}-channel images to a {channels}-channel model")


class TrainTransform:
    """uint8 batch + labels → normalised float batch at the model's size + (possibly soft) targets."""

    def __init__(self, config: AugmentConfig, size: tuple[int, int], num_classes: int, flips_allowed: bool) -> None:
        self.config = config
        self.size = size
        self.hflip = config.hflip and flips_allowed
        self.randaugment = (v2.RandAugment(config.randaugment_ops, config.randaugment_magnitude)
                            if config.randaugment_ops else None)
        mixers = []
        if config.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
        if config.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = resize(images, self.size)
        if self.randaugment is not None:
            group = self.config.randaugment_group
            images = torch.cat([self.randaugment(chunk) for chunk in images.split(group)])
        if self.config.crop_padding:
            images = random_crop(images, self.config.crop_padding)
        if self.hflip:
            images = random_hflip(images)
        images = normalize(images)
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        return images, labels


class EvalTransform:
    """Deterministic: resize to the model's size and normalise."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(resize(images, self.size))
