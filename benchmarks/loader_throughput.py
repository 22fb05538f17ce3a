"""Training-transform throughput of vitlab's lazy image-folder loader against timm's `create_loader` and
torchvision's `ImageFolder` + DataLoader, and the loader's peak memory at two folder sizes.

    python benchmarks/loader_throughput.py [--images 20000] [--workers 4] [--batch-size 64] [--img-size 224]
                                           [--batches 100] [--repeats 3] [--folder DIR] [--json PATH]

A folder of realistic JPEGs is generated once (cached in `--folder`): random crops of 300-500 px per side from
scikit-image's bundled photos, with random colour shifts and JPEG quality, in 10 classes. Every contender decodes
each JPEG with Pillow and applies the same training transform in `--workers` worker processes: random-resized crop
to `--img-size` (scale (0.08, 1), ratio (3/4, 4/3), bilinear), horizontal flip, conversion to float and
normalisation (vitlab normalises the uint8 batch in the main process, as it would on the accelerator; the others
in the workers). Each repeat runs the contenders in turn (A, B, C, A, B, C, ...), skips the first batches of each
(worker start-up) and reports images/s over `--batches` batches; the median of the repeats is reported.

Peak memory: for each of `--rss-counts` (default 2,000 and all `--images`), a fresh subprocess lists a folder of
that many images (symbolic links into the generated folder) and reads `--batches` batches with vitlab's loader;
it reports the peak resident set of the main process and of the largest worker. The goal is memory that does not
grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
CLASSES = 10
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------- the folder
def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs of 300-500 px per side under root/class_k/, made once (a marker file records the count)."""
    marker = root / ".generated.json"
    if marker.exists() and json.loads(marker.read_text()).get("count") == count:
        return root
    import skimage.data

    bases = [getattr(skimage.data, name)() for name in PHOTOS]
    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
        (root / f"class_{label:02d}").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for index in range(count):
        base = bases[rng.integers(len(bases))]
        height, width = (int(side) for side in rng.integers(300, 501, size=2))
        scale = max(height / base.shape[0], width / base.shape[1], 1.0)
        image = Image.fromarray(base)
        if scale > 1:
            image = image.resize((int(base.shape[1] * scale) + 1, int(base.shape[0] * scale) + 1),
                                 Image.Resampling.BILINEAR)
        top = int(rng.integers(0, image.height - height + 1))
        left = int(rng.integers(0, image.width - width + 1))
        pixels = np.asarray(image.crop((left, top, left + width, top + height)), dtype=np.float32)
        pixels = pixels * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-20, 20, size=3)
        picture = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        picture.save(root / f"class_{index % CLASSES:02d}" / f"{index:06d}.jpg", quality=int(rng.integers(80, 96)))
        if index % 1000 == 999:
            print(f"generated {index + 1}/{count} images ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    marker.write_text(json.dumps({"count": count}))
    return root


def linked_subset(root: Path, count: int) -> Path:
    """A folder of `count` symbolic links into `root` (the first images of each class, round robin)."""
    target = root.parent / f"{root.name}-links-{count}"
    if (target / ".generated.json").exists():
        return target
    files = sorted(root.glob("class_*/*.jpg"), key=lambda path: path.name)[:count]
    for path in files:
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        (target / path.parent.name / path.name).symlink_to(path)
    (target / ".generated.json").write_text(json.dumps({"count": count}))
    return target


# ---------------------------------------------------------------------------------------------------- contenders
def vitlab_loader(root: Path, args: argparse.Namespace) -> Iterator[Any]:
    from vitlab.data import AugmentConfig, Preprocessing, SampleTrainTransform, folder_batches, list_image_folder

    preprocessing = Preprocessing(args.img_size, MEAN, STD, "bilinear")
    split = list_image_folder(root, "all", progress=False)
    transform = SampleTrainTransform(preprocessing, AugmentConfig(hflip=True))
    return folder_batches(split, args.batch_size, seed=0, workers=args.workers, transform=transform,
                          preprocessing=preprocessing)


def timm_loader(root: Path, args: argparse.Namespace) -> Iterator[Any]:
    from timm.data import ImageDataset, create_loader

    loader = create_loader(ImageDataset(str(root)), (3, args.img_size, args.img_size), args.batch_size,
                           is_training=True, hflip=0.5, color_jitter=None, interpolation="bilinear", mean=MEAN,
                           std=STD, num_workers=args.workers, use_prefetcher=False, persistent_workers=True)
    return endless(loader)


def torchvision_loader(root: Path, args: argparse.Namespace) -> Iterator[Any]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(args.img_size, interpolation=v2.InterpolationMode.BILINEAR),
                            v2.RandomHorizontalFlip(), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(MEAN, STD)])
    loader = torch.utils.data.DataLoader(ImageFolder(str(root), transform=transform), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0)
    return endless(loader)


def endless(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


CONTENDERS: dict[str, Callable[[Path, argparse.Namespace], Iterator[Any]]] = {
    "vitlab": vitlab_loader, "timm": timm_loader, "torchvision": torchvision_loader}


def images_per_second(batches: Iterator[Any], args: argparse.Namespace) -> float:
    for _ in islice(batches, args.warmup):
        pass
    started = time.perf_counter()
    count = sum(len(batch[0]) for batch in islice(batches, args.batches))
    return count / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------- memory
def peak_rss_child(root: Path, args: argparse.Namespace) -> None:
    """Run in a subprocess: read `--batches` batches with vitlab's loader, print peak RSS (MiB) as JSON."""
    batches = vitlab_loader(root, args)
    for _ in islice(batches, args.warmup + args.batches):
        pass
    batches.close()
    del batches
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_mib": round(main, 1), "largest_worker_mib": round(workers, 1)}))


def peak_rss(root: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--rss-child", str(root), "--workers", str(args.workers), "--batch-size",
               str(args.batch_size), "--img-size", str(args.img_size), "--batches", str(args.batches), "--warmup",
               str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="images in the generated folder")
    parser.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=100, help="timed batches per contender and repeat")
    parser.add_argument("--warmup", type=int, default=5, help="batches skipped before timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-counts", type=int, nargs="*", help="folder sizes for peak memory "
                                                                 "(default: 2000 and --images)")
    parser.add_argument("--contenders", nargs="+", choices=tuple(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--folder", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "vitlab-loader-bench")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.rss_child is not None:
        peak_rss_child(args.rss_child, args)
        return {}
    root = make_folder(args.folder / f"jpegs-{args.images}", args.images)
    runs: dict[str, list[float]] = {name: [] for name in args.contenders}
    loaders = {name: CONTENDERS[name](root, args) for name in args.contenders}
    for repeat in range(args.repeats):
        for name, batches in loaders.items():
            runs[name].append(images_per_second(batches, args))
            print(f"repeat {repeat + 1}: {name} {runs[name][-1]:.1f} img/s", file=sys.stderr)
    del loaders
    throughput = {name: statistics.median(values) for name, values in runs.items()}
    others = [value for name, value in throughput.items() if name != "vitlab"]
    counts = args.rss_counts or sorted({min(2000, args.images), args.images})
    memory = {str(count): peak_rss(linked_subset(root, count) if count < args.images else root, args)
              for count in counts}
    result = {"settings": {key: value for key, value in vars(args).items() if key not in ("folder", "json",
                                                                                          "rss_child")},
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "img_per_s": throughput,
              "vitlab_vs_best_other": throughput.get("vitlab", 0) / max(others) if others and "vitlab" in throughput
              else None, "peak_rss_mib": memory}
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
