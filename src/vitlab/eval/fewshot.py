"""Few-shot linear evaluation on frozen features, as in the ViT paper (§4.1) and big_vision's fewshot evaluator.

For each shot count and seed: take `shots` training images per class, fit a ridge regression from features to
targets in {-1, 1} in closed form (l2 = 2^10 by default), and report test top-1 of the argmax. Mean ± std over
seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from vitlab.data import EvalTransform, ImageTensors, match_channels
from vitlab.precision import autocast as bf16_autocast


@dataclass
class FewShotResult:
    shots: int
    accuracies: list[float]

    @property
    def mean(self) -> float:
        return float(torch.tensor(self.accuracies).mean())

    @property
    def std(self) -> float:
        return float(torch.tensor(self.accuracies).std(unbiased=False))


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, transform: EvalTransform, device: torch.device,
                     batch_size: int = 500, autocast: bool = False) -> torch.Tensor:
    """Pre-logits features (what the head sees), computed under bf16 autocast if asked, then float64 on the CPU for
    a well-conditioned solve."""
    model.eval()
    chunks = []
    for i in range(0, len(images), batch_size):
        with bf16_autocast(autocast, device):
            features = model.forward_head(model.forward_features(transform(images[i:i + batch_size]).to(device)),
                                          pre_logits=True)
        chunks.append(features.double().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def extract_batch_features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device, autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits features (float64, CPU) and labels of normalised batches (an image folder's loader)."""
    model.eval()
    features, labels = [], []
    for inputs, targets in batches:
        with bf16_autocast(autocast, device):
            batch = model.forward_head(model.forward_features(inputs.to(device)), pre_logits=True)
        features.append(batch.double().cpu())
        labels.append(targets.cpu())
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), torch.cat(labels)


def ridge_classifier(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression to ±1 targets with an unregularised bias (features are centred first)."""
    targets = torch.full((len(labels), num_classes), -1.0, dtype=features.dtype)
    targets[torch.arange(len(labels)), labels] = 1.0
    mean = features.mean(0, keepdim=True)
    centred = features - mean
    gram = centred.T @ centred + l2 * torch.eye(features.shape[1], dtype=features.dtype)
    weights = torch.linalg.solve(gram, centred.T @ (targets - targets.mean(0, keepdim=True)))
    bias = targets.mean(0) - (mean @ weights).squeeze(0)
    return weights, bias


def few_shot_eval(model: nn.Module, train: ImageTensors, test: ImageTensors, shots: list[int], seeds: int = 3,
                  l2: float = 2.0 ** 10, device: torch.device | None = None, autocast: bool = False
                  ) -> list[FewShotResult]:
    device = device or next(model.parameters()).device
    transform = EvalTransform(tuple(model.config.img_size))
    channels = model.config.in_chans
    test_features = extract_features(model, match_channels(test.images, channels), transform, device,
                                     autocast=autocast)

    def features_of(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (extract_features(model, match_channels(train.images[chosen], channels), transform, device,
                                 autocast=autocast), train.labels[chosen])

    return few_shot_probe(train.labels, train.num_classes, features_of, test_features, test.labels, shots, seeds, l2)


def few_shot_probe(train_labels: torch.Tensor, num_classes: int,
                   features_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                   test_features: torch.Tensor, test_labels: torch.Tensor, shots: list[int], seeds: int = 3,
                   l2: float = 2.0 ** 10) -> list[FewShotResult]:
    """The probe over any feature source: per shot count and seed, `features_of(indices)` gives the features and
    labels of the chosen training images (so a lazy data set decodes only those)."""
    per_class = [torch.nonzero(train_labels == c).flatten() for c in range(num_classes)]
    results = []
    for count in shots:
        accuracies = []
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(seed)
            chosen = torch.cat([members[torch.randperm(len(members), generator=generator)[:count]]
                                for members in per_class])
            features, labels = features_of(chosen)
            weights, bias = ridge_classifier(features, labels, num_classes, l2)
            predictions = (test_features @ weights + bias).argmax(1)
            accuracies.append(float((predictions == test_labels).double().mean()))
        results.append(FewShotResult(count, accuracies))
    return results
