"""Top-k accuracy, loss and confusion matrix over an in-memory test set or a stream of batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class EvalResult:
    loss: float
    top1: float
    top5: float
    predictions: torch.Tensor  # (N,) argmax class per image
    labels: torch.Tensor | None = None  # (N,) the true classes, where they came from a stream of batches
    count: int = 0  # images evaluated (by all processes), where they came from a stream of batches


@torch.no_grad()
def evaluation_sums(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                    weights: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                    batch_size: int = 1000, autocast: bool = False) -> tuple[list[float], torch.Tensor]:
    """Weighted sums of loss, top-1 and top-5 hits over `images[indices]`, and the predictions of the images with
    non-zero weight. Weights let distributed evaluation pad every rank to the same number of batches."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0]
    predictions = []
    for start in range(0, len(indices), batch_size):
        index = indices[start:start + batch_size]
        weight = weights[start:start + batch_size].to(device)
        x = transform(images[index]).to(device)
        y = labels[index].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += (F.cross_entropy(logits, y, reduction="none").double() * weight).sum().item()
        sums[1] += ((top[:, 0] == y).double() * weight).sum().item()
        sums[2] += ((top == y[:, None]).any(dim=1).double() * weight).sum().item()
        predictions.append(top[:, 0][weight > 0].cpu())
    model.train(was_training)
    return sums, torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device, batch_size: int = 1000,
             autocast: bool = False) -> EvalResult:
    """Loss, top-1 and top-5 of `model` on uint8 `images`, batch by batch, in eval mode."""
    everything = torch.arange(len(labels))
    (loss, correct1, correct5), predictions = evaluation_sums(
        model, images, labels, everything, torch.ones(len(labels), dtype=torch.float64), transform, device,
        batch_size, autocast)
    count = max(len(labels), 1)
    return EvalResult(loss / count, correct1 / count, correct5 / count, predictions)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                     autocast: bool = False, all_reduce_sum: Callable[[list[float]], list[float]] | None = None,
                     forwards: int = 0) -> EvalResult:
    """Loss, top-1 and top-5 of `model` over normalised (inputs, labels) batches (an image folder's evaluation
    loader), in eval mode. Under several processes, `all_reduce_sum` adds up the processes' sums and counts, and a
    process with fewer batches than `forwards` repeats its last one unscored, so that every process runs as many
    forward passes (FSDP gathers parameters in each)."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    predictions, seen = [], []
    for inputs, labels in batches:
        x, y = inputs.to(device, non_blocking=True), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums[0] += F.cross_entropy(logits, y, reduction="sum").double().item()
        sums[1] += (top[:, 0] == y).sum().item()
        sums[2] += (top == y[:, None]).any(dim=1).sum().item()
        sums[3] += len(y)
        predictions.append(top[:, 0].cpu())
        seen.append(y.cpu())
    for _ in range(len(seen), forwards if seen else 0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            model(x)
    model.train(was_training)
    if all_reduce_sum is not None:
        sums = all_reduce_sum(sums)
    count = max(sums[3], 1)
    empty = torch.zeros(0, dtype=torch.long)
    predicted, true = (torch.cat(predictions), torch.cat(seen)) if seen else (empty, empty)
    return EvalResult(sums[0] / count, sums[1] / count, sums[2] / count, predicted, true, int(sums[3]))


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
