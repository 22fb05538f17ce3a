"""Image folders: the layouts vitlab reads, listed once into paths and labels (nothing decoded), and their splits.

Layouts (class folders may nest images at any depth; hidden files and folders are ignored):

- `ROOT/train/<class>/` with `ROOT/val/<class>/` and/or `ROOT/test/<class>/`: the ImageNet / timm layout. The
  evaluation split is `val` (else `test`); its labels follow the training split's class list, and a class that
  training does not have is refused.
- `ROOT/<class>/` (or `ROOT/train/<class>/` alone): a seeded, stratified hold-out split of `val_fraction` of each
  class is set aside as the `holdout` split, which the training split never contains.

`split_name` says which split an evaluation uses, so that every printed result can name it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from vitlab.data.images import FORMATS, READ_ERRORS, ImageLimits, read_image
from vitlab.data.tensors import ImageTensors
from vitlab.errors import VitlabError

__all__ = ["FORMATS", "READ_ERRORS", "FolderSplit", "PathTable", "check_same_classes", "folder_classes",
           "list_image_folder", "load_folder_split", "read_image", "split_name"]

SPLITS = ("train", "eval", "val", "test", "holdout", "all")
EVAL_DIRS = ("val", "test")
DEFAULT_VAL_FRACTION = 0.1


class PathTable:
    """File paths packed into one byte array plus offsets: no Python object per path, so forked DataLoader workers
    share the table without copy-on-write growth."""

    def __init__(self, paths: Iterable[str]) -> None:
        encoded = [os.fsencode(path) for path in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(path) for path in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return os.fsdecode(self.blob[self.offsets[index]:self.offsets[index + 1]].tobytes())


@dataclass(eq=False)
class FolderSplit:
    """One split of an image folder: paths and int64 labels, the class names (the training split's) and the
    split's name ("train", "val", "test", "holdout" or "all")."""

    root: Path
    split: str
    paths: PathTable
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str
    flips_allowed: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _subdirs(folder: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    except OSError as error:
        raise VitlabError(f"{folder}: cannot list image folder ({error.strerror or error})") from None


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _layout(root: Path) -> tuple[Path, dict[str, Path]]:
    """(the folder of training classes, {"val"/"test": folder} of the evaluation splits present)."""
    if not root.is_dir():
        raise VitlabError(f"{root}: image folder not found")
    names = _subdirs(root)
    present = {name: root / name for name in EVAL_DIRS if name in names}
    if "train" in names and (present or set(names) <= {"train", *EVAL_DIRS}):
        others = [name for name in names if name not in ("train", *EVAL_DIRS)]
        if others:
            raise VitlabError(f"{root}: holds train/ and {'/ and '.join(present)}/ beside other folders "
                              f"({', '.join(others[:5])}): use ROOT/train/<class>/ with ROOT/val/<class>/, or "
                              "ROOT/<class>/ alone")
        return root / "train", present
    if present and "train" not in names:
        raise VitlabError(f"{root}: holds {'/ and '.join(present)}/ but no train/ folder")
    return root, {}


def _list_classes(folder: Path, progress: bool) -> tuple[list[str], list[list[str]]]:
    """Class names and, per class, its image files (sorted); refuses a folder without two classes or with an
    empty class."""
    classes = _subdirs(folder)
    if len(classes) < 2:
        loose = sum(1 for entry in os.scandir(folder) if entry.is_file() and _is_image_name(entry.name))
        hint = f"; it holds {loose} image file(s) directly: put them in one sub-folder per class" if loose else ""
        raise VitlabError(f"{folder}: an image folder needs at least two class sub-folders, found "
                          f"{len(classes)}{hint}")
    files: list[list[str]] = []
    with tqdm(desc=f"listing {folder}", unit=" files", delay=1.0, disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for name in classes:
            found = []
            for directory, subdirs, names in os.walk(folder / name):
                subdirs[:] = sorted(sub for sub in subdirs if not sub.startswith("."))
                found.extend(os.path.join(directory, entry) for entry in names
                             if _is_image_name(entry) and not entry.startswith("."))
            if not found:
                raise VitlabError(f"{folder / name}: class folder holds no images "
                                  f"({' '.join(sorted({ext.lstrip('.') for ext in IMG_EXTENSIONS}))})")
            files.append(sorted(found))
            bar.update(len(found))
    return classes, files


def folder_classes(root: str | Path) -> tuple[str, ...]:
    """The class names of an image folder (its training split's), from the folder names alone: nothing listed."""
    train_dir, _ = _layout(Path(root))
    return tuple(_subdirs(train_dir))


def split_name(root: str | Path, split: str = "eval", val_fraction: float | None = DEFAULT_VAL_FRACTION) -> str:
    """The name of the split `split` resolves to in ROOT: "eval" is "val", "test" or "holdout" (or "train" where
    `val_fraction` is None and nothing is held out). Lists nothing."""
    if split not in SPLITS:
        raise VitlabError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if split != "eval":
        return split
    _, present = _layout(Path(root))
    if present:
        return next(iter(present))
    return "holdout" if val_fraction is not None else "train"


def _holdout(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask: a seeded `fraction` of each class (at least one image of a class with two or more, never
    a class's last image)."""
    mask = np.zeros(len(labels), dtype=bool)
    generator = torch.Generator().manual_seed(seed)
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        count = min(len(members) - 1, max(1, round(fraction * len(members)))) if fraction > 0 else 0
        chosen = torch.randperm(len(members), generator=generator)[:count].numpy()
        mask[members[chosen]] = True
    return mask


def list_image_folder(root: str | Path, split: str = "train", val_fraction: float | None = DEFAULT_VAL_FRACTION,
                      seed: int = 0, progress: bool = True) -> FolderSplit:
    """List one split of an image folder (see the module doc for the layouts): "train", "eval" (val, else test,
    else the hold-out), "val", "test", "holdout", or "all" (every image of the training folder).

    `val_fraction` is the share of each class held out where the folder has no val/ or test/; None holds nothing
    out (then "eval" is the training split itself, and says so by its name). Paths are listed, not opened.
    """
    root = Path(root)
    if split not in SPLITS:
        raise VitlabError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise VitlabError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train_dir, present = _layout(root)
    resolved = split_name(root, split, val_fraction)
    if resolved in EVAL_DIRS:
        if resolved not in present:
            raise VitlabError(f"{root}: no {resolved}/ folder (found: {', '.join(present) or 'none'})")
        classes = _subdirs(train_dir)
        eval_classes, files = _list_classes(present[resolved], progress)
        missing = [name for name in eval_classes if name not in classes]
        if missing:
            raise VitlabError(f"{present[resolved]}: class(es) {', '.join(missing[:5])} are not in {train_dir} "
                              f"(its classes: {', '.join(classes[:10])})")
        index = {name: label for label, name in enumerate(classes)}
        labels = np.concatenate([np.full(len(found), index[name], dtype=np.int64)
                                 for name, found in zip(eval_classes, files, strict=True)])
        return FolderSplit(root, resolved, PathTable(path for found in files for path in found), labels,
                           tuple(classes), str(present[resolved]))
    if resolved == "holdout" and present:
        raise VitlabError(f"{root}: has a {'/ and '.join(present)}/ folder, so nothing is held out of train/")
    classes, files = _list_classes(train_dir, progress)
    labels = np.concatenate([np.full(len(found), label, dtype=np.int64) for label, found in enumerate(files)])
    paths = [path for found in files for path in found]
    holding_out = not present and val_fraction is not None and resolved in ("train", "holdout")
    if not holding_out:
        return FolderSplit(root, "all" if resolved == "all" else "train", PathTable(paths), labels, tuple(classes),
                           str(train_dir))
    mask = _holdout(labels, len(classes), val_fraction, seed)
    keep = mask if resolved == "holdout" else ~mask
    if not keep.any():
        raise VitlabError(f"{root}: the hold-out split is empty (val_fraction={val_fraction}); raise val_fraction "
                          "or add a val/ folder")
    chosen = np.flatnonzero(keep)
    return FolderSplit(root, resolved, PathTable(paths[i] for i in chosen), labels[chosen], tuple(classes),
                       f"{root} ({resolved}, val_fraction={val_fraction}, seed={seed})")


def check_same_classes(checkpoint_classes: Sequence[str], dataset_classes: Sequence[str], where: str) -> None:
    """Refuse to evaluate a checkpoint on a data set whose class names differ from the checkpoint's, naming
    the first differences."""
    if list(checkpoint_classes) == list(dataset_classes):
        return
    ours, theirs = set(checkpoint_classes), set(dataset_classes)
    if ours == theirs and len(checkpoint_classes) == len(dataset_classes):
        raise VitlabError(f"{where}: the same class names as the checkpoint but in another order; refusing to "
                          "score them by index")
    only_data = [name for name in dataset_classes if name not in ours][:5]
    only_model = [name for name in checkpoint_classes if name not in theirs][:5]
    parts = ([f"the data set has {', '.join(map(repr, only_data))}"] if only_data else []) + (
        [f"the checkpoint has {', '.join(map(repr, only_model))}"] if only_model else [])
    raise VitlabError(f"{where}: its classes differ from the checkpoint's ({'; '.join(parts)})")


def load_folder_split(root: str | Path, split: str, img_size: int, skip_bad_images: bool = False,
                      val_fraction: float | None = None, seed: int = 0, mode: str = "RGB",
                      limits: ImageLimits | None = None) -> ImageTensors:
    """A split of an image folder decoded into memory at `img_size` (resize the shorter side, centre crop): for
    small folders and commands that need a tensor; training reads folders lazily (`vitlab.data.loader`)."""
    listing = list_image_folder(root, split, val_fraction, seed)
    images, labels, skipped = [], [], 0
    for index in tqdm(range(len(listing)), desc=f"decoding {listing.name}", unit=" images", delay=1.0,
                      file=sys.stderr, dynamic_ncols=True):
        try:
            images.append(read_image(Path(listing.paths[index]), mode, (img_size, img_size), limits))
        except VitlabError:
            if not skip_bad_images:
                raise
            skipped += 1
            continue
        labels.append(int(listing.labels[index]))
    if skipped:
        print(f"{listing.name}: skipped {skipped} unreadable image(s)", file=sys.stderr)
    if not images:
        raise VitlabError(f"{listing.name}: no readable images found")
    return ImageTensors(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), listing.classes,
                        listing.name)

