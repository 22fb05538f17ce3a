"""Top-k accuracy, loss and confusion matrix over an in-memory test set."""

from __future__ import annotations

from collections.abc import Callable
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


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device, batch_size: int = 1000,
             autocast: bool = False) -> EvalResult:
    """Loss, top-1 and top-5 of `model` on uint8 `images`, batch by batch, in eval mode."""
    was_training = model.training
    model.eval()
    total_loss, correct1, correct5 = 0.0, 0, 0
    predictions = []
    for start in range(0, len(labels), batch_size):
        x = transform(images[start:start + batch_size]).to(device)
        y = labels[start:start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        predictions.append(top[:, 0].cpu())
    model.train(was_training)
    count = max(len(labels), 1)
    return EvalResult(total_loss / count, correct1 / count, correct5 / count, torch.cat(predictions))


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
