"""Batched train and eval pipelines on uint8 image tensors, built on `torchvision.transforms.v2`.

Whole batches are augmented at once (per-sample crops and flips are vectorised; RandAugment draws one policy per
small group of images), so on two CPU cores the data pipeline stays a few percent of a training step.
All randomness comes from torch's global generator, whose state the trainer checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitlab.errors import VitlabError

MEAN = 0.5  # the official ViT normalisation: (x - 127.5) / 127.5 for every channel
STD = 0.5


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. The per-sample transforms of lazily read folders and shards always take a
    random-resized crop of `scale` (share of the area) and `ratio` (aspect), timm's defaults; the batched
    `TrainTransform` takes one only with `random_resized_crop` (else it resizes the whole image), and
    `crop_padding` adds a random translation."""

    crop_padding: int = 0
    hflip: bool = False
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    randaugment_group: int = 16
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    random_resized_crop: bool = False


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


def random_resized_crop(images: torch.Tensor, size: tuple[int, int], scale: tuple[float, float],
                        ratio: tuple[float, float]) -> torch.Tensor:
    """Per-image random-resized (Inception) crop of a batch to `size`, as RandomResizedCrop on each image.

    The boxes follow torchvision's rule (ten tries of an area share drawn from `scale` and a log-uniform aspect from
    `ratio`, the first that fits, else the centred whole image clamped to `ratio`), drawn for the whole batch at
    once; `roi_align` resamples every box in one call (bilinear, averaging several samples per pixel when it
    shrinks)."""
    batch, _, height, width = images.shape
    tries = 10
    area = height * width * torch.empty(batch, tries).uniform_(scale[0], scale[1])
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    aspect = torch.exp(torch.empty(batch, tries, dtype=torch.float64).uniform_(log_ratio[0], log_ratio[1]))
    box_w = torch.sqrt(area * aspect).round()
    box_h = torch.sqrt(area / aspect).round()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)
    box_w, box_h, found = box_w.gather(1, first)[:, 0], box_h.gather(1, first)[:, 0], fits.any(1)
    whole_w, whole_h = width, height  # the fallback: the whole image, its aspect clamped into `ratio`
    if width / height < ratio[0]:
        whole_h = round(width / ratio[0])
    elif width / height > ratio[1]:
        whole_w = round(height * ratio[1])
    box_w = torch.where(found, box_w, float(whole_w))
    box_h = torch.where(found, box_h, float(whole_h))
    top = torch.where(found, (torch.rand(batch, dtype=torch.float64) * (height - box_h + 1)).floor(),
                      ((height - box_h) / 2).floor())
    left = torch.where(found, (torch.rand(batch, dtype=torch.float64) * (width - box_w + 1)).floor(),
                       ((width - box_w) / 2).floor())
    boxes = torch.stack([torch.arange(batch, dtype=torch.float64), left, top, left + box_w, top + box_h], 1)
    crops = roi_align(images.float(), boxes.to(images.device, torch.float32), list(size), sampling_ratio=-1,
                      aligned=True)
    return crops.round_().clamp_(0, 255).to(images.dtype)


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
        if self.config.random_resized_crop:
            images = random_resized_crop(images, self.size, self.config.scale, self.config.ratio)
        else:
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
