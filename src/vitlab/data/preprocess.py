"""Per-sample transforms for images read from files or shards, at each image's own resolution (torchvision
transforms v2), and the `Preprocessing` a checkpoint records so that evaluation resizes and normalises as
training did.

Training: random-resized (Inception) crop, horizontal flip, RandAugment, each on one image in a loader worker,
returning uint8; then on the batch: normalisation and MixUp/CutMix (`BatchMix`). Evaluation: the shorter side
resized to `img_size / crop_pct`, then a centre crop of `img_size` (timm's eval transform). Workers return uint8 so
that four times fewer bytes cross process boundaries and normalisation can run on the accelerator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vitlab.data.transforms import AugmentConfig
from vitlab.errors import VitlabError

INTERPOLATIONS = {"nearest": v2.InterpolationMode.NEAREST, "bilinear": v2.InterpolationMode.BILINEAR,
                  "bicubic": v2.InterpolationMode.BICUBIC, "lanczos": v2.InterpolationMode.LANCZOS,
                  "box": v2.InterpolationMode.BOX, "hamming": v2.InterpolationMode.HAMMING}
DEFAULT_CROP_PCT = 0.875  # timm's default


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects of an image: its size (height, width), per-channel mean and std (of pixels in [0, 1]),
    the resampling filter, and the share of the resized image the evaluation centre crop keeps."""

    img_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = DEFAULT_CROP_PCT

    def __post_init__(self) -> None:
        size = self.img_size
        if isinstance(size, int) and not isinstance(size, bool):
            object.__setattr__(self, "img_size", (size, size))
        elif (not isinstance(size, (tuple, list)) or len(size) != 2
              or not all(isinstance(side, int) and not isinstance(side, bool) for side in size)):
            raise VitlabError(f"preprocessing img_size must be an integer or [height, width], got {size!r}")
        object.__setattr__(self, "img_size", tuple(self.img_size))
        if not all(1 <= side <= 16_384 for side in self.img_size):
            raise VitlabError(f"preprocessing img_size {list(self.img_size)} is out of range (1..16384)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) not in (1, 3)
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in value)):
                raise VitlabError(f"preprocessing {name} must be 1 or 3 finite numbers, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if len(self.mean) != len(self.std) or not all(v > 0 for v in self.std):
            raise VitlabError(f"preprocessing std must be positive and as long as mean, got mean {list(self.mean)} "
                              f"std {list(self.std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise VitlabError(f"preprocessing interpolation {self.interpolation!r} is not one of "
                              f"{', '.join(INTERPOLATIONS)}")
        if (isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float))
                or not 0.05 <= self.crop_pct <= 1):
            raise VitlabError(f"preprocessing crop_pct must be in [0.05, 1], got {self.crop_pct!r}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def mode(self) -> str:
        """The Pillow mode images are decoded to."""
        return "RGB" if self.channels == 3 else "L"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what a checkpoint stores)."""
        return {"img_size": list(self.img_size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "crop_pct": self.crop_pct}

    @classmethod
    def from_dict(cls, data: Any, where: str = "preprocessing") -> Preprocessing:
        """The inverse of `to_dict`; anything else is refused naming `where` and the key."""
        if not isinstance(data, dict):
            raise VitlabError(f"{where}: preprocessing must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"img_size", "mean", "std", "interpolation", "crop_pct"})
        if unknown:
            raise VitlabError(f"{where}: unknown preprocessing key(s) {', '.join(map(repr, unknown[:5]))}")
        try:
            return cls(**data)
        except VitlabError as error:
            raise VitlabError(f"{where}: {error}") from None


def _to_uint8(image: Image.Image | torch.Tensor) -> torch.Tensor:
    return image if isinstance(image, torch.Tensor) else TF.pil_to_tensor(image)


class SampleEvalTransform:
    """A decoded Pillow image → uint8 (C, H, W): shorter side to `img_size / crop_pct` (floored, as timm does),
    then the centre `img_size`. A non-square `img_size` scales so that both sides reach their targets."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing
        height, width = preprocessing.img_size
        self.scale_size = (math.floor(height / preprocessing.crop_pct), math.floor(width / preprocessing.crop_pct))
        self.interpolation = INTERPOLATIONS[preprocessing.interpolation]

    def resize(self, image: Image.Image) -> Image.Image:
        if self.scale_size[0] == self.scale_size[1]:
            return TF.resize(image, self.scale_size[0], interpolation=self.interpolation, antialias=True)
        width, height = image.size
        ratio = min(height / self.scale_size[0], width / self.scale_size[1])
        size = [round(height / ratio), round(width / ratio)]
        return TF.resize(image, size, interpolation=self.interpolation, antialias=True)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return _to_uint8(TF.center_crop(self.resize(image), list(self.preprocessing.img_size)))


class SampleTrainTransform:
    """A decoded Pillow image → uint8 (C, H, W) at `img_size`: random-resized crop (`augment.scale`,
    `augment.ratio`), horizontal flip (when `augment.hflip` and the data allow it), RandAugment. Randomness comes
    from torch's global generator, which the loader seeds per sample."""

    def __init__(self, preprocessing: Preprocessing, augment: AugmentConfig, flips_allowed: bool = True) -> None:
        self.preprocessing = preprocessing
        interpolation = INTERPOLATIONS[preprocessing.interpolation]
        self.crop = v2.RandomResizedCrop(list(preprocessing.img_size), scale=augment.scale, ratio=augment.ratio,
                                         interpolation=interpolation, antialias=True)
        self.flip = v2.RandomHorizontalFlip() if augment.hflip and flips_allowed else None
        self.randaugment = (v2.RandAugment(augment.randaugment_ops, augment.randaugment_magnitude)
                            if augment.randaugment_ops else None)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.crop(image)
        if self.flip is not None:
            image = self.flip(image)
        pixels = _to_uint8(image)
        if self.randaugment is not None:
            pixels = self.randaugment(pixels)
        return pixels


def normalize_batch(images: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """uint8 (B, C, H, W) → float32 `(x / 255 - mean) / std`, on the images' device (the same operations as
    torchvision's ToTensor + Normalize, so the values are the same). The result is contiguous: a Pillow image's
    tensor is a channels-last view, on which the per-channel operations would run strided."""
    mean = torch.tensor(preprocessing.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocessing.std, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255).sub_(mean).div_(std)


@dataclass
class BatchMix:
    """MixUp and/or CutMix on a normalised batch (one of them per batch, chosen at random when both are on):
    (images, int labels) → (mixed images, soft targets); without either, the batch passes unchanged."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        mixers = []
        if self.mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=self.mixup_alpha, num_classes=self.num_classes))
        if self.cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=self.cutmix_alpha, num_classes=self.num_classes))
        self.mix = v2.RandomChoice(mixers) if mixers else None

    @classmethod
    def from_augment(cls, augment: AugmentConfig, num_classes: int) -> BatchMix:
        return cls(num_classes, augment.mixup_alpha, augment.cutmix_alpha)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (images, labels) if self.mix is None else self.mix(images, labels)
