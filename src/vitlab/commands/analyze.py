"""`vitlab analyze`: the ViT paper's "what does the model learn" pictures (Fig. 6-7) for one checkpoint.

Writes attention-rollout overlays, per-layer class-token attention of one head, mean attention distance against
depth, position-embedding similarity and the patch-embedding filters' principal components as PNGs, with
`index.html` to view them and `analysis.json` holding the numbers behind each.
"""

from __future__ import annotations

import argparse
import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vitlab.errors import VitlabError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist",)
# vitlab models are trained on inputs scaled as (x / 255 - 0.5) / 0.5.
MEAN = STD = 0.5


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="attention and embedding pictures for a checkpoint",
                                   description=__doc__)
    parser.add_argument("checkpoint", help="vitlab checkpoint, .npz, timm or Hugging Face weights")
    parser.add_argument("--model", default=None, help="registry name when the file does not say which model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="IMAGE", help="image files to analyse")
    source.add_argument("--dataset", choices=DATASETS, help="analyse the first --n test images of a dataset")
    parser.add_argument("--n", type=int, default=128, help="images to take from --dataset (paper: 128)")
    parser.add_argument("--head", type=int, default=0, help="head whose per-layer attention is drawn")
    parser.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean",
                        help="how rollout combines heads")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weights")
    parser.add_argument("--overlays", type=int, default=8, help="how many images get a rollout overlay")
    parser.add_argument("--components", type=int, default=28, help="principal components of the patch filters")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(run=run)


def _to_model_input(image: "PIL.Image.Image", in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:  # noqa: F821
    """Any Pillow image → the (C, H, W) tensor the model expects: its channels, its size, scaled to [-1, 1]."""
    from PIL import Image

    if in_chans == 1:
        image = image.convert("L")
    elif in_chans == 3:
        image = image.convert("RGB")
    else:
        raise VitlabError(f"cannot turn images into {in_chans}-channel input; only 1 (gray) or 3 (RGB) are supported")
    height, width = img_size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32).reshape(height, width, in_chans)
    return (torch.from_numpy(pixels.copy()).permute(2, 0, 1) / 255.0 - MEAN) / STD


def load_images(paths: Sequence[str | Path], in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:
    """Image files as a normalised (B, C, H, W) batch; an unreadable file is a VitlabError naming it."""
    from PIL import Image, UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                batch.append(_to_model_input(image, in_chans, img_size))
        except (OSError, UnidentifiedImageError, ValueError) as error:
            if isinstance(error, VitlabError):
                raise
            raise VitlabError(f"cannot read image {path}: {error}") from None
    return torch.stack(batch)


def read_idx_images(path: str | Path, count: int) -> np.ndarray:
    """The first `count` images of a gzipped IDX file as uint8 (N, H, W).

    Stand-in until `vitlab.data` provides the datasets; kept small so it can be swapped out in one place.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            header = stream.read(16)
            magic, total, height, width = (int.from_bytes(header[i:i + 4], "big") for i in range(0, 16, 4))
            if len(header) < 16 or magic != 2051:
                raise VitlabError(f"{path} is not an IDX image file")
            count = min(count, total)
            data = stream.read(count * height * width)
    except (OSError, EOFError) as error:
        raise VitlabError(f"cannot read {path}: {error}") from None
    if len(data) != count * height * width:
        raise VitlabError(f"{path} is truncated")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, height, width)


def load_dataset_images(name: str, count: int, in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:
    """The first `count` test images of a dataset, prepared like `load_images`."""
    from PIL import Image

    if name != "fashion-mnist":
        raise VitlabError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    arrays = read_idx_images(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", count)
    return torch.stack([_to_model_input(Image.fromarray(array), in_chans, img_size) for array in arrays])


def run(args: argparse.Namespace) -> int:
    from vitlab.analysis import (attention_maps, mean_attention_distance, patch_embedding_components,
                                 position_embedding_similarity)
    from vitlab.analysis.attention import class_token_attention, rollout_matrix, rollout_readout
    from vitlab.analysis import plots
    from vitlab.weights import load_model

    if args.n < 1:
        raise VitlabError(f"--n must be at least 1, got {args.n}")
    if args.overlays < 1:
        raise VitlabError(f"--overlays must be at least 1, got {args.overlays}")
    if not 0.0 <= args.discard_ratio < 1.0:
        raise VitlabError(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise VitlabError(f"--device {args.device!r}: {error}") from None

    model = load_model(args.checkpoint, model_name=args.model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise VitlabError(f"{args.checkpoint}: vitlab analyze needs a Vision Transformer, got {type(model).__name__}")
    if not 0 <= args.head < config.num_heads:
        raise VitlabError(f"--head must be in [0, {config.num_heads - 1}], got {args.head}")
    model = model.to(device).eval()

    if args.images:
        images = load_images(args.images, config.in_chans, config.img_size)
        names = [Path(path).name for path in args.images]
    else:
        images = load_dataset_images(args.dataset, args.n, config.in_chans, config.img_size)
        names = [f"{args.dataset} #{index}" for index in range(images.shape[0])]
    images = images.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = model.grid_size_for(*images.shape[-2:])
    prefix = model.num_prefix_tokens
    entries = []

    shown = images[:args.overlays]
    maps = attention_maps(model, shown)
    rollout = rollout_readout(rollout_matrix(maps, args.head_fusion, args.discard_ratio, prefix), grid, prefix)
    plots.plot_rollout(shown.cpu(), rollout.cpu(), out / "rollout.png", MEAN, STD, titles=names[:shown.shape[0]])
    readout = "the class token's row" if prefix else "the mean row (GAP model)"
    entries.append({"file": "rollout.png", "title": "Attention rollout",
                    "caption": f"Attention rollout (heads fused by {args.head_fusion}, discard ratio "
                               f"{args.discard_ratio}), {readout} over the {grid[0]}x{grid[1]} patches, "
                               "overlaid on each input; each map stretched from its minimum (blue) to its "
                               "maximum (red).",
                    "data": {"images": names[:shown.shape[0]], "rollout": rollout}})

    layer_maps = class_token_attention(maps, grid, prefix)[:, 0, args.head]  # (L, gh, gw) for the first image
    label = "class-token attention" if prefix else "attention received (mean over queries)"
    plots.plot_layer_attention(layer_maps.cpu(), out / "layer_attention.png", args.head, shown[0].cpu(), MEAN, STD,
                               label=label)
    entries.append({"file": "layer_attention.png", "title": f"Per-layer attention, head {args.head}",
                    "caption": f"{label[0].upper() + label[1:]} of head {args.head} in every layer for "
                               f"{names[0]}; one colour scale for all layers.",
                    "data": {"image": names[0], "head": args.head, "maps": layer_maps}})

    distances = mean_attention_distance(model, images)
    plots.plot_attention_distance(distances.cpu(), out / "attention_distance.png", tuple(config.img_size))
    entries.append({"file": "attention_distance.png", "title": "Mean attention distance",
                    "caption": f"Attention-weighted mean distance in pixels between query and key patches, per "
                               f"head (dots) and layer, averaged over {images.shape[0]} images (paper: 128).",
                    "data": {"images": images.shape[0], "distance_pixels": distances}})

    if config.posemb != "none":
        similarity = position_embedding_similarity(model)
        plots.plot_position_similarity(similarity.cpu(), out / "position_similarity.png")
        entries.append({"file": "position_similarity.png", "title": "Position embedding similarity",
                        "caption": f"Cosine similarity of each patch's {config.posemb} position embedding (tile) "
                                   "with every other patch's.",
                        "data": {"similarity": similarity}})

    components = patch_embedding_components(model, args.components)
    plots.plot_embedding_components(components.cpu(), out / "embedding_components.png")
    entries.append({"file": "embedding_components.png", "title": "Patch-embedding filters",
                    "caption": f"First {components.shape[0]} principal components of the "
                               f"{config.embed_dim} patch-embedding filters.",
                    "data": {"components": components}})

    index = plots.write_index(out, entries, title=f"vitlab analyze {Path(args.checkpoint).name}")
    print(index)
    return 0
