"""`ImageTensors`: a small labelled image set held in memory, the form the built-in data sets take."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitlab.errors import VitlabError


@dataclass
class ImageTensors:
    """An in-memory labelled image set: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    flips_allowed: bool = True

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise VitlabError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                              f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise VitlabError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.images[indices], self.labels[indices], self.classes, self.name, self.flips_allowed)
