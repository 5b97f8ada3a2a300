"""SSL losses as pure functions of tensors (no modules, no state), so each can be checked
against a hand computation. Functions that need the whole global batch take the gathered
tensors from ``dist.gather_with_grad`` (which returns every row's gradient to the process that
owns it); on one process they are the local ones."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent (InfoNCE): each of the 2n local views is classified against the 2N-1
    other views of the global batch (1 positive, 2N-2 negatives) by cosine similarity / T.

    ``all_z1``/``all_z2`` are the global batch's views (N rows each, the local rows at
    ``offset``); omitted, the local batch is the global one. The mean over local rows,
    averaged over processes, is the single-process loss of the global batch; with the keys
    from ``gather_with_grad``, DDP's averaged gradient is its gradient too. SimCLR's code sums
    the two views' means; this is their mean (half its loss and gradient).
    """
    all_z1 = z1 if all_z1 is None else all_z1
    all_z2 = z2 if all_z2 is None else all_z2
    n, big_n = len(z1), len(all_z1)
    q = F.normalize(torch.cat([z1, z2]), dim=1)
    k = F.normalize(torch.cat([all_z1, all_z2]), dim=1)
    logits = q @ k.T / temperature  # (2n, 2N)
    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + big_n])
    pos_idx = torch.cat([local + big_n, local])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * big_n).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)


def moco_infonce(
    q: torch.Tensor, all_k: torch.Tensor, temperature: float, offset: int = 0
) -> torch.Tensor:
    """MoCo v3: queries against the momentum keys of the global batch; the positive of query i
    is key ``offset + i``. Scaled by 2T as in the paper so the gradient scale does not
    depend on T."""
    q = F.normalize(q, dim=1)
    k = F.normalize(all_k, dim=1)
    logits = q @ k.T / temperature
    labels = torch.arange(len(q), device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL: ||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z), averaged; ``z`` is detached (target)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam: -cos(p, stopgrad(z)), averaged."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Cross-correlation of the batch-standardised embeddings driven to the identity:
    sum_i (1 - C_ii)^2 (invariance) + lambda * sum_{i != j} C_ij^2 (redundancy reduction).

    Pass the global batch (``gather_with_grad``): every process then computes the global loss,
    and DDP's average of their gradients is its gradient, whatever the process count."""
    n = len(z1)
    a = (z1 - z1.mean(0)) / z1.std(0, unbiased=False).clamp_min(1e-6)
    b = (z2 - z2.mean(0)) / z2.std(0, unbiased=False).clamp_min(1e-6)
    c = a.T @ b / n
    on = (torch.diagonal(c) - 1).pow(2).sum()
    off = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on + lambd * off


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp equal-partition assignment (SwAV): Q = exp(scores / eps) rescaled so every
    prototype receives B/K of the batch and every sample a total of 1. Returns (B, K) rows
    summing to 1. Pass the globally gathered scores to partition the global batch."""
    log_q = scores.float() / eps  # (B, K), in the log domain so large scores cannot underflow
    b, k = log_q.shape
    for _ in range(iters):
        log_q = (
            log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        )  # prototypes: 1/K each
        log_q = (
            log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(b)
        )  # samples: 1/B each
    return log_q.exp() * b


def _cross_view_ce(
    targets: list[torch.Tensor], logits: list[torch.Tensor], temperature: float
) -> torch.Tensor:
    """Mean over ordered view pairs (i, j), i != j, of the cross-entropy
    -sum targets[i] * log softmax(logits[j] / T), averaged over the batch."""
    total, terms = 0.0, 0
    for i, q in enumerate(targets):
        for j, p in enumerate(logits):
            if j != i:
                total = total - (q * F.log_softmax(p / temperature, dim=1)).sum(1).mean()
                terms += 1
    return total / terms


def swapped_prediction(
    logits: list[torch.Tensor], codes: list[torch.Tensor], temperature: float
) -> torch.Tensor:
    """SwAV: the code of each global view is predicted from every other view's prototype
    scores: mean of -sum q log softmax(p / T)."""
    return _cross_view_ce(codes, logits, temperature)


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    t_student: float,
    t_teacher: float,
) -> torch.Tensor:
    """DINO: cross-entropy between the centred, sharpened teacher distribution of each global
    view and the student distribution of every other view."""
    targets = [F.softmax((t - center) / t_teacher, dim=1).detach() for t in teacher]
    return _cross_view_ce(targets, student, t_student)


def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO centre: c <- m c + (1 - m) mean(teacher outputs). ``teacher_out`` should be the
    global batch mean already (all-reduced) when running on several processes."""
    return center * momentum + teacher_out.mean(0, keepdim=True) * (1 - momentum)


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """MAE: mean squared error over the masked patches only. ``pred``/``target`` (N, L, P),
    ``mask`` (N, L) with 1 = masked. With ``norm_pix`` each target patch is standardised."""
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, momentum: float) -> None:
    """theta_target <- m theta_target + (1 - m) theta_online, parameters and float buffers."""
    for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.mul_(momentum).add_(po.detach(), alpha=1 - momentum)
    for bt, bo in zip(target.buffers(), online.buffers(), strict=True):
        if bt.dtype.is_floating_point:
            bt.copy_(bo)
