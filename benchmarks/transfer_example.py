"""Transfer to your own photos, offline: fine-tune from a catalogue name served by a local file:// mirror.

Builds a photo folder from scikit-image's bundled real photos (`lfw_subset`: 100 faces and 100 non-faces, 25×25
grayscale, upscaled and made RGB; held-out images in `val/`; four colour photos to predict), writes a STAND-IN
checkpoint under the exact path Google's bucket gives `vit-ti16:augreg-in21k-ft-in1k` (a real ViT-Ti/16 in the
official .npz layout, but with random weights: nothing is downloaded, so nothing pre-trained is available), serves it
with VITLAB_MIRROR=file://..., and runs the commands a user would: `vitlab models --pretrained`, `finetune --from
NAME`, `eval`, `predict`, `analyze`. Each command is printed with its output.

    PYTHONPATH=src python benchmarks/transfer_example.py [WORKDIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "vit-ti16:augreg-in21k-ft-in1k"
SIZE = 64  # fine-tuning resolution: a 4×4 patch grid for ViT-Ti/16, small enough for a CPU


def build_photos(root: Path, seed: int = 0) -> list[Path]:
    """root/{train,val}/{face,other}/*.png from lfw_subset (one image in five held out, per class), and
    root/colour/*.png; returns the colour photos."""
    from skimage import data

    faces = data.lfw_subset()  # (200, 25, 25) in [0, 1]: the first 100 are faces, the rest are not
    rng = np.random.default_rng(seed)
    for label, images in (("face", faces[:100]), ("other", faces[100:])):
        order = rng.permutation(len(images))
        for rank, index in enumerate(order):
            split = "val" if rank < len(images) // 5 else "train"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray((images[index] * 255).round().astype(np.uint8))
            gray.resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{index:03d}.png")
    colour = root / "colour"
    colour.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        paths.append(colour / f"{name}.png")
        Image.fromarray(getattr(data, name)()).save(paths[-1])
    return paths


def write_stand_in(mirror: Path) -> Path:
    """A randomly initialised ViT-Ti/16 (1000 classes) as an .npz at NAME's path under the mirror."""
    from vitlab import create_model
    from vitlab.weights import hub, save_weights

    model_name, tag = NAME.split(":")
    entry = hub.get_pretrained(model_name, tag)
    path = mirror / entry.url.removeprefix(hub._BUCKET + "/")
    save_weights(create_model(model_name, num_classes=entry.num_classes), path, "npz")
    return path


def vitlab(*args: str, env: dict[str, str]) -> None:
    """Run `vitlab ARGS` as a user would and show the command and its output."""
    print(f"$ vitlab {shlex.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "vitlab", *args], env=env, capture_output=True, text=True)
    print((result.stdout + result.stderr).rstrip(), flush=True)
    if result.returncode:
        raise SystemExit(f"vitlab {args[0]} exited with {result.returncode}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", help="where everything is written (default: a new temporary folder)")
    parser.add_argument("--epochs", default="10", help="fine-tuning epochs (10)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitlab-transfer-"))
    photos, mirror, run = work / "photos", work / "mirror", work / "run"
    colour = build_photos(photos)
    stand_in = write_stand_in(mirror)
    print(f"photos: {photos} (train/ and val/, classes face and other); stand-in checkpoint: {stand_in}\n")
    env = {**os.environ, "VITLAB_MIRROR": mirror.as_uri(), "VITLAB_CACHE": str(work / "cache"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    vitlab("models", "--pretrained", "vit-ti16", env=env)
    vitlab("finetune", "--from", NAME, "--dataset", str(photos / "train"), "--img-size", str(SIZE), "--epochs",
           args.epochs, "--batch-size", "32", "--out", str(run), "--no-progress", env=env)
    vitlab("eval", str(run), "--dataset", str(photos / "val"), env=env)
    vitlab("predict", str(run), *map(str, colour), "--top-k", "2", env=env)
    vitlab("analyze", str(run), "--images", *map(str, colour[:2]), "--dataset", str(photos / "val"), "--n", "40",
           "--out", str(work / "analysis"), env=env)


if __name__ == "__main__":
    main()
