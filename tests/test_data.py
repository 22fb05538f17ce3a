"""Data sets and batched transforms."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab.data import AugmentConfig, EvalTransform, TrainTransform, balanced_subset, fashion_mnist, read_idx
from vitlab.data.datasets import ImageTensors
from vitlab.data.transforms import random_crop, random_resized_crop
from vitlab.errors import VitlabError
from vitlab.eval.fewshot import ridge_classifier
from vitlab.eval.metrics import confusion_matrix


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture()
def fake_fmnist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 50), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (count, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return tmp_path


def test_fashion_mnist_reads_idx_files(fake_fmnist: Path) -> None:
    data = fashion_mnist("train", root=fake_fmnist, download=False)
    assert data.images.shape == (50, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist()[:3] == [0, 1, 2] and data.classes[9] == "Ankle boot"
    assert len(fashion_mnist("test", root=fake_fmnist, download=False)) == 20


def test_missing_or_broken_idx_is_named(tmp_path: Path, fake_fmnist: Path) -> None:
    with pytest.raises(VitlabError, match="dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path / "empty", download=False)
    broken = fake_fmnist / "train-images-idx3-ubyte.gz"
    broken.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 50, 28, 28) + b"short"))
    with pytest.raises(VitlabError, match="train-images-idx3-ubyte.gz"):
        read_idx(broken)


def test_real_fashion_mnist_when_installed() -> None:
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    data = fashion_mnist("test", download=False)
    assert data.images.shape == (10_000, 1, 28, 28)
    assert torch.bincount(data.labels).tolist() == [1000] * 10


def test_balanced_subset_is_balanced_and_seeded() -> None:
    labels = torch.arange(1000) % 10
    data = ImageTensors(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), labels, tuple("abcdefghij"), "toy")
    subset = balanced_subset(data, 105, seed=3)
    counts = torch.bincount(subset.labels, minlength=10)
    assert len(subset) == 105 and counts.max() - counts.min() <= 1
    assert torch.equal(balanced_subset(data, 105, seed=3).labels, subset.labels)
    with pytest.raises(VitlabError, match="--subset"):
        balanced_subset(data, 5000)


def test_random_crop_is_a_per_sample_translation() -> None:
    images = torch.arange(2 * 1 * 5 * 5, dtype=torch.uint8).reshape(2, 1, 5, 5).repeat(64, 1, 1, 1)
    torch.manual_seed(0)
    cropped = random_crop(images, 2)
    assert cropped.shape == images.shape
    # Each output is the input shifted by (dy, dx) with |d| <= 2 and zeros shifted in.
    padded = torch.nn.functional.pad(images, (2,) * 4)
    shifts = set()
    for index in range(len(images)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(padded[index, :, dy:dy + 5, dx:dx + 5], cropped[index])]
        assert found
        shifts.add(found[0])
    assert len(shifts) > 5  # different samples get different crops


def test_train_transform_normalises_and_mixes() -> None:
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    plain = TrainTransform(AugmentConfig(), (16, 16), 10, flips_allowed=True)
    x, y = plain(images, labels)
    assert x.shape == (32, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and torch.equal(y, labels)
    mixed = TrainTransform(AugmentConfig(crop_padding=2, hflip=True, randaugment_ops=2, mixup_alpha=0.8,
                                         cutmix_alpha=1.0), (28, 28), 10, flips_allowed=True)
    x, y = mixed(images, labels)
    assert y.shape == (32, 10) and torch.allclose(y.sum(1), torch.ones(32))
    evaluated = EvalTransform((28, 28))(images)
    assert torch.equal(evaluated, EvalTransform((28, 28))(images))


def test_random_resized_crop_is_seeded_and_crops_each_image() -> None:
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(16) % 10
    crops = TrainTransform(AugmentConfig(random_resized_crop=True, scale=(0.35, 1.0)), (21, 21), 10, True)
    torch.manual_seed(0)
    first, _ = crops(images, labels)
    torch.manual_seed(0)
    again, _ = crops(images, labels)
    torch.manual_seed(1)
    other, _ = crops(images, labels)
    whole, _ = TrainTransform(AugmentConfig(), (21, 21), 10, True)(images, labels)
    assert first.shape == whole.shape == (16, 1, 21, 21) and torch.equal(first, again)
    assert not torch.equal(first, other) and all(not torch.equal(a, b) for a, b in zip(first, whole, strict=True))
    # the whole image at its own size is the identity; a box as large as the output is a window of the image
    assert torch.equal(random_resized_crop(images, (28, 28), (1.0, 1.0), (1.0, 1.0)), images)
    windows = random_resized_crop(images, (14, 14), (0.25, 0.25), (1.0, 1.0))
    for image, window in zip(images, windows, strict=True):
        assert any(torch.equal(image[:, top:top + 14, left:left + 14], window)
                   for top in range(15) for left in range(15))
    tall = torch.randint(0, 256, (4, 3, 40, 10), dtype=torch.uint8)  # no box fits: the centred whole, clamped
    assert torch.equal(random_resized_crop(tall, (10, 10), (1.0, 1.0), (1.0, 1.0)), tall[:, :, 15:25])


def test_confusion_matrix_counts() -> None:
    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_ridge_probe_separates_separable_classes() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator, dtype=torch.float64) * 5
    labels = torch.arange(40) % 4
    features = centres[labels] + 0.1 * torch.randn(40, 16, generator=generator, dtype=torch.float64)
    weights, bias = ridge_classifier(features, labels, 4, l2=1.0)
    assert torch.equal((features @ weights + bias).argmax(1), labels)
    # Heavy regularisation shrinks the weights towards zero, leaving only the bias (the mean target).
    weights, bias = ridge_classifier(features, labels, 4, l2=1e12)
    assert weights.abs().max() < 1e-6 and torch.allclose(bias, torch.full((4,), -0.5, dtype=torch.float64))


def test_resharding_that_fails_keeps_the_old_index(tmp_path: Path) -> None:
    """A wrong source or option is refused before the folder's dataset.json (the shards' sample counts) is touched."""
    from vitlab.data.shards import INFO_FILE, ShardSet, shard_dataset

    out = tmp_path / "shards"
    shard_dataset("digits", out, shard_size=1000)
    index = (out / INFO_FILE).read_text()
    with pytest.raises(VitlabError, match="unknown data set"):
        shard_dataset("no-such-source", out)
    with pytest.raises(VitlabError, match="--shard-size"):
        shard_dataset("digits", out, shard_size=0)
    assert (out / INFO_FILE).read_text() == index
    assert len(ShardSet.open(str(out), "train")) == 1437
