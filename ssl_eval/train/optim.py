"""The optimiser and its learning-rate schedule, counted in epochs (fractions of the dataset
seen), never in steps, so a schedule does not depend on the batch size or the process count."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.errors import UserError
from .config import OptimConfig


def lr_at(o: OptimConfig, base: float, epoch_pos: float, epochs: int) -> float:
    """Linear warmup over ``warmup_epochs``, then half-cosine to ``min_lr_ratio * base``."""
    if epoch_pos < o.warmup_epochs:
        return base * epoch_pos / o.warmup_epochs
    span = max(epochs - o.warmup_epochs, 1e-8)
    t = min((epoch_pos - o.warmup_epochs) / span, 1.0)
    return base * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only, not on biases, norms or tokens."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum)
    raise UserError(f"unknown optimiser {o.name!r}; use 'adamw' or 'sgd'")
