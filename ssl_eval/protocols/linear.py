"""Linear probe on frozen features: a grid of learning rates x weight decays trained at once.

All heads share each mini-batch: one GEMM computes every head's logits (the bias added inside
it), one GEMM every head's gradient (softmax cross-entropy has a closed-form gradient, so no
autograd). Each head has its own learning rate and weight decay; SGD with momentum (the
update of ``torch.optim.SGD``, weight decay on weights and bias) and a cosine schedule counted
in steps. Features are standardised with the training rows' mean and standard deviation
(BatchNorm without affine, as MAE), one mini-batch at a time, so the training matrix is never
copied. The head with the best validation top-1 is reported on test.

Small datasets get at least ``min_steps`` optimiser steps (more epochs), so a 1,000-image
dataset is not probed with a handful of updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import distributed
from ..errors import UserError
from .base import (
    PROTOCOL_TYPES,
    ProtocolInputs,
    ProtocolOutput,
    ProtocolType,
    as_tensor,
    topk_hits,
)


@dataclass(frozen=True)
class LinearParams:
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    weight_decays: tuple[float, ...] = (0.0, 0.01)
    epochs: int = 3
    min_steps: int = 200  # at least this many optimiser steps: small datasets get more epochs
    batch_size: int = 512
    momentum: float = 0.9
    batchnorm: bool = (
        True  # standardise features with train statistics (BatchNorm without affine, as MAE)
    )

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0:
            raise UserError(
                "linear: epochs and batch_size must be at least 1, min_steps at least 0"
            )
        if not self.lrs or not self.weight_decays:
            raise UserError("linear: lrs and weight_decays must each list at least one value")
        if min(self.lrs) <= 0 or min(self.weight_decays) < 0 or not 0 <= self.momentum < 1:
            raise UserError(
                "linear: every lr must be > 0, every weight decay >= 0, momentum in [0, 1)"
            )


def schedule(n: int, p: LinearParams) -> tuple[int, int]:
    """(epochs, steps per epoch) for ``n`` training rows: ``p.epochs``, raised to reach ``p.min_steps``."""
    per_epoch = math.ceil(n / p.batch_size)
    return max(p.epochs, math.ceil(p.min_steps / per_epoch)), per_epoch


@dataclass
class HeadGrid:
    """Trained heads: weight (D, H, C), bias (H, C), settings [(lr, wd)], feature statistics,
    and how long they trained."""

    weight: torch.Tensor
    bias: torch.Tensor
    settings: list[tuple[float, float]]
    mean: torch.Tensor | None
    inv_std: torch.Tensor | None
    epochs: int = 0
    steps: int = 0
    diverged: int = 0  # heads whose weights stopped being finite (too high a learning rate)
    diverged_mask: torch.Tensor | None = None  # (H,) bool

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std if self.mean is not None else x

    def logits(self, x: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """(N, D) -> (N, H, C), or (N, C) for one ``head``."""
        x = self._standardise(x)
        if head is not None:
            return torch.addmm(self.bias[head], x, self.weight[:, head])
        D, H, C = self.weight.shape
        return torch.addmm(self.bias.reshape(H * C), x, self.weight.reshape(D, H * C)).view(
            -1, H, C
        )

    def top1_per_head(self, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Top-1 accuracy of every head on (x, y), in chunks (bounded memory)."""
        correct = torch.zeros(self.weight.shape[1], device=x.device)
        for s in range(0, len(x), chunk):
            correct += (
                self.logits(x[s : s + chunk]).argmax(2) == y[s : s + chunk].view(-1, 1)
            ).sum(0)
        return correct / max(len(x), 1)


def feature_stats(x: torch.Tensor, rows: torch.Tensor | None, chunk: int = 4096):
    """Mean and 1 / (unbiased std) of ``x[rows]`` per feature, without gathering or copying the
    matrix: each pass multiplies a 0/1 row-weight vector into row chunks (a GEMV), and chunk
    sums accumulate in float64; the variance is taken around the mean (two passes). A constant
    feature gets std 1e-6."""
    N, D = x.shape
    if rows is None:
        w = torch.ones(N, dtype=x.dtype, device=x.device)
    else:
        w = torch.zeros(N, dtype=x.dtype, device=x.device).index_add_(
            0, rows, torch.ones(len(rows), dtype=x.dtype, device=x.device)
        )
    n = float(w.sum())
    total = torch.zeros(D, dtype=torch.float64, device=x.device)
    for s in range(0, N, chunk):
        total += (w[s : s + chunk] @ x[s : s + chunk]).double()
    mean = (total / n).to(x.dtype)
    buf = torch.empty(min(chunk, N), D, dtype=x.dtype, device=x.device)
    sq = torch.zeros_like(total)
    for s in range(0, N, chunk):
        d = torch.sub(x[s : s + chunk], mean, out=buf[: min(chunk, N - s)])
        sq += (w[s : s + chunk] @ d.mul_(d)).double()
    std = (sq / max(n - 1, 1)).sqrt().clamp_min(1e-6).to(x.dtype)
    return mean.view(1, -1), (1.0 / std).view(1, -1)


def train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    p: LinearParams,
    seed: int = 0,
    rows: torch.Tensor | None = None,
    heads: slice | None = None,
) -> HeadGrid:
    """Train one linear head per (lr, wd) in ``p``'s grid on features ``x`` and labels ``y``
    (all rows, or the rows listed in ``rows``: the matrix is read in place, never copied).
    ``heads``: train only this part of the grid, diverged heads left as they are (the caller
    puts the parts together and calls ``drop_diverged``)."""
    dev = x.device
    n = len(rows) if rows is not None else len(x)
    if n == 0:
        raise UserError("linear: no training rows")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    D, C = x.shape[1], num_classes
    mean = inv_std = None
    if p.batchnorm:
        mean, inv_std = feature_stats(x, rows)
    settings = [(lr, wd) for lr in p.lrs for wd in p.weight_decays][heads or slice(None)]
    H = len(settings)
    lr0 = torch.tensor([s[0] for s in settings], device=dev).repeat_interleave(C).view(1, H * C)
    wd = torch.tensor([s[1] for s in settings], device=dev).repeat_interleave(C).view(1, H * C)
    decay = any(s[1] != 0 for s in settings)
    W = torch.zeros(D, H * C, device=dev)
    b = torch.zeros(1, H * C, device=dev)
    mW, mb = torch.zeros_like(W), torch.zeros_like(b)
    bs = min(p.batch_size, n)
    # per-batch buffers, reused: the batch's features, one-hot labels, logits
    xb_buf = torch.empty(bs, D, device=dev)
    onehot = torch.zeros(bs, C, device=dev)
    logits = torch.empty(bs, H * C, device=dev)
    lr_t = torch.empty_like(lr0)
    epochs, per_epoch = schedule(n, p)
    total = epochs * per_epoch
    step = 0
    y = y.to(dev)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        if rows is not None:
            order = rows[order]
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            B = len(idx)
            xb = torch.index_select(x, 0, idx, out=xb_buf[:B])
            if mean is not None:
                xb.sub_(mean).mul_(inv_std)
            tb = onehot[:B].zero_().scatter_(1, y[idx].view(B, 1).long(), 1.0)
            z = torch.addmm(b, xb, W, out=logits[:B]).view(B, H, C)
            g = torch.softmax(z, dim=2)
            g.sub_(tb.unsqueeze(1))  # B x the gradient of the mean cross-entropy w.r.t. the logits
            g2 = g.view(B, H * C)
            # momentum buffer <- momentum * buffer + gradient (data term, then weight decay)
            mW.addmm_(xb.T, g2, beta=p.momentum, alpha=1.0 / B)
            mb.mul_(p.momentum).add_(g2.sum(0, keepdim=True), alpha=1.0 / B)
            if decay:
                mW.addcmul_(W, wd)
                mb.addcmul_(b, wd)
            torch.mul(lr0, 0.5 * (1 + math.cos(math.pi * step / total)), out=lr_t)
            W.addcmul_(mW, lr_t, value=-1.0)
            b.addcmul_(mb, lr_t, value=-1.0)
            step += 1
    grid = HeadGrid(W.view(D, H, C), b.view(H, C), settings, mean, inv_std, epochs, step)
    return grid if heads is not None else drop_diverged(grid, p)


def drop_diverged(grid: HeadGrid, p: LinearParams) -> HeadGrid:
    """Zero the heads whose weights stopped being finite and mark them (never selected);
    refuse when every head diverged."""
    W3, b2 = grid.weight, grid.bias
    bad = ~(torch.isfinite(W3).all(dim=0).all(dim=1) & torch.isfinite(b2).all(dim=1))
    if bool(bad.all()):
        raise UserError(
            f"linear: every head diverged (learning rates {list(p.lrs)} are too high for these "
            "features); lower them, e.g. --set lrs=[0.001,0.01]"
        )
    if bad.any():
        # a diverged head is excluded from the selection (its validation score is -1 below)
        W3[:, bad] = 0.0
        b2[bad] = 0.0
    grid.diverged, grid.diverged_mask = int(bad.sum()), bad
    return grid


def run_linear(inp: ProtocolInputs, p: LinearParams) -> ProtocolOutput:
    dev = inp.device
    torch.manual_seed(inp.seed)
    x_all = as_tensor(inp.train_x, dev)
    y_all = torch.from_numpy(np.asarray(inp.train_y)).to(dev)
    tr, va = torch.from_numpy(inp.train_idx).to(dev), torch.from_numpy(inp.val_idx).to(dev)
    if len(va) == 0:
        raise UserError("linear: the validation split is empty; raise --val-fraction")
    heads = _train(x_all, y_all, inp.num_classes, p, inp.seed, tr)

    val_acc = heads.top1_per_head(x_all[va], y_all[va])  # (H,)
    sel = val_acc
    if heads.diverged_mask is not None:  # a diverged head is never selected
        sel = torch.where(heads.diverged_mask.to(val_acc.device), -1.0, val_acc)
    best = int(torch.argmax(sel))  # first best in grid order on ties
    test_x = as_tensor(inp.test_x, dev)
    test_y = torch.from_numpy(np.asarray(inp.test_y)).to(dev)
    hits = topk_hits(heads.logits(test_x, head=best), test_y)
    lr, wd = heads.settings[best]
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "selected": {"lr": lr, "weight_decay": wd},
            "val_top1": {
                f"lr={a},wd={b}": float(v)
                for (a, b), v in zip(heads.settings, val_acc, strict=False)
            },
            "train_size": len(tr),
            "val_size": len(va),
            "epochs_run": heads.epochs,
            "steps": heads.steps,
            "diverged_heads": heads.diverged,
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )


def _train(x, y, num_classes: int, p: LinearParams, seed: int, rows) -> HeadGrid:
    """``train_heads``; across a torchrun world the grid is shared out: each rank trains its
    contiguous part of the heads on every training row, in the same mini-batches, and the parts
    are put together in grid order. A head's columns never meet another head's in any sum, so
    each head is the one a single process trains, bit for bit (an all-reduced gradient would
    not be: the batch sum would be taken in another order)."""
    if distributed.world() == 1:
        return train_heads(x, y, num_classes, p, seed=seed, rows=rows)
    part = distributed.shard(len(p.lrs) * len(p.weight_decays))
    mine = train_heads(x, y, num_classes, p, seed=seed, rows=rows, heads=part)
    parts = distributed.all_gather((mine.weight.cpu(), mine.bias.cpu(), mine.settings))
    grid = HeadGrid(
        torch.cat([w for w, _, _ in parts], 1).to(x.device),
        torch.cat([b for _, b, _ in parts], 0).to(x.device),
        [s for _, _, part_settings in parts for s in part_settings],
        mine.mean,
        mine.inv_std,
        mine.epochs,
        mine.steps,
    )
    return drop_diverged(grid, p)


PROTOCOL_TYPES.register("linear", ProtocolType("linear", LinearParams, run_linear))
