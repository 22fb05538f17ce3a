"""Lazy image-folder loading: paths and labels are listed once (`vitlab.data.folder`); each image is decoded and
augmented in DataLoader worker processes, so memory does not grow with the number of images.

Training order is the in-memory path's: each epoch a seeded permutation of the split, every step takes the next
global batch and each rank its strided share. Each sample's augmentation is seeded by (seed, epoch, position in the
epoch), and each batch's MixUp/CutMix by (seed, step, rank), so a run resumed at any step, with any number of
workers, sees the very batches an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitlab.data.folder import FolderSplit
from vitlab.data.images import ImageLimits, load_image
from vitlab.data.preprocess import BatchMix, Preprocessing, SampleEvalTransform, normalize_batch
from vitlab.errors import VitlabError

SKIP_HINT = "set skip_bad_images=true to skip and count unreadable images"
Sample = tuple[torch.Tensor | None, int, list[str], str | None]  # (uint8 image, label, skipped paths, error)


def default_workers(local_world_size: int = 1) -> int:
    """Decoding workers per process: the cores this process may use, shared by the processes on this machine,
    less one for the training loop, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(local_world_size, 1) - 1))


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(part) % 2**63 for part in parts]).generate_state(1, np.uint64)[0]) % 2**63


@contextlib.contextmanager
def seeded_cpu_generator(seed: int) -> Iterator[None]:
    """torch's CPU generator seeded for the block and restored after it: `torch.random.fork_rng(devices=[])` with
    `torch.manual_seed`, without their cost of visiting every device backend, which is paid once per sample."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class NormalizingTransform:
    """A per-sample transform followed by normalisation, for loaders whose batches stay on the CPU: there the
    workers normalise in parallel, instead of the training process after them (an accelerator normalises the
    uint8 batch itself, which also crosses to it in a quarter of the bytes)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], preprocessing: Preprocessing) -> None:
        self.transform, self.preprocessing = transform, preprocessing

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return normalize_batch(self.transform(image)[None], self.preprocessing)[0]


def normalizes_in_workers(device: torch.device | None) -> bool:
    """Whether batches for `device` are normalised per sample in the loader workers (see `NormalizingTransform`)."""
    return device is None or device.type == "cpu"


class FolderDataset(torch.utils.data.Dataset):
    """Decode-and-transform one image per item. An item is an index, or (index, seed): the transform then runs
    under that seed (the caller's random state is kept). A bad file gives an error string (one line, naming it)
    rather than an exception, so that the main process raises it without a worker traceback; with
    `skip_bad_images` it is skipped: replaced by the next readable file when `substitute` (training batches keep
    their size), else dropped."""

    def __init__(self, split: FolderSplit, transform: Callable[[Image.Image], torch.Tensor], mode: str = "RGB",
                 skip_bad_images: bool = False, limits: ImageLimits | None = None, substitute: bool = True) -> None:
        self.split, self.transform, self.mode = split, transform, mode
        self.skip_bad_images, self.limits, self.substitute = skip_bad_images, limits or ImageLimits(), substitute

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample:
        index, seed = item if isinstance(item, tuple) else (item, None)
        skipped: list[str] = []
        for _ in range(len(self.split)):
            path = self.split.paths[index]
            try:
                image = load_image(path, self.mode, self.limits)
            except VitlabError as error:
                if not self.skip_bad_images:
                    return None, -1, skipped, str(error)
                skipped.append(path)
                if not self.substitute:
                    return None, -1, skipped, None
                index = (index + 1) % len(self.split)
                continue
            if seed is None:
                pixels = self.transform(image)
            else:
                with seeded_cpu_generator(seed):
                    pixels = self.transform(image)
            return pixels, int(self.split.labels[index]), skipped, None
        return None, -1, skipped, f"{self.split.name}: no readable images"


def collate(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(images (B, C, H, W): uint8, or float when normalised in the workers; int64 labels (B,), skipped paths,
    errors) of the readable samples. The images are stacked as `default_collate` stacks them: in a worker, straight
    into the shared memory that carries them to the main process."""
    kept = [sample for sample in samples if sample[0] is not None]
    skipped = [path for sample in samples for path in sample[2]]
    errors = [sample[3] for sample in samples if sample[3]]
    images = (torch.utils.data.default_collate([sample[0] for sample in kept]) if kept
              else torch.empty(0, dtype=torch.uint8))
    return images, torch.tensor([sample[1] for sample in kept], dtype=torch.int64), skipped, errors


class StepBatchSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Endless batches of (index, sample seed), one per training step from `start_step` on: this rank's strided
    share of each global batch of `global_batch` images, drawn from a seeded permutation per epoch (the same
    permutation the in-memory path uses). Partial last batches of an epoch are dropped."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if global_batch % world_size:
            raise VitlabError(f"batch_size {global_batch} (global) is not divisible by {world_size} process(es)")
        if not 0 <= rank < world_size:
            raise VitlabError(f"rank {rank} is outside world size {world_size}")
        self.steps_per_epoch = num_samples // global_batch
        if self.steps_per_epoch == 0:
            raise VitlabError(f"batch_size {global_batch} is larger than the training set ({num_samples})")
        if start_step < 0:
            raise VitlabError(f"start step must be non-negative, got {start_step}")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step, order_epoch = self.start_step, -1
        order, base = torch.empty(0, dtype=torch.int64), 0
        while True:
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order, base, order_epoch = torch.randperm(self.num_samples, generator=generator), _mix_seed(
                    self.seed, epoch), epoch
            first = position * self.global_batch
            indices = order[first:first + self.global_batch].tolist()
            yield [(indices[slot], (base + first + slot) % 2**63)
                   for slot in range(self.rank, self.global_batch, self.world_size)]
            step += 1


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise VitlabError(f"{errors[0]}; {SKIP_HINT}")


@dataclass
class TrainBatches:
    """What `folder_batches` and `shards.shard_batches` return: (inputs, targets) per step, forever. `skipped`
    holds the unreadable files met so far (with `skip_bad_images`); `steps_per_epoch` counts global batches per
    epoch. Batches arrive normalised when `normalizes_in_workers(device)`, else as uint8 to normalise here."""

    loader: torch.utils.data.DataLoader
    preprocessing: Preprocessing
    mix: BatchMix | None
    seed: int
    start_step: int
    rank: int
    device: torch.device | None
    steps_per_epoch: int

    def __post_init__(self) -> None:
        self.step = self.start_step
        self.skipped: set[str] = set()
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.loader)
        images, labels, skipped, errors = next(self._batches)
        _raise_errors(errors)
        self.skipped.update(skipped)
        inputs, labels = _on_device(images, labels, self.preprocessing, self.device)
        if self.mix is not None:
            with seeded_cpu_generator(_mix_seed(self.seed, self.step, self.rank)):
                inputs, labels = self.mix(inputs, labels)
        self.step += 1
        return inputs, labels

    def close(self) -> None:
        """Stop the worker processes; the iterator ends."""
        self._batches = iter(())


def _on_device(images: torch.Tensor, labels: torch.Tensor, preprocessing: Preprocessing,
               device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch as model inputs on `device`: moved there (non-blocking from pinned memory) and normalised
    there, unless the workers normalised it already."""
    if normalizes_in_workers(device):
        return images, labels
    images = images.to(device, non_blocking=True)
    return normalize_batch(images, preprocessing), labels.to(device, non_blocking=True)


def _loader_options(workers: int, device: torch.device | None, persistent: bool) -> dict[str, Any]:
    """Training iterates one endless loader for the whole run, so its workers live as long without being
    persistent (and `close` can stop them); evaluation passes over its loader again and again, so it keeps its
    workers between passes."""
    return {"num_workers": workers, "collate_fn": collate, "pin_memory": device is not None and device.type == "cuda",
            "persistent_workers": persistent and workers > 0}


def folder_batches(dataset: FolderSplit, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                   world_size: int = 1, workers: int | None = None,
                   transform: Callable[[Image.Image], torch.Tensor] | None = None, mix: BatchMix | None = None,
                   preprocessing: Preprocessing | None = None, skip_bad_images: bool = False,
                   limits: ImageLimits | None = None, device: torch.device | None = None,
                   local_world_size: int = 1) -> TrainBatches:
    """Endless training batches of a folder split for this rank, from `start_step` on: (float inputs
    (batch_size // world_size, C, H, W) normalised by `preprocessing`, targets: int64 labels, or soft targets
    when `mix` mixes). `batch_size` is the global batch; `transform` is the per-sample transform (usually a
    `SampleTrainTransform`; default: the evaluation transform). An accelerator `device` gets the uint8 batch
    (pinned, non-blocking on CUDA) and normalises it; on the CPU the workers normalise. `workers` defaults to
    `default_workers`."""
    preprocessing = preprocessing or Preprocessing()
    transform = transform or SampleEvalTransform(preprocessing)
    if normalizes_in_workers(device):
        transform = NormalizingTransform(transform, preprocessing)
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start_step, rank, world_size)
    workers = default_workers(local_world_size) if workers is None else workers
    source = FolderDataset(dataset, transform, preprocessing.mode, skip_bad_images, limits, substitute=True)
    loader = torch.utils.data.DataLoader(source, batch_sampler=sampler, **_loader_options(workers, device, False))
    return TrainBatches(loader, preprocessing, mix, seed, start_step, rank, device, sampler.steps_per_epoch)


@dataclass
class EvalBatches:
    """A re-iterable evaluation loader: each pass yields (float inputs (B, C, H, W), int64 labels) of this rank's
    share of the split in a fixed order; `skipped` holds the unreadable files left out (with `skip_bad_images`)."""

    loader: torch.utils.data.DataLoader
    preprocessing: Preprocessing
    device: torch.device | None
    num_samples: int

    def __post_init__(self) -> None:
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped, errors in self.loader:
            _raise_errors(errors)
            self.skipped.update(skipped)
            if not len(labels):
                continue
            yield _on_device(images, labels, self.preprocessing, self.device)


def eval_batches(dataset: FolderSplit, preprocessing: Preprocessing, batch_size: int, workers: int | None = None,
                 rank: int = 0, world_size: int = 1, skip_bad_images: bool = False,
                 limits: ImageLimits | None = None, device: torch.device | None = None,
                 local_world_size: int = 1) -> EvalBatches:
    """Evaluation batches of a folder split (resize the shorter side to img_size / crop_pct, centre crop,
    normalise); rank r of `world_size` reads images r, r + world_size, ... so the ranks' sums add up to the
    split's."""
    if batch_size < 1:
        raise VitlabError(f"eval batch size must be positive, got {batch_size}")
    indices = list(range(rank, len(dataset), world_size))
    transform: Callable[[Image.Image], torch.Tensor] = SampleEvalTransform(preprocessing)
    if normalizes_in_workers(device):
        transform = NormalizingTransform(transform, preprocessing)
    source = FolderDataset(dataset, transform, preprocessing.mode, skip_bad_images, limits, substitute=False)
    workers = default_workers(local_world_size) if workers is None else workers
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(source, indices), batch_size=batch_size,
                                         shuffle=False, **_loader_options(workers, device, True))
    return EvalBatches(loader, preprocessing, device, len(indices))
