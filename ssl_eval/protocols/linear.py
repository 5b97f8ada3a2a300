"""Linear probe on frozen features: a grid of learning rates x weight decays trained at once.

All heads share each mini-batch: one GEMM computes every head's logits, one GEMM every
head's gradient (softmax cross-entropy has a closed-form gradient, so no autograd). Each head
has its own learning rate and weight decay; SGD with momentum and a cosine schedule counted
in epochs. The head with the best validation top-1 is reported on test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    epochs: int = 20
    batch_size: int = 512
    momentum: float = 0.9
    batchnorm: bool = True  # standardise features with train statistics (BatchNorm without affine, as MAE)


@dataclass
class HeadGrid:
    """Trained heads: weight (D, H, C), bias (H, C), settings [(lr, wd)], feature statistics."""

    weight: torch.Tensor
    bias: torch.Tensor
    settings: list[tuple[float, float]]
    mean: torch.Tensor | None
    std: torch.Tensor | None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, H, C)."""
        if self.mean is not None:
            x = (x - self.mean) / self.std
        D, H, C = self.weight.shape
        return (x @ self.weight.view(D, H * C)).view(-1, H, C) + self.bias


def train_heads(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, p: LinearParams, seed: int = 0
) -> HeadGrid:
    """Train one linear head per (lr, wd) in ``p``'s grid on features ``x`` and labels ``y``."""
    if p.epochs < 1 or p.batch_size < 1:
        raise UserError("linear: epochs and batch_size must be at least 1")
    if not p.lrs or not p.weight_decays:
        raise UserError("linear: lrs and weight_decays must each list at least one value")
    dev = x.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mean = std = None
    if p.batchnorm:
        mean = x.mean(0, keepdim=True)
        std = x.std(0, keepdim=True).clamp_min(1e-6)
        x = (x - mean) / std
    settings = [(lr, wd) for lr in p.lrs for wd in p.weight_decays]
    H, (N, D), C = len(settings), x.shape, num_classes
    lr0 = torch.tensor([s[0] for s in settings], device=dev).view(1, H, 1)
    wd = torch.tensor([s[1] for s in settings], device=dev).view(1, H, 1)
    W = torch.zeros(D, H, C, device=dev)
    b = torch.zeros(H, C, device=dev)
    mW, mb = torch.zeros_like(W), torch.zeros_like(b)
    steps_per_epoch = math.ceil(N / p.batch_size)
    total = p.epochs * steps_per_epoch
    step = 0
    for _ in range(p.epochs):
        perm = torch.randperm(N, generator=gen).to(dev)
        for s in range(0, N, p.batch_size):
            idx = perm[s : s + p.batch_size]
            xb, yb = x[idx], y[idx]
            B = len(idx)
            logits = (xb @ W.view(D, H * C)).view(B, H, C) + b
            g = torch.softmax(logits, dim=2)
            g[torch.arange(B, device=dev), :, yb] -= 1.0
            g /= B  # gradient of the mean cross-entropy w.r.t. the logits
            gW = (xb.T @ g.view(B, H * C)).view(D, H, C) + wd * W
            gb = g.sum(0) + wd[0] * b
            lr = lr0 * (0.5 * (1 + math.cos(math.pi * step / total)))
            mW.mul_(p.momentum).add_(gW)
            mb.mul_(p.momentum).add_(gb)
            W.sub_(lr * mW)
            b.sub_(lr[0] * mb)
            step += 1
    if not torch.isfinite(W).all():
        # a diverged head (too high a learning rate) is zeroed, so it loses the selection
        bad = ~torch.isfinite(W).all(dim=(0, 2))
        W[:, bad] = 0.0
        b[bad] = 0.0
    return HeadGrid(W, b, settings, mean, std)


def run_linear(inp: ProtocolInputs, p: LinearParams) -> ProtocolOutput:
    dev = inp.device
    torch.manual_seed(inp.seed)
    x_all = as_tensor(inp.train_x, dev)
    y_all = torch.from_numpy(np.asarray(inp.train_y)).to(dev)
    tr, va = torch.from_numpy(inp.train_idx).to(dev), torch.from_numpy(inp.val_idx).to(dev)
    if len(va) == 0:
        raise UserError("linear: the validation split is empty; raise --val-fraction")
    heads = train_heads(x_all[tr], y_all[tr], inp.num_classes, p, seed=inp.seed)

    val_logits = heads.logits(x_all[va])  # (Nv, H, C)
    val_acc = (val_logits.argmax(2) == y_all[va].view(-1, 1)).float().mean(0)  # (H,)
    best = int(torch.argmax(val_acc))  # first best in grid order on ties
    test_x = as_tensor(inp.test_x, dev)
    test_y = torch.from_numpy(np.asarray(inp.test_y)).to(dev)
    test_scores = heads.logits(test_x)[:, best]
    hits = topk_hits(test_scores, test_y)
    lr, wd = heads.settings[best]
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "selected": {"lr": lr, "weight_decay": wd},
            "val_top1": {f"lr={a},wd={b}": float(v) for (a, b), v in zip(heads.settings, val_acc, strict=False)},
            "train_size": len(tr),
            "val_size": len(va),
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )


PROTOCOL_TYPES.register("linear", ProtocolType("linear", LinearParams, run_linear))
