"""The grid of linear heads one pass trains: learning rates x weight decays, and, for the recipe
cards that read several layers (linear@dinov2, linear@dinov3), x (n last blocks) x (avgpool).

DINOv2's ``setup_linear_classifiers`` (facebookresearch/dinov2, dinov2/eval/linear.py) builds
one classifier per ``for n in n_last_blocks_list: for avgpool in [False, True]: for lr in
learning_rates``, each on its own input: the class tokens of the last n blocks, then with
avgpool the patch mean of the last block. Here every head reads the same ``layers:N`` row
(``features/layers.py``), restricted to the columns some head uses; a head's weights on the
columns its input leaves out start at zero and never receive a gradient, so it is the head the
script trains on its own input, in one GEMM with all the others.

The learning rates are scaled as the script's ``scale_lr``: lr x (global batch) / 256
(``lr_batch_ref``), and a card may fix the number of optimiser steps (the script's ``epochs x
epoch_length`` iterations, at its global batch) instead of counting epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..features.layers import block_dim, head_columns, layers_kind


def scaled_lrs(p) -> tuple[float, ...]:
    """The learning rates the heads train with: the card's, times batch_size / lr_batch_ref
    when the card scales them (dinov2 ``scale_lr``: lr * batch_size * world / 256). The card's
    batch (the script's global batch) sets the scale, also on data smaller than one batch."""
    if not p.lr_batch_ref:
        return tuple(p.lrs)
    return tuple(lr * p.batch_size / p.lr_batch_ref for lr in p.lrs)


def settings_of(p) -> list[tuple]:
    """Every head's setting, in grid order (the order of the script's loops; ties in the
    validation score go to the first): (lr, wd), or (n_last_blocks, avgpool, lr, wd) for a
    multi-layer card. ``lr`` is the scaled rate the head trains with."""
    lrs = scaled_lrs(p)
    plain = [(lr, wd) for lr in lrs for wd in p.weight_decays]
    if not p.n_last_blocks:
        return plain
    return [(n, a, lr, wd) for n in p.n_last_blocks for a in p.avgpool for lr, wd in plain]


def num_heads(p) -> int:
    return len(settings_of(p))


def setting_name(s: tuple) -> str:
    if len(s) == 2:
        return f"lr={s[0]},wd={s[1]}"
    return f"blocks={s[0]},avgpool={s[1]},lr={s[2]:g},wd={s[3]}"


def setting_dict(s: tuple, p) -> dict:
    if len(s) == 2:
        return {"lr": s[0], "weight_decay": s[1]}
    base = p.lrs[scaled_lrs(p).index(s[2])]
    return {
        "n_last_blocks": s[0],
        "avgpool": s[1],
        "lr": s[2],
        "base_lr": base,
        "weight_decay": s[3],
    }


def feature_kind(p) -> str | None:
    """What a card's heads read: ``layers:N`` for N = the most blocks any head uses."""
    return layers_kind(max(p.n_last_blocks)) if p.n_last_blocks else None


def total_steps(n: int, p) -> tuple[int, int, int]:
    """(epochs begun, steps per epoch, optimiser steps) for ``n`` training rows: a card's
    fixed ``iterations`` (the last epoch cut short), or ``p.epochs`` raised to reach
    ``p.min_steps``."""
    per_epoch = math.ceil(n / p.batch_size)
    if p.iterations:
        return math.ceil(p.iterations / per_epoch), per_epoch, p.iterations
    epochs = max(p.epochs, math.ceil(p.min_steps / per_epoch))
    return epochs, per_epoch, epochs * per_epoch


def cosine_lr(lr0: float, step: int, total: int) -> float:
    """The rate at (0-based) step ``step`` of ``total``: torch's CosineAnnealingLR with T_max =
    total and eta_min 0, stepped after every iteration, as the scripts use it."""
    return lr0 * 0.5 * (1 + math.cos(math.pi * step / total))


@dataclass(frozen=True)
class ColumnPlan:
    """Which columns of the feature row the heads read (``columns``: None for all) and, per
    head, which of those its input holds (``mask``: (D', H, 1) 0/1, None when all do)."""

    columns: np.ndarray | None
    mask: torch.Tensor | None

    @property
    def width(self) -> int | None:
        return None if self.columns is None else len(self.columns)


def column_plan(p, row_width: int) -> ColumnPlan:
    """The columns a multi-layer grid reads from rows of ``row_width`` values, and each head's
    share of them; a plain grid reads every column with every head."""
    if not p.n_last_blocks:
        return ColumnPlan(None, None)
    cached = max(p.n_last_blocks)
    dim = block_dim(row_width, cached)
    per_group = {
        (n, a): head_columns(cached, dim, n, a) for n in p.n_last_blocks for a in p.avgpool
    }
    columns = np.unique(np.concatenate(list(per_group.values())))
    where = {c: i for i, c in enumerate(columns)}
    settings = settings_of(p)
    mask = torch.zeros(len(columns), len(settings), 1)
    for h, s in enumerate(settings):
        mask[[where[c] for c in per_group[(s[0], s[1])]], h] = 1.0
    return ColumnPlan(columns, mask)


def initial_weights(p, dim: int, num_classes: int, plan: ColumnPlan, seed: int) -> torch.Tensor:
    """(D', H, C) starting weights of the whole grid: zeros, or N(0, init_std^2) draws (the
    script's ``weight.normal_(0, 0.01)``) from their own generator, zero on the columns a
    head's input leaves out. Drawn for the whole grid, so a rank's share of heads starts where
    one process's does."""
    H = num_heads(p)
    if not p.init_std:
        return torch.zeros(dim, H, num_classes)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(H, num_classes, dim, generator=gen).mul_(p.init_std).permute(2, 0, 1)
    w = w.contiguous()
    return w * plan.mask if plan.mask is not None else w
