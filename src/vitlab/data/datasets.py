"""Datasets: Fashion-MNIST (offline, from Debian's IDX files), scikit-learn digits, CIFAR, and image folders.

Small sets are held in memory as uint8 NCHW tensors (`ImageTensors`) so a training step never waits on a loader.
Image folders are listed by `vitlab.data.folder` and read lazily by `vitlab.data.loader`; `load_dataset` can
still decode a folder split into memory for commands that want a tensor.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from vitlab.data.folder import load_folder_split
from vitlab.data.tensors import ImageTensors
from vitlab.errors import VitlabError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
BUILTIN = ("fashion-mnist", "digits", "cifar10", "cifar100")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of (Fashion-)MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise VitlabError(f"{path}: cannot read IDX file: {error}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise VitlabError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(shape)):
        raise VitlabError(f"{path}: expected {int(np.prod(shape))} bytes of data for shape {shape}, "
                          f"found {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_mnist_files(root: Path, split: str) -> tuple[Path, Path] | None:
    prefix = "train" if split == "train" else "t10k"
    for suffix in (".gz", ""):
        images = root / f"{prefix}-images-idx3-ubyte{suffix}"
        labels = root / f"{prefix}-labels-idx1-ubyte{suffix}"
        if images.exists() and labels.exists():
            return images, labels
    return None


def fashion_mnist(split: str, root: str | Path | None = None, download: bool = True) -> ImageTensors:
    """Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist`, or torchvision's download."""
    root = Path(root or os.environ.get("VITLAB_FASHION_MNIST", FASHION_MNIST_DIR))
    files = _fashion_mnist_files(root, split)
    if files is not None:
        images, labels = (read_idx(path) for path in files)
    elif download:
        images, labels = _torchvision_fashion_mnist(split)
    else:
        raise VitlabError(f"Fashion-MNIST not found in {root}: install Debian's dataset-fashion-mnist "
                          "(apt-get install dataset-fashion-mnist) or allow the torchvision download")
    return ImageTensors(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES, f"fashion-mnist/{split}")


def _cache_dir() -> Path:
    return Path(os.environ.get("VITLAB_DATA", Path.home() / ".cache" / "vitlab" / "data"))


def _torchvision_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import FashionMNIST

    try:
        dataset = FashionMNIST(str(_cache_dir()), train=split == "train", download=True)
    except (OSError, RuntimeError) as error:
        raise VitlabError(f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR}) and the download failed: "
                          f"{error}") from None
    return dataset.data.numpy(), dataset.targets.numpy()


def digits(split: str, test_fraction: float = 0.2, seed: int = 0) -> ImageTensors:
    """scikit-learn's bundled 8×8 digits (16 grey levels scaled to 0..255), split by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise VitlabError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - test_fraction))
    chosen = order[:cut] if split == "train" else order[cut:]
    return ImageTensors(images[chosen], labels[chosen], tuple(str(d) for d in range(10)), f"digits/{split}",
                        flips_allowed=False)


def cifar(split: str, num_classes: int = 10) -> ImageTensors:
    """CIFAR-10/100 through torchvision (downloads once into $VITLAB_DATA)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_type = CIFAR10 if num_classes == 10 else CIFAR100
    try:
        dataset = dataset_type(str(_cache_dir()), train=split == "train", download=True)
    except (OSError, RuntimeError) as error:
        raise VitlabError(f"CIFAR-{num_classes} download failed: {error}") from None
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, torch.tensor(dataset.targets, dtype=torch.int64), tuple(dataset.classes),
                        f"cifar{num_classes}/{split}")


def balanced_subset(data: ImageTensors, size: int, seed: int = 0) -> ImageTensors:
    """A seeded subset with (as near as possible) the same number of images per class."""
    if size <= 0 or size > len(data):
        raise VitlabError(f"--subset {size} must be between 1 and the training set size {len(data)}")
    generator = torch.Generator().manual_seed(seed)
    per_class = [torch.nonzero(data.labels == label).flatten() for label in range(data.num_classes)]
    per_class = [members[torch.randperm(len(members), generator=generator)] for members in per_class]
    quota, extra = divmod(size, data.num_classes)
    chosen = [members[: quota + (label < extra)] for label, members in enumerate(per_class)]
    indices = torch.cat(chosen)
    if len(indices) < size:  # some class was too small: top up from the remaining images
        rest = torch.cat([members[quota + (label < extra):] for label, members in enumerate(per_class)])
        indices = torch.cat([indices, rest[torch.randperm(len(rest), generator=generator)[: size - len(indices)]]])
    return data.subset(indices.sort().values)


def load_dataset(name: str, split: str, subset: int | None = None, seed: int = 0, img_size: int = 224,
                 skip_bad_images: bool = False, val_fraction: float | None = None) -> ImageTensors:
    """A built-in name (fashion-mnist, digits, cifar10, cifar100) or a path to an image folder, in memory.

    `split` is "train" or "test" (an image folder's evaluation split: its val/, else test/, else the hold-out of
    `val_fraction`; see `vitlab.data.folder`). With `val_fraction=None` a folder without val/ or test/ serves its
    training images for both splits, and the test split's name says "train". Folder images are decoded once and
    stored at `img_size`; `vitlab.data.loader` reads folders lazily instead.
    """
    if name == "fashion-mnist":
        data = fashion_mnist(split)
    elif name == "digits":
        data = digits(split)
    elif name in ("cifar10", "cifar100"):
        data = cifar(split, int(name[5:]))
    elif os.sep in name or Path(name).exists():
        data = load_folder_split(name, "train" if split == "train" else "eval", img_size, skip_bad_images,
                                 val_fraction, seed)
    else:
        raise VitlabError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN)} or a path to an image "
                          "folder (one sub-folder per class)")
    if subset is not None and split == "train":
        data = balanced_subset(data, subset, seed)
    return data
