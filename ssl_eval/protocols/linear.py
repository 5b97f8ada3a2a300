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
    (N, D), C = x.shape, num_classes
    # Work on [features, 1, 0...]: the bias is row D of the weight and gets exactly the bias's
    # gradient (the batch sum of the logit gradients), weight decay and momentum. The width is
    # padded to a multiple of 8 with zero features, whose weights stay exactly zero.
    Da = D + 1 + (-(D + 1)) % 8
    xa = torch.zeros(N, Da, device=dev)
    mean = std = None
    if p.batchnorm:
        mean = x.mean(0, keepdim=True)
        xc = xa[:, :D].copy_(x).sub_(mean)
        # = x.std(0) (unbiased), but torch's column-wise std is several times slower on CPU
        std = (torch.linalg.vector_norm(xc, dim=0, keepdim=True) / math.sqrt(max(N - 1, 1))).clamp_min(1e-6)
        xc.div_(std)
    else:
        xa[:, :D].copy_(x)
    xa[:, D] = 1.0
    settings = [(lr, wd) for lr in p.lrs for wd in p.weight_decays]
    H = len(settings)
    lr0 = torch.tensor([s[0] for s in settings], device=dev).view(1, H, 1)
    wd = torch.tensor([s[1] for s in settings], device=dev).view(1, H, 1)
    decay = any(s[1] != 0 for s in settings)
    W = torch.zeros(Da, H, C, device=dev)
    mW = torch.zeros_like(W)
    W2, mW2 = W.view(Da, H * C), mW.view(Da, H * C)
    bs = min(p.batch_size, N)
    # per-batch buffers, reused: the batch's features and one-hot labels, and the logits
    xb_buf = torch.empty(bs, Da, device=dev)
    onehot = torch.zeros(bs, C, device=dev)
    logits = torch.empty(bs, H * C, device=dev)
    steps_per_epoch = math.ceil(N / p.batch_size)
    total = p.epochs * steps_per_epoch
    step = 0
    for _ in range(p.epochs):
        perm = torch.randperm(N, generator=gen).to(dev)
        for s in range(0, N, bs):
            idx = perm[s : s + bs]
            B = len(idx)
            xb = torch.index_select(xa, 0, idx, out=xb_buf[:B])
            tb = onehot[:B].zero_().scatter_(1, y[idx].view(B, 1).long(), 1.0)
            g = torch.softmax(torch.mm(xb, W2, out=logits[:B]).view(B, H, C), dim=2)
            g.sub_(tb.unsqueeze(1))  # B x the gradient of the mean cross-entropy w.r.t. the logits
            # momentum buffer <- momentum * buffer + gradient (data term, then weight decay)
            mW2.addmm_(xb.T, g.view(B, H * C), beta=p.momentum, alpha=1.0 / B)
            if decay:
                mW.addcmul_(W, wd)
            lr = lr0 * (0.5 * (1 + math.cos(math.pi * step / total)))
            W.addcmul_(mW, lr, value=-1.0)
            step += 1
    bad = ~torch.isfinite(W).all(dim=0).all(dim=1)
    if bad.any():
        # a diverged head (too high a learning rate) is zeroed, so it loses the selection
        W[:, bad] = 0.0
    return HeadGrid(W[:D], W[D], settings, mean, std)


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
