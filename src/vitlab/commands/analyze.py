"""`vitlab analyze`: the ViT paper's "what does the model learn" pictures (Fig. 6-7) for one checkpoint.

Writes attention-rollout overlays, per-layer class-token attention of one head, mean attention distance against
depth, position-embedding similarity and the patch-embedding filters' principal components as PNGs, with
`index.html` to view them and `analysis.json` holding the numbers behind each. For a Perceiver it draws the
cross-attention from the latents to the pixels instead (the Perceiver paper's Fig. 3 and 7), with the entropy of
each cross-attend's attention.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitlab.commands import positive_int
from vitlab.data import BUILTIN, EvalTransform, load_dataset, match_channels
from vitlab.data.transforms import MEAN, STD
from vitlab.errors import VitlabError
from vitlab.models import ATTENTION, CROSS_ATTENTION, capabilities

SHOWN_LATENTS = 8  # latents drawn per cross-attend in a Perceiver's figures
MAP_ELEMENTS = 2 ** 26  # attention weights per chunk (256 MiB in fp32) while a Perceiver's entropy is summed


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="attention and embedding pictures for a checkpoint",
                                   description=__doc__)
    parser.add_argument("checkpoint", help="vitlab checkpoint, .npz, timm or Hugging Face weights")
    parser.add_argument("--model", default=None, help="registry name when the file does not say which model")
    parser.add_argument("--images", nargs="+", metavar="IMAGE", help="image files for the attention pictures")
    parser.add_argument("--dataset", help=f"statistics (attention distance) over the first --n test images of a "
                                          f"data set ({', '.join(BUILTIN)} or an image folder)")
    parser.add_argument("--n", type=int, default=128, help="images to take from --dataset (paper: 128)")
    parser.add_argument("--head", type=int, default=0,
                        help="head whose per-layer attention is drawn (Perceiver: cross-attention head)")
    parser.add_argument("--head-fusion", choices=("mean", "max", "min"), default="mean",
                        help="how rollout combines heads")
    parser.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of weights")
    parser.add_argument("--overlays", type=int, default=8,
                        help="how many images get a rollout overlay (Perceiver: a cross-attention figure)")
    parser.add_argument("--components", type=positive_int, default=28, help="principal components of the patch filters")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(run=run)


def load_images(paths: Sequence[str | Path], in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:
    """Image files of any mode and size as the normalised (B, C, H, W) batch the model expects."""
    from vitlab.data.folder import read_image

    mode = "L" if in_chans == 1 else "RGB"
    if in_chans not in (1, 3):
        raise VitlabError(f"cannot turn images into {in_chans}-channel input; only 1 (gray) or 3 (RGB) are supported")
    batch = torch.stack([torch.from_numpy(read_image(Path(path), mode, img_size)) for path in paths])
    return EvalTransform(img_size)(batch)


def load_dataset_images(name: str, count: int, in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:
    """The first `count` evaluation images of a data set, prepared like `load_images` (an image folder's are
    read lazily: only those are decoded, in the folder's evaluation transform)."""
    from vitlab.data import FolderSplit, Preprocessing, eval_batches, list_image_folder
    from vitlab.data.folder import PathTable
    from vitlab.train.loop import is_image_folder

    if is_image_folder(name):
        split = list_image_folder(name, "eval")
        chosen = range(min(count, len(split)))
        first = FolderSplit(split.root, split.split, PathTable(split.paths[i] for i in chosen),
                            split.labels[:len(chosen)], split.classes, split.name)
        preprocessing = Preprocessing(tuple(img_size), mean=(MEAN,) * in_chans, std=(STD,) * in_chans)
        return torch.cat([inputs for inputs, _ in eval_batches(first, preprocessing, 64, workers=0)])
    test = load_dataset(name, "test", img_size=img_size[0])
    return EvalTransform(img_size)(match_channels(test.images[:count], in_chans))


def load_inputs(args: argparse.Namespace, model: torch.nn.Module, device: torch.device
                ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """The images to draw (--images, else the --dataset ones), their names, and the images to take statistics
    over (--dataset, else --images); shared by the ViT and Perceiver branches so both read inputs alike. A
    checkpoint that records its preprocessing gets it (its mean and std for the data set's images)."""
    from vitlab.eval.predictor import card_of, image_batch, normalize_with

    if not args.images and not args.dataset:
        raise VitlabError("give --images, --dataset or both")
    in_chans, img_size = model.config.in_chans, model.config.img_size
    preprocessing = card_of(model).preprocessing
    statistics = None
    if args.dataset:
        statistics = load_dataset_images(args.dataset, args.n, in_chans, img_size)
        if preprocessing is not None:
            statistics = normalize_with(lambda images: images, preprocessing.mean, preprocessing.std)(statistics)
        statistics = statistics.to(device)
    if args.images and preprocessing is not None:
        images = torch.cat([image_batch(model, Path(path)) for path in args.images]).to(device)
        names = [Path(path).name for path in args.images]
    elif args.images:
        images = load_images(args.images, in_chans, img_size).to(device)
        names = [Path(path).name for path in args.images]
    else:
        images = statistics
        names = [f"{args.dataset} #{index}" for index in range(images.shape[0])]
    statistics = images if statistics is None else statistics
    return images, names, statistics


def display_normalisation(model: torch.nn.Module) -> tuple[Any, Any]:
    """The mean and std that undo the model's input normalisation for drawing: per channel (C, 1, 1) from the
    checkpoint's card, else vitlab's default."""
    from vitlab.eval.predictor import card_of

    preprocessing = card_of(model).preprocessing
    if preprocessing is None:
        return MEAN, STD
    channels = model.config.in_chans
    return (np.array(preprocessing.mean[:channels]).reshape(-1, 1, 1),
            np.array(preprocessing.std[:channels]).reshape(-1, 1, 1))


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
    mean, std = display_normalisation(model)
    supported = capabilities(model)
    if CROSS_ATTENTION in supported:
        return run_perceiver(args, model, device, mean, std)
    if ATTENTION not in supported:
        raise VitlabError(f"{args.checkpoint}: vitlab analyze supports Vision Transformers and Perceivers, got "
                          f"{type(model).__name__}")
    config = model.config
    if not 0 <= args.head < config.num_heads:
        raise VitlabError(f"--head must be in [0, {config.num_heads - 1}], got {args.head}")
    model = model.to(device).eval()

    images, names, statistics = load_inputs(args, model, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = model.grid_size_for(*images.shape[-2:])
    prefix = model.num_prefix_tokens
    entries = []

    shown = images[:args.overlays]
    maps = attention_maps(model, shown)
    rollout = rollout_readout(rollout_matrix(maps, args.head_fusion, args.discard_ratio, prefix), grid, prefix)
    plots.plot_rollout(shown.cpu(), rollout.cpu(), out / "rollout.png", mean, std, titles=names[:shown.shape[0]])
    readout = "the class token's row" if prefix else "the mean row (GAP model)"
    entries.append({"file": "rollout.png", "title": "Attention rollout",
                    "caption": f"Attention rollout (heads fused by {args.head_fusion}, discard ratio "
                               f"{args.discard_ratio}), {readout} over the {grid[0]}x{grid[1]} patches, "
                               "overlaid on each input; each map stretched from its minimum (blue) to its "
                               "maximum (red).",
                    "data": {"images": names[:shown.shape[0]], "rollout": rollout}})

    layer_maps = class_token_attention(maps, grid, prefix)[:, 0, args.head]  # (L, gh, gw) for the first image
    label = "class-token attention" if prefix else "attention received (mean over queries)"
    plots.plot_layer_attention(layer_maps.cpu(), out / "layer_attention.png", args.head, shown[0].cpu(), mean, std,
                               label=label)
    entries.append({"file": "layer_attention.png", "title": f"Per-layer attention, head {args.head}",
                    "caption": f"{label[0].upper() + label[1:]} of head {args.head} in every layer for "
                               f"{names[0]}; one colour scale for all layers.",
                    "data": {"image": names[0], "head": args.head, "maps": layer_maps}})

    distances = mean_attention_distance(model, statistics)
    plots.plot_attention_distance(distances.cpu(), out / "attention_distance.png", tuple(config.img_size))
    entries.append({"file": "attention_distance.png", "title": "Mean attention distance",
                    "caption": f"Attention-weighted mean distance in pixels between query and key patches, per "
                               f"head (dots) and layer, averaged over {statistics.shape[0]} images (paper: 128).",
                    "data": {"images": statistics.shape[0], "distance_pixels": distances}})

    if config.posemb != "none":
        similarity = position_embedding_similarity(model)
        plots.plot_position_similarity(similarity.cpu(), out / "position_similarity.png")
        entries.append({"file": "position_similarity.png", "title": "Position embedding similarity",
                        "caption": f"Cosine similarity of each patch's {config.posemb} position embedding (tile) "
                                   "with every other patch's.",
                        "data": {"similarity": similarity}})

    if config.hybrid_layers is None:  # a hybrid's 1×1 projection filters ResNet channels, not pixels
        components = patch_embedding_components(model, args.components)
        plots.plot_embedding_components(components.cpu(), out / "embedding_components.png")
        entries.append({"file": "embedding_components.png", "title": "Patch-embedding filters",
                        "caption": f"First {components.shape[0]} principal components of the "
                                   f"{config.embed_dim} patch-embedding filters.",
                        "data": {"components": components}})

    index = plots.write_index(out, entries, title=f"vitlab analyze {Path(args.checkpoint).name}")
    print(index)
    return 0


def _row_entropy(maps: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each attention row (the last dimension), summed in float64 so rows over tens of
    thousands of pixels lose little precision to the sum."""
    return -torch.special.xlogy(maps, maps).sum(dim=-1, dtype=torch.float64)


def latent_entropy(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per cross-attend, head and latent, the entropy of the latent's attention over the pixels averaged over the
    images, shape (S, heads, N): 0 for a latent that reads one pixel, log(H·W) for one that reads all evenly.

    Images go through in chunks of about MAP_ELEMENTS attention weights, since a single 224-px image already gives
    the ImageNet Perceiver 8 × 512 × 50,176 of them.
    """
    from vitlab.analysis import cross_attention_maps

    config = model.config
    per_image = config.num_cross_attends * config.cross_heads * config.num_latents * images.shape[-2] * images.shape[-1]
    chunk = max(1, MAP_ELEMENTS // per_image)
    total = torch.zeros(config.num_cross_attends, config.cross_heads, config.num_latents, dtype=torch.float64,
                        device=images.device)
    for start in range(0, images.shape[0], chunk):
        total += _row_entropy(cross_attention_maps(model, images[start:start + chunk])).sum(dim=1)
    return total / images.shape[0]


def run_perceiver(args: argparse.Namespace, model: torch.nn.Module, device: torch.device, mean: Any, std: Any
                  ) -> int:
    """A Perceiver's cross-attention from its latents to the pixels, one figure per drawn image.

    Each figure shows, per cross-attend, the mean map over all latents and the SHOWN_LATENTS latents whose attention
    (head --head) is most peaked: lowest entropy averaged over the statistics images. The same latents appear in
    every figure, so what one latent reads can be compared across images. Rollout options do not apply.
    """
    from vitlab.analysis import cross_attention_maps, plots

    config = model.config
    if not 0 <= args.head < config.cross_heads:
        raise VitlabError(f"--head must be in [0, {config.cross_heads - 1}] (the Perceiver's cross-attention "
                          f"heads), got {args.head}")
    model = model.to(device).eval()
    images, names, statistics = load_inputs(args, model, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    height, width = images.shape[-2:]
    entropy = latent_entropy(model, statistics)
    chosen = entropy[:, args.head].argsort(dim=-1)[:, :SHOWN_LATENTS]  # (S, k), most peaked first
    entries = []

    for index, name in enumerate(names[:args.overlays]):
        # one image at a time: the ImageNet Perceiver's maps are 0.8 GB per 224-px image
        maps = cross_attention_maps(model, images[index:index + 1])[:, 0, args.head]  # (S, N, H*W)
        file = f"cross_attention_{index}.png"
        plots.plot_cross_attention(images[index].cpu(), maps.reshape(*maps.shape[:2], height, width).cpu(),
                                   chosen.cpu(), out / file, mean, std, title=f"Cross-attention, {name}")
        entries.append({"file": file, "title": f"Cross-attention, {name}",
                        "caption": f"{name}: the input, then per cross-attend the attention of head {args.head} "
                                   f"from the latents to the {height}x{width} pixels: the mean over all "
                                   f"{config.num_latents} latents, then the {chosen.shape[1]} most peaked latents "
                                   f"(lowest mean entropy over {statistics.shape[0]} images); each map stretched "
                                   "from its minimum (blue) to its maximum (red).",
                        "data": {"image": name, "head": args.head, "latents": chosen,
                                 "entropy": _row_entropy(maps).gather(1, chosen)}})

    per_head = entropy.mean(dim=-1)  # (S, heads)
    plots.plot_cross_attention_entropy(per_head.cpu(), out / "cross_attention_entropy.png", math.log(height * width))
    entries.append({"file": "cross_attention_entropy.png", "title": "Cross-attention entropy",
                    "caption": f"Entropy of each latent's attention over the {height}x{width} pixels, averaged over "
                               f"the {config.num_latents} latents and {statistics.shape[0]} images, per cross-attend "
                               f"and head; the dashed line is log({height * width}), attention spread evenly.",
                    "data": {"images": statistics.shape[0],
                             "shape": [config.num_cross_attends, statistics.shape[0], config.cross_heads,
                                       config.num_latents, height * width],
                             "entropy": per_head.mean(dim=-1), "entropy_per_head": per_head,
                             "max_entropy": math.log(height * width)}})

    index = plots.write_index(out, entries, title=f"vitlab analyze {Path(args.checkpoint).name}")
    print(index)
    return 0
