"""`vitlab eval`, `vitlab fewshot` and `vitlab predict`: use a trained or loaded model."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch import nn

from vitlab.atomic import atomic_path
from vitlab.commands import positive_int
from vitlab.commands.train import checkpoint_train_config
from vitlab.data import EvalTransform, load_dataset, match_channels
from vitlab.errors import VitlabError
from vitlab.eval.metrics import confusion_matrix, evaluate
from vitlab.train.loop import select_device
from vitlab.weights.card import ModelCard


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    evaluate_parser = subparsers.add_parser("eval", help="top-1/top-5 and a confusion matrix on a test set")
    _add_source(evaluate_parser)
    evaluate_parser.add_argument("--json", action="store_true", help="print one JSON line")
    evaluate_parser.add_argument("--out", help="directory for confusion.png (default: next to the checkpoint)")
    evaluate_parser.set_defaults(run=run_eval)

    fewshot = subparsers.add_parser("fewshot", help="few-shot linear probe on frozen features (ridge, ±1 targets)")
    _add_source(fewshot)
    fewshot.add_argument("--shots", type=positive_int, nargs="+", default=[1, 5, 10, 25])
    fewshot.add_argument("--seeds", type=positive_int, default=3)
    fewshot.add_argument("--l2", type=float, default=2.0 ** 10)
    fewshot.add_argument("--json", action="store_true")
    fewshot.set_defaults(run=run_fewshot)

    predict = subparsers.add_parser("predict", help="top-k classes of image files")
    predict.add_argument("checkpoint")
    predict.add_argument("images", nargs="+", type=Path)
    predict.add_argument("--model", help="registry name, for weight files that do not name their model")
    predict.add_argument("--top-k", type=positive_int, default=3)
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(run=run_predict)


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a vitlab run directory or any weights file vitlab can load")
    parser.add_argument("--model", help="registry name, for weight files that do not name their model")
    parser.add_argument("--dataset", help="default: the data set the checkpoint was trained on")
    parser.add_argument("--device", default="auto")


def load_for_use(checkpoint: str, model_name: str | None, device: str = "auto") -> tuple[nn.Module, torch.device]:
    """The model of a checkpoint file, run directory or catalogue name, in eval mode on the device."""
    from vitlab.weights import load_model
    from vitlab.weights.hub import looks_like_name

    path = Path(checkpoint)
    if not path.exists() and not looks_like_name(checkpoint):
        raise VitlabError(f"{path}: no such checkpoint")
    target = select_device(device)
    model = load_model(checkpoint, model_name=model_name).to(target).eval()
    return model, target


def card_of(model: nn.Module) -> ModelCard:
    """The class names and preprocessing `load_model` attached (an empty card for a model built otherwise)."""
    from vitlab.weights.io import model_card

    return model_card(model)


def _dataset_for(args: argparse.Namespace, model: nn.Module) -> str:
    if args.dataset:
        return args.dataset
    config = checkpoint_train_config(Path(args.checkpoint))
    if config is None:
        raise VitlabError(f"{args.checkpoint} does not record its data set: pass --dataset")
    return config.dataset


def run_eval(args: argparse.Namespace) -> int:
    model, device = load_for_use(args.checkpoint, args.model, args.device)
    dataset = _dataset_for(args, model)
    test = load_dataset(dataset, "test", img_size=model.config.img_size[0])
    if test.num_classes != model.config.num_classes:
        raise VitlabError(f"{dataset} has {test.num_classes} classes but the model's head has "
                          f"{model.config.num_classes}")
    card = card_of(model)
    images = match_channels(test.images, model.config.in_chans)
    transform = EvalTransform(tuple(model.config.img_size))
    if card.preprocessing is not None:
        transform = normalize_with(transform, card.preprocessing.mean, card.preprocessing.std)
    result = evaluate(model, images, test.labels, transform, device)
    matrix = confusion_matrix(result.predictions, test.labels, test.num_classes)
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent)
    _plot_confusion(matrix, test.classes, out / "confusion.png")
    record = {"checkpoint": str(source), "dataset": dataset, "images": len(test), "top1": result.top1,
              "top5": result.top5, "loss": result.loss, "confusion_png": str(out / "confusion.png")}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{source} on {dataset} ({len(test)} images): top-1 {result.top1:.2%}  top-5 {result.top5:.2%}  "
              f"loss {result.loss:.4f}\nconfusion matrix: {out / 'confusion.png'}")
    return 0


def _plot_confusion(matrix: torch.Tensor, classes: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    normalised = matrix.float() / matrix.sum(1, keepdim=True).clamp(min=1)
    axis.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        for row in range(len(classes)):
            for col in range(len(classes)):
                value = int(matrix[row, col])
                if value:
                    axis.text(col, row, value, ha="center", va="center", fontsize=7,
                              color="white" if normalised[row, col] > 0.5 else "black")
        axis.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(len(classes)), classes, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)


def run_fewshot(args: argparse.Namespace) -> int:
    from vitlab.eval.fewshot import few_shot_eval

    model, device = load_for_use(args.checkpoint, args.model, args.device)
    dataset = _dataset_for(args, model)
    size = model.config.img_size[0]
    train, test = load_dataset(dataset, "train", img_size=size), load_dataset(dataset, "test", img_size=size)
    results = few_shot_eval(model, train, test, args.shots, args.seeds, args.l2, device)
    for result in results:
        if args.json:
            print(json.dumps({"shots": result.shots, "mean": result.mean, "std": result.std,
                              "accuracies": result.accuracies}))
        else:
            print(f"{result.shots:>3}-shot: {result.mean:.2%} ± {result.std:.2%}  ({args.seeds} seeds)")
    return 0


def normalize_with(transform: Callable[[torch.Tensor], torch.Tensor], mean: tuple[float, ...], std: tuple[float, ...]
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An eval transform (one that normalises with vitlab's mean = std = 0.5, or none) with a checkpoint's own mean
    and std instead; the data set's images are decoded at the model's size already."""
    mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def apply(images: torch.Tensor) -> torch.Tensor:
        scaled = transform(images) * 0.5 + 0.5  # EvalTransform's (x - 0.5) / 0.5 undone: back to [0, 1]
        channels = scaled.shape[-3]
        return (scaled - mean_t[:channels].to(scaled.device)) / std_t[:channels].to(scaled.device)

    return apply


def open_image(path: Path, mode: str) -> Image.Image:
    """An image file decoded at its own size (EXIF rotation applied) in `mode`, for a checkpoint's transform."""
    from vitlab.data.folder import FORMATS, READ_ERRORS

    try:
        with Image.open(path, formats=FORMATS) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "P", "PA") and mode == "RGB":
                image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)),
                                              image.convert("RGBA"))
            return image.convert(mode)
    except READ_ERRORS as error:
        raise VitlabError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None


def image_batch(model: nn.Module, path: Path) -> torch.Tensor:
    """One image file as the model's (1, C, H, W) input: with the checkpoint's preprocessing when its card has
    one, else as before (shorter side fitted and centre-cropped, bicubic, mean = std = 0.5)."""
    from vitlab.data.folder import read_image

    mode = "L" if model.config.in_chans == 1 else "RGB"
    size = tuple(model.config.img_size)
    preprocessing = card_of(model).preprocessing
    if preprocessing is not None:
        return preprocessing.transform(size)(open_image(path, mode))[None]
    return EvalTransform(size)(torch.from_numpy(read_image(path, mode, size))[None])


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    model, device = load_for_use(args.checkpoint, args.model)
    names = card_of(model).class_names(model.config.num_classes)
    for path in args.images:
        probs = model(image_batch(model, path).to(device)).softmax(-1)[0].cpu()
        top = probs.topk(min(args.top_k, len(probs)))
        ranked = [(names[i], float(p)) for p, i in zip(top.values, top.indices)]
        if args.json:
            print(json.dumps({"image": str(path), "top": [{"class": n, "prob": p} for n, p in ranked]}))
        else:
            print(f"{path}: " + ", ".join(f"{n} {p:.1%}" for n, p in ranked))
    return 0
