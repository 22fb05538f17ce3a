"""`vitlab eval`, `vitlab fewshot` and `vitlab predict`: use a trained or loaded model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from vitlab.atomic import atomic_path
from vitlab.commands import add_amp_option, positive_int
from vitlab.commands.train import add_folder_options
from vitlab.data import (EvalBatches, EvalTransform, FolderSplit, check_same_classes, eval_batches, folder_classes,
                         list_image_folder, load_dataset, match_channels)
from vitlab.data.folder import DEFAULT_VAL_FRACTION, PathTable
from vitlab.errors import VitlabError, printable
from vitlab.eval.metrics import EvalResult, confusion_matrix, evaluate, evaluate_batches
from vitlab.eval.predictor import card_of, image_batch, load_for_use, normalize_with
from vitlab.precision import autocast, describe_precision, resolve_amp
from vitlab.train.loop import card_preprocessing, is_image_folder, model_preprocessing
from vitlab.train.run_dir import checked_dataset, checkpoint_train_config

FOLDER_EVAL_BATCH = 64  # images per evaluation batch read from a folder


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
    add_amp_option(predict)
    predict.set_defaults(run=run_predict)


def _add_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a vitlab run directory or any weights file vitlab can load")
    parser.add_argument("--model", help="registry name, for weight files that do not name their model")
    parser.add_argument("--dataset", help="default: the data set the checkpoint was trained on")
    parser.add_argument("--device", default="auto")
    add_folder_options(parser)
    add_amp_option(parser)


def _dataset_for(args: argparse.Namespace, model: nn.Module) -> str:
    if args.dataset:
        return args.dataset
    config = checkpoint_train_config(Path(args.checkpoint))
    if config is None:
        raise VitlabError(f"{args.checkpoint} does not record its data set: pass --dataset")
    source = Path(args.checkpoint)
    return checked_dataset(config.dataset, source / "last.json" if source.is_dir() else source.with_suffix(".json"))


def folder_split(args: argparse.Namespace, dataset: str, split: str) -> FolderSplit:
    """A split of image folder `dataset`, held out as the checkpoint's training held it out when it was trained
    on this folder (its val_fraction and seed), unless --val-fraction says otherwise."""
    config = checkpoint_train_config(Path(args.checkpoint))
    same = config is not None and Path(config.dataset).resolve() == Path(dataset).resolve()
    val_fraction = (args.val_fraction if args.val_fraction is not None
                    else config.val_fraction if same and config is not None else DEFAULT_VAL_FRACTION)
    return list_image_folder(dataset, split, val_fraction or None, config.seed if same and config else 0)


def folder_batches_for(args: argparse.Namespace, model: nn.Module, split: FolderSplit,
                       device: torch.device) -> EvalBatches:
    """Evaluation batches of a folder split, prepared as the checkpoint's model expects."""
    preprocessing = model_preprocessing(model, card_preprocessing(model, args.checkpoint))
    return eval_batches(split, preprocessing, FOLDER_EVAL_BATCH, args.workers,
                        device=device if device.type == "cuda" else None)


def check_classes(args: argparse.Namespace, model: nn.Module, dataset: str, classes: tuple[str, ...]) -> None:
    """Refuse a data set whose classes are not the checkpoint's: other names (when the checkpoint records them),
    or another number of them."""
    names = card_of(model).classes  # the checkpoint's own, read (and verified) with its tensors
    if names is not None:
        check_same_classes(names, classes, dataset)
    if len(classes) != model.config.num_classes:
        raise VitlabError(f"{dataset} has {len(classes)} classes but the model's head has "
                          f"{model.config.num_classes}")


def run_eval(args: argparse.Namespace) -> int:
    model, device = load_for_use(args.checkpoint, args.model, args.device)
    dataset = _dataset_for(args, model)
    result: EvalResult
    bf16 = resolve_amp(args.amp, device)
    if is_image_folder(dataset):
        check_classes(args, model, dataset, folder_classes(dataset))
        split = folder_split(args, dataset, "eval")
        result = evaluate_batches(model, folder_batches_for(args, model, split, device), device, autocast=bf16)
        labels, classes, count, split_name = result.labels, split.classes, result.count, split.split
    else:
        test = load_dataset(dataset, "test", img_size=model.config.img_size[0])
        check_classes(args, model, dataset, test.classes)
        images = match_channels(test.images, model.config.in_chans)
        transform = EvalTransform(tuple(model.config.img_size))
        preprocessing = card_of(model).preprocessing
        if preprocessing is not None:
            transform = normalize_with(transform, preprocessing.mean, preprocessing.std)
        result = evaluate(model, images, test.labels, transform, device, autocast=bf16)
        labels, classes, count, split_name = test.labels, test.classes, len(test), "test"
    assert labels is not None
    matrix = confusion_matrix(result.predictions, labels, len(classes))
    source = Path(args.checkpoint)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent)
    _plot_confusion(matrix, classes, out / "confusion.png")
    record = {"checkpoint": str(source), "dataset": dataset, "split": split_name, "images": count,
              "top1": result.top1, "top5": result.top5, "loss": result.loss,
              "confusion_png": str(out / "confusion.png"), "precision": describe_precision(bf16, device)}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"{printable(source)} on {split_name} of {printable(dataset)} ({count} images): top-1 "
              f"{result.top1:.2%}  top-5 {result.top5:.2%}  loss {result.loss:.4f}  ({record['precision']})\n"
              f"confusion matrix: {printable(out / 'confusion.png')}")
    return 0


def _plot_confusion(matrix: torch.Tensor, classes: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitlab.analysis.plots import literal

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
        labels = [literal(name) for name in classes]
        axis.set_xticks(range(len(classes)), labels, rotation=60, ha="right", fontsize=8)
        axis.set_yticks(range(len(classes)), labels, fontsize=8)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=110)
    plt.close(figure)


def run_fewshot(args: argparse.Namespace) -> int:
    from vitlab.eval.fewshot import extract_batch_features, few_shot_eval, few_shot_probe

    model, device = load_for_use(args.checkpoint, args.model, args.device)
    dataset = _dataset_for(args, model)
    bf16 = resolve_amp(args.amp, device)
    precision = describe_precision(bf16, device)
    if is_image_folder(dataset):
        train, test = folder_split(args, dataset, "train"), folder_split(args, dataset, "eval")
        split_name = test.split
        test_features, test_labels = extract_batch_features(model, folder_batches_for(args, model, test, device),
                                                            device, autocast=bf16)

        def features_of(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            indices = chosen.tolist()
            subset = FolderSplit(train.root, train.split, PathTable(train.paths[i] for i in indices),
                                 train.labels[indices], train.classes, train.name)
            return extract_batch_features(model, folder_batches_for(args, model, subset, device), device,
                                          autocast=bf16)

        results = few_shot_probe(torch.from_numpy(train.labels), train.num_classes, features_of, test_features,
                                 test_labels, args.shots, args.seeds, args.l2)
    else:
        size = model.config.img_size[0]
        train_set, test_set = load_dataset(dataset, "train", img_size=size), load_dataset(dataset, "test",
                                                                                          img_size=size)
        split_name = "test"
        results = few_shot_eval(model, train_set, test_set, args.shots, args.seeds, args.l2, device, autocast=bf16)
    for result in results:
        if args.json:
            print(json.dumps({"shots": result.shots, "split": split_name, "mean": result.mean, "std": result.std,
                              "accuracies": result.accuracies, "precision": precision}))
        else:
            print(f"{result.shots:>3}-shot on {split_name}: {result.mean:.2%} ± {result.std:.2%}  "
                  f"({args.seeds} seeds, {precision})")
    return 0


@torch.no_grad()
def run_predict(args: argparse.Namespace) -> int:
    model, device = load_for_use(args.checkpoint, args.model)
    names = card_of(model).class_names(model.config.num_classes)
    bf16 = resolve_amp(args.amp, device)
    for path in args.images:
        with autocast(bf16, device):
            logits = model(image_batch(model, path).to(device))
        probs = logits.float().softmax(-1)[0].cpu()
        top = probs.topk(min(args.top_k, len(probs)))
        ranked = [(names[i], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        if args.json:
            print(json.dumps({"image": str(path), "top": [{"class": n, "prob": p} for n, p in ranked]}))
        else:
            print(f"{printable(path)}: " + ", ".join(f"{printable(n)} {p:.1%}" for n, p in ranked))
    return 0
