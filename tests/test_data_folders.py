"""Image folders: every layout and split, the refusals, hostile files, and the lazy loader's determinism."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import tarfile
import time
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.cli import main
from vitlab.data import (
    AugmentConfig,
    BatchMix,
    ImageLimits,
    Preprocessing,
    SampleTrainTransform,
    check_same_classes,
    eval_batches,
    folder_batches,
    list_image_folder,
    load_dataset,
    split_name,
)
from vitlab.data.images import load_image
from vitlab.data.loader import StepBatchSampler
from vitlab.errors import VitlabError

PRE = Preprocessing(16, interpolation="bilinear", crop_pct=1.0)


def photos(folder: Path, count: int, seed: int = 0, fmt: str = "PNG") -> None:
    """`count` small random pictures of assorted sizes in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        height, width = rng.integers(12, 30, size=2)
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)


def flat(root: Path, counts: dict[str, int]) -> Path:
    for seed, (name, count) in enumerate(counts.items()):
        photos(root / name, count, seed)
    return root


@pytest.fixture()
def pets(tmp_path: Path) -> Path:
    return flat(tmp_path / "pets", {"cat": 10, "dog": 20, "eel": 5})


# ---------------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("eval_dirs,expected", [(("val",), "val"), (("test",), "test"), (("val", "test"), "val")])
def test_train_val_layout_is_never_read_as_classes(tmp_path: Path, eval_dirs: tuple[str, ...], expected: str
                                                   ) -> None:
    root = tmp_path / "imagenet"
    flat(root / "train", {"ant": 4, "bee": 3, "cow": 2})
    for name in eval_dirs:
        flat(root / name, {"ant": 2, "cow": 1})  # an evaluation split may lack a class
    train = list_image_folder(root, "train")
    held = list_image_folder(root, "eval")
    assert train.classes == held.classes == ("ant", "bee", "cow")
    assert (train.split, held.split, split_name(root)) == ("train", expected, expected)
    assert len(train) == 9 and sorted(held.labels.tolist()) == [0, 0, 2]  # labels follow train/'s class list
    assert all(f"/{expected}/" in held.paths[i] for i in range(len(held)))
    assert all("/train/" in train.paths[i] for i in range(len(train)))
    if len(eval_dirs) == 2:
        assert list_image_folder(root, "test").split == "test"
    data = load_dataset(str(root), "test", img_size=8)  # the in-memory path resolves the same split
    assert data.classes == ("ant", "bee", "cow") and len(data) == 3 and data.name.endswith(expected)


def test_flat_folder_gets_a_seeded_stratified_holdout(pets: Path) -> None:
    train = list_image_folder(pets, "train", val_fraction=0.2, seed=1)
    held = list_image_folder(pets, "eval", val_fraction=0.2, seed=1)
    assert held.split == split_name(pets, val_fraction=0.2) == "holdout" and train.split == "train"
    train_paths = {train.paths[i] for i in range(len(train))}
    held_paths = {held.paths[i] for i in range(len(held))}
    assert not train_paths & held_paths and len(train_paths | held_paths) == 35
    assert np.bincount(held.labels).tolist() == [2, 4, 1]  # 20% of each class, stratified
    assert {held.paths[i] for i in range(len(held))} == {
        list_image_folder(pets, "holdout", val_fraction=0.2, seed=1).paths[i] for i in range(len(held))}
    other = list_image_folder(pets, "holdout", val_fraction=0.2, seed=2)
    assert {other.paths[i] for i in range(len(other))} != held_paths
    (pets / "cat" / "._000.png").write_bytes(b"a macOS resource fork")  # hidden files are not images
    (pets / ".thumbnails").mkdir()  # nor are hidden folders classes
    everything = list_image_folder(pets, "all")
    assert len(everything) == 35 and everything.split == "all" and everything.classes == ("cat", "dog", "eel")
    assert list_image_folder(pets, "eval", val_fraction=None).split == "train"  # nothing held out: says so


def test_a_class_named_train_in_a_flat_folder_stays_a_class(tmp_path: Path) -> None:
    root = flat(tmp_path / "vehicles", {"bus": 3, "car": 3, "train": 3})
    assert list_image_folder(root, "all").classes == ("bus", "car", "train")


@pytest.mark.parametrize("layout,message", [
    ({"a": 3, "b": 0}, "class folder holds no images"),
    ({"a": 3}, "at least two class sub-folders, found 1"),
    ({}, "found 0; it holds 2 image file(s) directly"),
    ({"train/a": 2, "train/b": 2, "val/a": 1, "val/zebra": 1}, "zebra are not in"),
    ({"val/a": 2, "val/b": 2}, "no train/ folder"),
    ({"train/a": 2, "train/b": 2, "val/a": 1, "val/b": 1, "extra": 1}, "beside other folders (extra)"),
])
def test_bad_layouts_are_refused_in_one_line(tmp_path: Path, layout: dict[str, int], message: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        photos(root / name, count)
    if not layout:
        photos(root, 2)
    with pytest.raises(VitlabError, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        for split in ("train", "eval"):
            list_image_folder(root, split)
    assert "\n" not in str(raised.value)


def test_wrong_arguments_are_refused(pets: Path, tmp_path: Path) -> None:
    with pytest.raises(VitlabError, match="val_fraction"):
        list_image_folder(pets, "train", val_fraction=1.0)
    with pytest.raises(VitlabError, match="unknown split"):
        list_image_folder(pets, "validation")
    with pytest.raises(VitlabError, match="not found"):
        list_image_folder(tmp_path / "nowhere")
    with pytest.raises(VitlabError, match="no val/ folder"):
        list_image_folder(pets, "val")


def test_checkpoint_classes_must_match_the_data_sets() -> None:
    check_same_classes(["cat", "dog"], ("cat", "dog"), "pets")
    with pytest.raises(VitlabError, match=r"pets: .*'eel'.*'dog'"):
        check_same_classes(["cat", "dog"], ["cat", "eel"], "pets")
    with pytest.raises(VitlabError, match="another order"):
        check_same_classes(["cat", "dog"], ["dog", "cat"], "pets")


# ---------------------------------------------------------------------------------------------------- hostile files
def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_pixel_bound_is_checked_before_decoding(tmp_path: Path) -> None:
    thin = tmp_path / "thin.png"  # 1 × 150,000,000 pixels declared in a file of a few hundred bytes
    thin.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 150_000_000, 1, 8, 2, 0, 0, 0))
                     + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + png_chunk(b"IEND", b""))
    started = time.perf_counter()
    with pytest.raises(VitlabError, match=r"thin.png: .*150000000×1 pixels .*max_pixels"):
        load_image(thin)
    assert time.perf_counter() - started < 1.0
    Image.new("RGB", (100, 60)).save(tmp_path / "six-thousand.png")
    with pytest.raises(VitlabError, match="max_pixels=5000"):
        load_image(tmp_path / "six-thousand.png", limits=ImageLimits(max_pixels=5000))
    with pytest.raises(VitlabError, match="max_side=80"):
        load_image(tmp_path / "six-thousand.png", limits=ImageLimits(max_side=80))
    assert load_image(tmp_path / "six-thousand.png", limits=ImageLimits(max_pixels=6000)).size == (100, 60)
    with pytest.raises(VitlabError, match="max_pixels must be a positive integer"):
        ImageLimits(max_pixels=0)


@pytest.fixture()
def alarm() -> Iterator[None]:
    """Fail instead of hanging for ever."""
    def timeout(*_: object) -> None:
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(pets: Path, alarm: None) -> None:
    fifo = pets / "cat" / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(VitlabError, match="x.png: cannot read image .not a regular file"):
        load_image(fifo)
    split = list_image_folder(pets, "all")
    with pytest.raises(VitlabError, match="x.png: cannot read image .not a regular file.*skip_bad_images"):
        for _ in islice(folder_batches(split, 35, seed=0, workers=0, preprocessing=PRE), 3):
            pass


def corrupt(pets: Path) -> Path:
    bad = pets / "dog" / "007.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated mid-file
    return bad


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_met_mid_epoch_is_named_or_skipped_and_counted(pets: Path, workers: int) -> None:
    bad = corrupt(pets)
    split = list_image_folder(pets, "all")
    batches = folder_batches(split, 5, seed=0, workers=workers, preprocessing=PRE)
    with pytest.raises(VitlabError) as raised:
        for _ in islice(batches, 7):  # one epoch: 7 steps of 5
            pass
    message = str(raised.value)
    assert str(bad) in message and "skip_bad_images=true" in message and "\n" not in message
    batches = folder_batches(split, 5, seed=0, workers=workers, preprocessing=PRE, skip_bad_images=True)
    shapes = [inputs.shape for inputs, _ in islice(batches, 7)]
    assert shapes == [(5, 3, 16, 16)] * 7 and batches.skipped == {str(bad)}
    held = eval_batches(split, PRE, 8, workers=workers, skip_bad_images=True)
    assert sum(len(labels) for _, labels in held) == 34 and held.skipped == {str(bad)}


# ---------------------------------------------------------------------------------------------------- loading
def take(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(batches, steps))


def test_training_batches_are_deterministic_and_resume_mid_epoch(pets: Path) -> None:
    split = list_image_folder(pets, "train")
    transform = SampleTrainTransform(PRE, AugmentConfig(hflip=True, randaugment_ops=1))
    mix = BatchMix(split.num_classes, mixup_alpha=0.8, cutmix_alpha=1.0)
    options = dict(seed=4, transform=transform, mix=mix, preprocessing=PRE)
    torch.manual_seed(0)
    full = take(folder_batches(split, 6, workers=0, **options), 8)  # 5 steps per epoch: crosses an epoch
    torch.manual_seed(99)  # the caller's random state plays no part
    resumed = take(folder_batches(split, 6, start_step=3, workers=1, **options), 5)
    for (x, y), (x2, y2) in zip(full[3:], resumed, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert full[0][0].shape == (6, 3, 16, 16) and full[0][1].shape == (6, 3)  # soft MixUp/CutMix targets
    other = take(folder_batches(split, 6, workers=0, **{**options, "seed": 5}), 1)
    assert not torch.equal(other[0][0], full[0][0])


def test_cpu_batches_normalised_in_workers_equal_the_reference_pipeline(pets: Path) -> None:
    """On the CPU the workers normalise each sample, seeding torch's CPU generator directly; the batch must be what
    seeding with `torch.manual_seed` in a forked RNG and normalising the stacked uint8 batch gives."""
    from vitlab.data.preprocess import normalize_batch

    split = list_image_folder(pets, "train")
    transform = SampleTrainTransform(PRE, AugmentConfig(hflip=True, randaugment_ops=2))
    for workers in (0, 1):
        inputs, labels = next(folder_batches(split, 6, seed=3, workers=workers, transform=transform,
                                             preprocessing=PRE))
        expected = []
        for index, sample_seed in next(iter(StepBatchSampler(len(split), 6, seed=3))):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                expected.append(transform(load_image(split.paths[index])))
        assert inputs.dtype == torch.float32 and inputs.is_contiguous()
        assert torch.equal(inputs, normalize_batch(torch.stack(expected), PRE))
        assert labels.tolist() == [int(split.labels[index]) for index, _ in
                                   next(iter(StepBatchSampler(len(split), 6, seed=3)))]


def test_ranks_share_each_global_batch_and_epochs_visit_every_image_once() -> None:
    whole = StepBatchSampler(30, 6, seed=2)
    ranks = [StepBatchSampler(30, 6, seed=2, rank=rank, world_size=3) for rank in range(3)]
    for batch, *shares in islice(zip(whole, *ranks, strict=True), 10):
        assert sorted(batch) == sorted(item for share in shares for item in share)
    epoch = [index for batch in islice(StepBatchSampler(30, 6, seed=2), 5) for index, _ in batch]
    assert sorted(epoch) == list(range(30))
    # the same order as the in-memory path's permutation of each epoch
    assert epoch == torch.randperm(30, generator=torch.Generator().manual_seed(2 * 1_000_003)).tolist()
    later = next(iter(StepBatchSampler(30, 6, seed=2, start_step=7)))
    assert later == next(islice(StepBatchSampler(30, 6, seed=2), 7, None))
    with pytest.raises(VitlabError, match="larger than the training set"):
        StepBatchSampler(5, 6, seed=0)


def test_eval_batches_resize_crop_normalise_and_split_across_ranks(pets: Path) -> None:
    split = list_image_folder(pets, "eval", val_fraction=0.2)
    whole = [(x, y) for x, y in eval_batches(split, PRE, 3, workers=0)]
    assert sum(len(y) for _, y in whole) == len(split) == 7
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16) and x.abs().max() <= 1 for x, _ in whole)
    parts = [torch.cat([y for _, y in eval_batches(split, PRE, 3, workers=0, rank=r, world_size=2)]) for r in (0, 1)]
    assert sorted(torch.cat(parts).tolist()) == sorted(split.labels.tolist())


# ---------------------------------------------------------------------------------------------------- shards
def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive}


@pytest.mark.parametrize("layout", ["flat", "train-val", "train-test"])
def test_shard_every_layout_keeping_the_source_bytes(tmp_path: Path, layout: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from vitlab.data.shards import ShardSet, ShardStream

    root = tmp_path / "src"
    if layout == "flat":
        for seed, name in enumerate(("a", "b")):
            photos(root / name, 10, seed, "JPEG")
    else:
        for seed, name in enumerate(("a", "b")):
            photos(root / "train" / name, 6, seed, "JPEG")
            photos(root / layout[6:] / name, 2, seed + 5, "JPEG")
    out = tmp_path / "shards"
    assert main(["data", "shard", str(root), str(out), "--shard-size", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = {"flat": "holdout", "train-val": "val", "train-test": "test"}[layout]
    assert summary["eval_split"] == expected
    info = json.loads((out / "dataset.json").read_text())
    assert set(info["splits"]) == {"train", expected} and info["classes"] == ["a", "b"]
    counts = (info["splits"]["train"]["num_samples"], info["splits"][expected]["num_samples"])
    assert counts == ((18, 2) if layout == "flat" else (12, 4))
    sources = {path.read_bytes() for path in root.rglob("*.jpg")}
    stored = [data for shard in out.glob("*.tar") for name, data in tar_members(shard).items()
              if name.endswith(".jpg")]
    assert len(stored) == 20 if layout == "flat" else 16
    assert set(stored) <= sources  # byte for byte: a JPEG stays a JPEG
    held = ShardSet.open(str(out), "test")  # what the trainer asks for: the evaluation split
    assert len(held) == counts[1] and held.name.endswith(expected)
    train_keys = {data for shard in out.glob("train-*.tar") for data in tar_members(shard).values()}
    held_keys = {data for shard in out.glob(f"{expected}-*.tar") for name, data in tar_members(shard).items()
                 if name.endswith(".jpg")}
    assert not train_keys & held_keys
    transform = SampleTrainTransform(PRE, AugmentConfig(hflip=True))
    samples = list(ShardStream(held.urls, transform=transform))
    assert len(samples) == counts[1] and all(image.shape == (3, 16, 16) for image, _, _, _ in samples)


def test_shard_resize_re_encodes_only_large_images(tmp_path: Path) -> None:
    from vitlab.data.shards import shard_dataset

    root = tmp_path / "src"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((40, 60, 3), 90, dtype=np.uint8)).save(root / name / "big.jpg")
        Image.fromarray(np.full((10, 12, 3), 90, dtype=np.uint8)).save(root / name / "small.png")
    shard_dataset(str(root), tmp_path / "out", val_fraction=0.0, resize=20)
    sizes = sorted(Image.open(io.BytesIO(data)).size for shard in (tmp_path / "out").glob("train-*.tar")
                   for name, data in tar_members(shard).items() if not name.endswith(".cls"))
    assert sizes == [(12, 10), (12, 10), (30, 20), (30, 20)]
    with pytest.raises(VitlabError, match="--resize must be positive"):
        shard_dataset(str(root), tmp_path / "out", resize=0)


def test_shard_batches_apply_the_per_sample_transforms(tmp_path: Path) -> None:
    from vitlab.data.shards import ShardSet, shard_batches, shard_dataset

    root = flat(tmp_path / "src", {"a": 8, "b": 8})
    shard_dataset(str(root), tmp_path / "out", shard_size=4)
    shards = ShardSet.open(str(tmp_path / "out"), "train")
    batches = shard_batches(shards, 4, seed=0, workers=0, transform=SampleTrainTransform(PRE, AugmentConfig()),
                            mix=BatchMix(2, mixup_alpha=1.0), preprocessing=PRE)
    inputs, targets = next(batches)
    assert inputs.shape == (4, 3, 16, 16) and targets.shape == (4, 2)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_preprocessing_round_trips_through_json_and_refuses_nonsense() -> None:
    pre = Preprocessing((224, 192), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.9)
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocessing(32).img_size == (32, 32) and Preprocessing(32, (0.5,), (0.5,)).mode == "L"
    for bad, key in (({"img_size": 0}, "img_size"), ({"mean": [0.5, 0.5]}, "mean"), ({"std": [0, 1, 1]}, "std"),
                     ({"interpolation": "cubic"}, "interpolation"), ({"crop_pct": 2}, "crop_pct"),
                     ({"colour": 1}, "colour")):
        with pytest.raises(VitlabError, match=f"ckpt.json: .*{key}"):
            Preprocessing.from_dict({**pre.to_dict(), **bad}, "ckpt.json")
    with pytest.raises(VitlabError, match="JSON object"):
        Preprocessing.from_dict([1, 2], "ckpt.json")
