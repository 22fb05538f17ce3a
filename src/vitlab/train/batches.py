"""Where the Trainer's training batches come from: one small class per kind of training set.

The interface (`BatchSource`): `batches(start_step)` returns an iterator that yields, for steps `start_step`,
`start_step + 1`, ... in order, this process's share of that step's global batch as `(inputs, targets)`:

- `inputs`: float (B, C, H, W) at the model's size and channel count, normalised and augmented (the transform runs
  inside the source, so a source may run it in DataLoader workers, per sample);
- `targets`: int64 labels (B,), or soft targets (B, classes) when mixup / CutMix is on;
- B = the global batch size / the number of processes.

The loop calls `next()` once per step, after seeding the step's randomness (`distributed.step_seed` under several
processes), so a source that draws augmentation from torch's global generator in the calling process stays
reproducible, and a resumed run (a fresh iterator from its checkpoint's step) continues the same sequence of
batches. `batch_source` picks the class for a training set; a new kind of set is one new class plus one branch
there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vitlab.data import (AugmentConfig, BatchMix, FolderSplit, ImageTensors, Preprocessing, SampleTrainTransform,
                         folder_batches, match_channels)
from vitlab.data.shards import ShardSet, stream_batches
from vitlab.train.distributed import Distributed

Batch = tuple[torch.Tensor, torch.Tensor]
# (uint8 images (B, C, H, W), int64 labels (B,)) → (inputs, targets) ready for the model
BatchTransform = Callable[[torch.Tensor, torch.Tensor], Batch]


class BatchSource(Protocol):
    def batches(self, start_step: int) -> Iterator[Batch]:
        """This process's augmented (inputs, targets) for steps `start_step`, `start_step + 1`, ..."""
        ...


@dataclass(frozen=True)
class TensorBatches:
    """A training set held in memory: a fresh seeded permutation per epoch; every process draws the same global
    batch and takes its strided share (as DistributedSampler does); the last partial batch of an epoch is dropped."""

    images: ImageTensors
    batch_size: int  # global
    seed: int
    dist: Distributed
    in_chans: int
    transform: BatchTransform

    def batches(self, start_step: int) -> Iterator[Batch]:
        steps_per_epoch = len(self.images) // self.batch_size
        order, order_epoch = torch.empty(0, dtype=torch.int64), -1
        for step in itertools.count(start_step):
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order, order_epoch = torch.randperm(len(self.images), generator=generator), epoch
            indices = order[position * self.batch_size:(position + 1) * self.batch_size]
            indices = indices[self.dist.rank::self.dist.world_size]
            yield self.transform(match_channels(self.images.images[indices], self.in_chans),
                                 self.images.labels[indices])


@dataclass(frozen=True)
class ShardBatches:
    """WebDataset shards streamed by DataLoader workers, resampled and seeded by (seed, start step, rank)."""

    shards: ShardSet
    batch_size: int  # global
    seed: int
    dist: Distributed
    size: tuple[int, int]
    in_chans: int
    transform: BatchTransform

    def batches(self, start_step: int) -> Iterator[Batch]:
        stream = stream_batches(self.shards, self.batch_size // self.dist.world_size, self.dist.rank,
                                self.dist.world_size, self.seed, start_step, self.size, self.dist.local_world_size)
        for images, labels in stream:
            yield self.transform(match_channels(images, self.in_chans), labels)


@dataclass(frozen=True)
class FolderBatches:
    """An image folder read lazily: DataLoader workers decode each image and apply the per-sample transforms
    (random-resized crop, flip, RandAugment); the batch is then normalised by `preprocessing` and mixed (MixUp /
    CutMix). Each sample's randomness is seeded by its place in the run, so a resumed run sees the same batches.
    `skipped` collects the unreadable files met (with `skip_bad_images`)."""

    split: FolderSplit
    batch_size: int  # global
    seed: int
    dist: Distributed
    preprocessing: Preprocessing
    augment: AugmentConfig
    workers: int | None
    skip_bad_images: bool
    skipped: set[str] = field(default_factory=set)

    def batches(self, start_step: int) -> Iterator[Batch]:
        augment = self.augment
        mix = (BatchMix.from_augment(augment, self.split.num_classes)
               if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0 else None)
        device = self.dist.device if self.dist.device.type == "cuda" else None
        with torch.random.fork_rng(devices=[]):  # building the loader draws from the global generator
            loader = folder_batches(
                self.split, self.batch_size, self.seed, start_step, self.dist.rank, self.dist.world_size,
                self.workers, SampleTrainTransform(self.preprocessing, augment, self.split.flips_allowed), mix,
                self.preprocessing, self.skip_bad_images, device=device, local_world_size=self.dist.local_world_size)
        try:
            while True:
                with torch.random.fork_rng(devices=[]):  # so is starting its workers; the run's stream stays its own
                    batch = next(loader)
                self.skipped.update(loader.skipped)
                yield batch
        finally:
            loader.close()


def batch_source(train: ImageTensors | ShardSet | FolderSplit, batch_size: int, seed: int, dist: Distributed,
                 size: tuple[int, int], in_chans: int, transform: BatchTransform,
                 folder: tuple[Preprocessing, AugmentConfig, int | None, bool] | None = None) -> BatchSource:
    """The source for a training set: shards are streamed, an image folder is read lazily (`folder`: its
    preprocessing, augmentation, workers and skip_bad_images), anything else is held in memory."""
    if isinstance(train, ShardSet):
        return ShardBatches(train, batch_size, seed, dist, size, in_chans, transform)
    if isinstance(train, FolderSplit):
        if folder is None:
            raise TypeError("an image folder's batch source needs its preprocessing and augmentation")
        return FolderBatches(train, batch_size, seed, dist, *folder)
    return TensorBatches(train, batch_size, seed, dist, in_chans, transform)
