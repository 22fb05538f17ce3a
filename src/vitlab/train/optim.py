"""Optimizers and schedules as the paper uses them, on torch.optim and torch.optim.lr_scheduler."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from vitlab.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices and kernels: norms, biases, position embeddings and the class token get none."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Pre-training: Adam with decoupled weight decay (AdamW). Fine-tuning: SGD with momentum, no weight decay."""
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int,
                    warmup_steps: int) -> LRScheduler:
    """Linear warm-up, then cosine or linear decay to `min_lr`, stepped once per optimizer step."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if config.schedule == "cosine":
        decay: LRScheduler = CosineAnnealingLR(optimizer, T_max=decay_steps, eta_min=config.min_lr)
    else:
        decay = LinearLR(optimizer, start_factor=1.0, end_factor=max(config.min_lr / config.lr, 1e-8),
                         total_iters=decay_steps)
    if warmup_steps == 0:
        return decay
    warmup = LinearLR(optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
