"""`vitlab analyze`: the ViT paper's "what does the model learn" pictures (Fig. 6-7) for one checkpoint.

Writes attention-rollout overlays, per-layer class-token attention of one head, mean attention distance against
depth, position-embedding similarity and the patch-embedding filters' principal components as PNGs, with
`index.html` to view them and `analysis.json` holding the numbers behind each.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from vitlab.data import BUILTIN, EvalTransform, load_dataset, match_channels
from vitlab.data.transforms import MEAN, STD
from vitlab.errors import VitlabError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("analyze", help="attention and embedding pictures for a checkpoint",
                                   description=__doc__)
    parser.add_argument("checkpoint", help="vitlab checkpoint, .npz, timm or Hugging Face weights")
    parser.add_argument("--model", default=None, help="registry name when the file does not say which model")
    parser.add_argument("--images", nargs="+", metavar="IMAGE", help="image files for the attention pictures")
    parser.add_argument("--dataset", help=f"statistics (attention distance) over the first --n test images of a "
                                          f"data set ({', '.join(BUILTIN)} or an image folder)")
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


def load_images(paths: Sequence[str | Path], in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:
    """Image files of any mode and size as the normalised (B, C, H, W) batch the model expects."""
    from vitlab.data.folder import read_image

    mode = "L" if in_chans == 1 else "RGB"
    if in_chans not in (1, 3):
        raise VitlabError(f"cannot turn images into {in_chans}-channel input; only 1 (gray) or 3 (RGB) are supported")
    batch = torch.stack([torch.from_numpy(read_image(Path(path), mode, img_size)) for path in paths])
    return EvalTransform(img_size)(batch)


def load_dataset_images(name: str, count: int, in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:
    """The first `count` test images of a data set, prepared like `load_images`."""
    test = load_dataset(name, "test", img_size=img_size[0])
    return EvalTransform(img_size)(match_channels(test.images[:count], in_chans))


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

    if not args.images and not args.dataset:
        raise VitlabError("give --images, --dataset or both")
    statistics = None
    if args.dataset:
        statistics = load_dataset_images(args.dataset, args.n, config.in_chans, config.img_size).to(device)
    if args.images:
        images = load_images(args.images, config.in_chans, config.img_size).to(device)
        names = [Path(path).name for path in args.images]
    else:
        images = statistics
        names = [f"{args.dataset} #{index}" for index in range(images.shape[0])]
    statistics = images if statistics is None else statistics
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
