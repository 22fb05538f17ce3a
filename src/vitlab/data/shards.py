"""WebDataset tar shards: write them (`vitlab data shard`), stream them into training across ranks and workers.

A shard is a plain tar whose members follow the WebDataset convention: `{key}.png` (or the source's own `.jpg`,
`.webp`, ...) and `{key}.cls` (the class index as ASCII) per sample, samples in a seeded random order so every
shard mixes the classes. `vitlab data shard` writes `OUT/train-000000.tar ...`, the evaluation split's
`OUT/{val,test,holdout}-000000.tar ...` (named after the split it is, see `vitlab.data.folder`) and
`OUT/dataset.json` (classes, channels, sample counts per shard, `eval_split`), which tells the trainer the epoch
length. Opening split "test" of shards whose index has no "test" opens its `eval_split`.

Reading (needs the optional `webdataset` package: `pip install 'vitlab[dist]'`; it also opens `pipe:` and http
URLs) splits the shard list by rank and then by DataLoader worker:

- epoch mode (`resampled=False`): each epoch the shard list is shuffled with the same seed on every rank, and
  rank r, worker w reads shards r, r + world, ... of it, then every `workers`-th of those: every sample is read
  exactly once per epoch across all ranks and workers;
- resampled mode (`resampled=True`, what training uses): an infinite stream; each rank and worker draws shards
  with replacement from its own seeded generator, so ranks never run dry at different times (OpenCLIP's
  `--dataset-resampled`).

Writing needs nothing but the standard library and Pillow.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from vitlab.atomic import atomic_write, fsync_directory
from vitlab.data.datasets import BUILTIN, load_dataset
from vitlab.data.folder import DEFAULT_VAL_FRACTION, FolderSplit, list_image_folder, split_name
from vitlab.data.images import (
    FORMATS,
    READ_ERRORS,
    ImageLimits,
    check_image,
    decode_image,
    load_image,
    open_regular,
)
from vitlab.data.loader import (NormalizingTransform, Sample, TrainBatches, collate, default_workers,
                                normalizes_in_workers)
from vitlab.data.preprocess import BatchMix, Preprocessing
from vitlab.data.tensors import ImageTensors
from vitlab.errors import VitlabError

INFO_FILE = "dataset.json"
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
SHUFFLE_BUFFER = 1000


# ---------------------------------------------------------------------------------------------------- writing
def _png(image: torch.Tensor) -> bytes:
    array = image.numpy()
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mtime = 0  # reproducible shards
    member.mode = 0o644
    archive.addfile(member, io.BytesIO(data))


def write_shards(samples: Iterable[tuple[str, bytes, int]], out: Path, prefix: str, shard_size: int
                 ) -> list[dict[str, Any]]:
    """Write (image extension, image bytes, label) samples into OUT/PREFIX-000000.tar, ... of `shard_size` each,
    keys numbered in order; returns [{"name", "num_samples"}] per shard."""
    if shard_size <= 0:
        raise VitlabError(f"--shard-size must be positive, got {shard_size}")
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    archive: tarfile.TarFile | None = None
    for index, (extension, data, label) in enumerate(samples):
        if index % shard_size == 0:
            if archive is not None:
                archive.close()
            name = f"{prefix}-{len(shards):06d}.tar"
            temp = out / f".{name}.partial"
            archive = tarfile.open(temp, "w", format=tarfile.USTAR_FORMAT)
            shards.append({"name": name, "num_samples": 0, "partial": temp})
        key = f"{index:09d}"
        _add(archive, f"{key}.{extension}", data)
        _add(archive, f"{key}.cls", str(label).encode())
        shards[-1]["num_samples"] += 1
    if archive is not None:
        archive.close()
    # Re-sharding into the same folder replaces shards by name. The old index goes first, so a folder left half
    # re-written is read by scanning the shards it holds, never through sample counts of shards since replaced.
    (out / INFO_FILE).unlink(missing_ok=True)
    for shard in shards:
        os.replace(shard.pop("partial"), out / shard["name"])
    fsync_directory(out)
    return shards


def _folder_samples(split: FolderSplit, seed: int, skip_bad_images: bool, limits: ImageLimits
                    ) -> list[tuple[str, int]]:
    """The split's (path, label) pairs whose images pass `check_image`, in a seeded random order."""
    good, skipped = [], 0
    for index in range(len(split)):
        path = split.paths[index]
        try:
            check_image(path, limits)
        except VitlabError as error:
            if not skip_bad_images:
                raise VitlabError(f"{error}; pass --skip-bad-images to leave it out") from None
            skipped += 1
            continue
        good.append((path, int(split.labels[index])))
    if skipped:
        print(f"{split.name}: skipped {skipped} unreadable image(s)", file=sys.stderr)
    random.Random(seed).shuffle(good)
    return good


def _extension(path: str) -> str:
    extension = os.path.splitext(path)[1].lower().lstrip(".")
    return "jpg" if extension == "jpeg" else "tif" if extension == "tiff" else extension


def _folder_split_samples(files: list[tuple[str, int]], resize: int | None, limits: ImageLimits
                          ) -> Iterator[tuple[str, bytes, int]]:
    """The files' own bytes; with `resize`, images whose shorter side exceeds it are scaled down to it and
    re-encoded in their format (JPEG at quality 95; formats Pillow cannot write become PNG)."""
    for path, label in files:
        with open_regular(path) as handle:
            data = handle.read()
        extension = _extension(path)
        if resize is not None:
            image = load_image(path, "RGB", limits)
            if min(image.size) > resize:
                scale = resize / min(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                if extension == "jpg":
                    image.save(buffer, format="JPEG", quality=95)
                elif extension == "webp":
                    image.save(buffer, format="WEBP", quality=95)
                else:
                    extension = "png"
                    image.save(buffer, format="PNG")
                data = buffer.getvalue()
        yield extension, data, label


def _tensor_samples(data: ImageTensors, seed: int) -> Iterator[tuple[str, bytes, int]]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for index in order.tolist():
        yield "png", _png(data.images[index]), int(data.labels[index])


def shard_dataset(source: str, out: str | Path, shard_size: int = 1000, subset: int | None = None, seed: int = 0,
                  skip_bad_images: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION,
                  resize: int | None = None, limits: ImageLimits | None = None) -> dict[str, Any]:
    """Write a built-in data set (fashion-mnist, digits, cifar10, cifar100) or an image folder as shards plus
    OUT/dataset.json; returns what dataset.json holds.

    Built-in sets are stored as PNG under `train` and `test`. An image folder's files are copied as they are (a
    JPEG stays a JPEG) unless `resize` asks for a shorter side of at most that many pixels; its training split and
    its evaluation split (val/, else test/, else a stratified hold-out of `val_fraction`; none where that is 0)
    are written under their names, and `eval_split` in dataset.json names the latter.
    """
    if shard_size <= 0:
        raise VitlabError(f"--shard-size must be positive, got {shard_size}")
    if resize is not None and resize < 1:
        raise VitlabError(f"--resize must be positive, got {resize}")
    limits = limits or ImageLimits()
    out = Path(out)
    info: dict[str, Any] = {"format": "vitlab-shards", "source": source, "seed": seed, "splits": {}}
    if source in BUILTIN:
        if resize is not None:
            raise VitlabError("--resize applies to image folders only")
        for split in ("train", "test"):
            data = load_dataset(source, split, subset if split == "train" else None, seed)
            shards = write_shards(_tensor_samples(data, seed), out, split, shard_size)
            info["splits"][split] = {"num_samples": len(data), "shards": shards}
        info.update(classes=list(data.classes), channels=int(data.images.shape[1]), flips_allowed=data.flips_allowed,
                    image_size=list(data.images.shape[-2:]), eval_split="test")
    else:
        root = Path(source)
        if not root.is_dir():
            raise VitlabError(f"unknown data set {source!r}: use one of {', '.join(BUILTIN)} or an image folder")
        if subset is not None:
            raise VitlabError("--subset applies to built-in data sets only")
        held_out = split_name(root, "eval", val_fraction) != "holdout" or val_fraction > 0
        listings = [list_image_folder(root, split, val_fraction, seed) for split in ("train", "eval")[:1 + held_out]]
        checked = [(listing, _folder_samples(listing, seed, skip_bad_images, limits)) for listing in listings]
        for listing, files in checked:
            if not files:
                raise VitlabError(f"{listing.name}: no readable images")
            shards = write_shards(_folder_split_samples(files, resize, limits), out, listing.split, shard_size)
            info["splits"][listing.split] = {"num_samples": len(files), "shards": shards}
        info.update(classes=list(listings[0].classes), channels=3, flips_allowed=True, image_size=None,
                    eval_split=listings[1].split if held_out else None, resize=resize)
    atomic_write(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------------------------------------------- finding
def _expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand
    except ImportError:  # comes with webdataset
        return [pattern]
    return list(braceexpand(pattern))


def is_shard_dataset(name: str) -> bool:
    """A directory of `*.tar` shards (or with a dataset.json), a `.tar` file or a brace pattern of them."""
    if name.endswith(".tar") or (".tar" in name and "{" in name):
        return True
    path = Path(name)
    return path.is_dir() and ((path / INFO_FILE).exists() or any(path.glob("*.tar")))


@dataclass
class ShardSet:
    """A split's shards and what is known about them: `len()` is the number of samples (one epoch)."""

    urls: list[str]
    num_samples: int
    classes: tuple[str, ...]
    channels: int
    name: str
    flips_allowed: bool = True

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def open(cls, source: str, split: str) -> ShardSet:
        """`source` is a shard directory or a pattern like `/data/in1k/train-{000000..001023}.tar`; the test
        split is the one in the dataset.json beside the shards, else the pattern with `train` replaced by `test`."""
        path = Path(source)
        if path.is_dir():
            info_path = path / INFO_FILE
            if info_path.exists():
                info = _read_info(info_path)
                if split == "test" and split not in info["splits"] and isinstance(info.get("eval_split"), str):
                    split = info["eval_split"]
                if split not in info["splits"]:
                    raise VitlabError(f"{info_path}: no {split!r} split")
                entry = info["splits"][split]
                urls = [str(path / shard["name"]) for shard in entry["shards"]]
                return cls(urls, int(entry["num_samples"]), tuple(info["classes"]), int(info["channels"]),
                           f"{source}/{split}", bool(info.get("flips_allowed", True)))
            urls = sorted(str(p) for p in path.glob(f"{split}-*.tar")) or (
                sorted(str(p) for p in path.glob("*.tar")))
        else:
            urls = _expand(source)
            index_dir = Path(os.path.dirname(urls[0])) if urls else None
            if split != "train" and index_dir is not None and (index_dir / INFO_FILE).exists():
                return cls.open(str(index_dir), split)  # the other split, as the shard index lists it
            pattern = source
            if split != "train":
                head, tail = os.path.split(source)
                if "train" not in tail:
                    raise VitlabError(f"{source}: cannot find the {split} shards; name the training shards "
                                      f"'...train...' so that '...{split}...' names the {split} shards")
                pattern = os.path.join(head, tail.replace("train", split))
            urls = _expand(pattern)
            info_path = Path(os.path.dirname(urls[0])) / INFO_FILE if urls else None
            if info_path is not None and info_path.exists():
                info = _read_info(info_path)
                counts = {shard["name"]: shard["num_samples"] for entry in info["splits"].values()
                          for shard in entry["shards"]}
                if all(os.path.basename(url) in counts for url in urls):
                    return cls(urls, sum(counts[os.path.basename(url)] for url in urls), tuple(info["classes"]),
                               int(info["channels"]), source, bool(info.get("flips_allowed", True)))
        if not urls:
            raise VitlabError(f"{source}: no {split} shards found")
        return cls._scanned(urls, source)

    @classmethod
    def _scanned(cls, urls: list[str], source: str) -> ShardSet:
        """Without a dataset.json: count samples and classes by reading the tar headers (local files only)."""
        count, labels = 0, set()
        for url in urls:
            if not os.path.exists(url):
                raise VitlabError(f"{url}: not found (remote shards need a dataset.json beside them)")
            with tarfile.open(url) as archive:
                for member in archive:
                    extension = member.name.rpartition("/")[2].partition(".")[2]
                    if extension == "cls":
                        count += 1
                        labels.add(int(archive.extractfile(member).read()))
        if not count:
            raise VitlabError(f"{source}: the shards hold no samples with a .cls label")
        image, _ = next(iter(ShardStream(urls[:1], channels=None, shuffle_shards=False)))
        return cls(urls, count, tuple(str(label) for label in range(max(labels) + 1)), image.shape[0], source)


def _read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise VitlabError(f"{path}: unreadable shard index: {error}") from None
    if not isinstance(info, dict) or info.get("format") != "vitlab-shards":
        raise VitlabError(f"{path}: not a vitlab shard index")
    return info


# ---------------------------------------------------------------------------------------------------- reading
def decode(data: bytes, channels: int | None, size: tuple[int, int] | None, where: str = "",
           limits: ImageLimits | None = None) -> torch.Tensor:
    """Image bytes → uint8 (C, H, W): grey or RGB, and centre-fitted to `size` (height, width) when given. The
    declared size is bounded by `limits` before decoding."""
    limits = limits or ImageLimits()
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
                raise VitlabError(f"{where}: cannot decode image ({width}×{height} pixels is over the bound "
                                  f"max_pixels={limits.max_pixels}, max_side={limits.max_side})")
            image = ImageOps.exif_transpose(image)
            mode = {1: "L", 3: "RGB"}.get(channels or 0, "L" if image.mode in ("L", "I;16", "1") else "RGB")
            image = image.convert(mode)
            if size is not None and image.size != (size[1], size[0]):
                image = ImageOps.fit(image, (size[1], size[0]), Image.Resampling.BICUBIC)
            array = np.array(image, dtype=np.uint8)
    except READ_ERRORS as error:
        raise VitlabError(f"{where}: cannot decode image ({error})") from None
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


class ShardStream(torch.utils.data.IterableDataset):
    """(image uint8 CHW, label) samples from shards, split by rank and by DataLoader worker (see the module doc).

    `epochs=None` repeats epoch mode forever (epoch `start`, `start + 1`, ...); `keys=True` adds each sample's
    `(shard url, key)` as a third item. With a per-sample `transform` (a Pillow image → uint8 tensor, e.g.
    `SampleTrainTransform`), the stream yields `vitlab.data.loader.Sample` tuples instead (image, label, skipped,
    error), for `collate` and `TrainBatches`: a bad image becomes an error naming it, or is skipped with
    `skip_bad_images`.
    """

    def __init__(self, urls: list[str], rank: int = 0, world_size: int = 1, seed: int = 0, resampled: bool = False,
                 epochs: int | None = 1, start: int = 0, shuffle_buffer: int = 0, size: tuple[int, int] | None = None,
                 channels: int | None = 3, shuffle_shards: bool = True, keys: bool = False,
                 transform: Callable[[Image.Image], torch.Tensor] | None = None, skip_bad_images: bool = False,
                 limits: ImageLimits | None = None) -> None:
        super().__init__()
        if not urls:
            raise VitlabError("no shards to read")
        self.urls, self.rank, self.world_size, self.seed = list(urls), rank, world_size, seed
        self.resampled, self.epochs, self.start, self.shuffle_buffer = resampled, epochs, start, shuffle_buffer
        self.size, self.channels, self.shuffle_shards, self.keys = size, channels, shuffle_shards, keys
        self.transform, self.skip_bad_images, self.limits = transform, skip_bad_images, limits or ImageLimits()

    def shards(self, worker: int = 0, workers: int = 1) -> Iterator[str]:
        """The shard URLs this rank's `worker` reads, in order."""
        if self.resampled:
            rng = random.Random(f"vitlab-resample/{self.seed}/{self.start}/{self.rank}/{worker}")
            while True:
                yield rng.choice(self.urls)
        epoch = self.start
        while self.epochs is None or epoch < self.start + self.epochs:
            order = list(self.urls)
            if self.shuffle_shards:
                random.Random(f"vitlab-epoch/{self.seed}/{epoch}").shuffle(order)
            mine = order[self.rank::self.world_size][worker::workers]
            if not mine:
                return
            yield from mine
            epoch += 1

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        try:
            from webdataset.filters import _shuffle
            from webdataset.tariterators import tarfile_samples
        except ImportError:
            raise VitlabError("reading WebDataset shards needs the webdataset package: "
                              "pip install 'vitlab[dist]'") from None
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = tarfile_samples({"url": url} for url in self.shards(worker, workers))
        if self.shuffle_buffer > 1:
            rng = random.Random(f"vitlab-shuffle/{self.seed}/{self.start}/{self.rank}/{worker}")
            samples = _shuffle(samples, self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)
        for sample in samples:
            where = f"{sample.get('__url__')}:{sample.get('__key__')}"
            image_key = next((key for key in IMAGE_KEYS if key in sample), None)
            if image_key is None or "cls" not in sample:
                raise VitlabError(f"{where}: a sample needs an image ({'/'.join(IMAGE_KEYS)}) and a .cls label")
            if self.transform is not None:
                yield self._sample(sample[image_key], int(sample["cls"]), where)
                continue
            image = decode(sample[image_key], self.channels, self.size, where, self.limits)
            label = int(sample["cls"])
            yield (image, label, (sample["__url__"], sample["__key__"])) if self.keys else (image, label)


    def _sample(self, data: bytes, label: int, where: str) -> Sample:
        try:
            image = decode_image(data, where, "L" if self.channels == 1 else "RGB", self.limits)
        except VitlabError as error:
            return (None, -1, [where], None) if self.skip_bad_images else (None, -1, [], str(error))
        return self.transform(image), label, [], None


def loader_workers(local_world_size: int = 1) -> int:
    """Decoding workers per process: the cores this machine's processes share, less one for training, up to 4."""
    return max(0, min(4, (os.cpu_count() or 1) // max(local_world_size, 1) - 1))


def stream_batches(shards: ShardSet, batch_size: int, rank: int, world_size: int, seed: int, start: int,
                   size: tuple[int, int], local_world_size: int = 1, workers: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless iterator of this rank's training batches: (uint8 images (B, C, H, W), int64 labels (B,)).

    Resampled shards, seeded by (seed, start step, rank, worker): a resumed run draws a fresh, reproducible
    stream rather than replaying the interrupted one.
    """
    dataset = ShardStream(shards.urls, rank, world_size, seed, resampled=True, start=start,
                          shuffle_buffer=SHUFFLE_BUFFER, size=size, channels=shards.channels)
    workers = loader_workers(local_world_size) if workers is None else workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    while True:
        yield from loader


def shard_batches(shards: ShardSet, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                  world_size: int = 1, workers: int | None = None,
                  transform: Callable[[Image.Image], torch.Tensor] | None = None, mix: BatchMix | None = None,
                  preprocessing: Preprocessing | None = None, skip_bad_images: bool = False,
                  limits: ImageLimits | None = None, device: torch.device | None = None,
                  local_world_size: int = 1) -> TrainBatches:
    """`folder_batches` for shards: endless (float inputs, targets) of this rank's share (`batch_size` is
    global), each image decoded and transformed per sample (default: the evaluation transform), normalised and
    mixed on the batch. The stream is resampled and seeded by (seed, start step, rank, worker), as
    `stream_batches`'s; a skipped bad image leaves its batch one image short."""
    from vitlab.data.preprocess import SampleEvalTransform

    if batch_size % world_size:
        raise VitlabError(f"batch_size {batch_size} (global) is not divisible by {world_size} process(es)")
    preprocessing = preprocessing or Preprocessing()
    transform = transform or SampleEvalTransform(preprocessing)
    if normalizes_in_workers(device):
        transform = NormalizingTransform(transform, preprocessing)
    stream = ShardStream(shards.urls, rank, world_size, seed, resampled=True, start=start_step,
                         shuffle_buffer=SHUFFLE_BUFFER, channels=preprocessing.channels, transform=transform,
                         skip_bad_images=skip_bad_images, limits=limits)
    workers = default_workers(local_world_size) if workers is None else workers
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size // world_size, num_workers=workers,
                                         collate_fn=collate, drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device is not None and device.type == "cuda")
    return TrainBatches(loader, preprocessing, mix, seed, start_step, rank, device, len(shards) // batch_size)


def load_shard_split(source: str, split: str, img_size: int) -> ImageTensors:
    """A whole split (the test set) decoded into memory at `img_size`, in shard order."""
    shards = ShardSet.open(source, split)
    stream = ShardStream(shards.urls, channels=shards.channels, size=(img_size, img_size), shuffle_shards=False)
    images, labels = [], []
    for image, label in stream:
        images.append(image)
        labels.append(label)
    if not images:
        raise VitlabError(f"{source}: the {split} shards are empty")
    if max(labels) >= shards.num_classes:
        raise VitlabError(f"{source}: label {max(labels)} but only {shards.num_classes} classes")
    return ImageTensors(torch.stack(images), torch.tensor(labels, dtype=torch.int64), shards.classes,
                        shards.name, shards.flips_allowed)
