"""LARS and SGD updates for a stack of linear heads, and MAE's learning-rate schedule.

LARS as MAE's util/lars.py (from MoCo v3): for a parameter of more than one dimension, weight
decay is added to the gradient and the sum is rescaled by trust * |param| / |sum| (by 1 when
either norm is 0); biases and other 1-D parameters get neither; then momentum (mu <- m mu + d,
no dampening) and param <- param - lr mu. ``heads=True`` reads the first dimension as a stack
of separate parameters (one per head of a grid): each gets its own norms, its own lr and weight
decay, exactly as if it were updated alone.
"""

from __future__ import annotations

import math

import torch


def _per_head(v, like: torch.Tensor, heads: bool):
    """A number, or one value per head shaped to broadcast over ``like``."""
    if not isinstance(v, torch.Tensor) or not heads:
        return v
    return v.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


@torch.no_grad()
def lars_step(p, grad, mu, lr, weight_decay, momentum=0.9, trust=0.001, heads=False) -> None:
    """One LARS update of ``p`` in place (``mu`` its momentum buffer, also in place)."""
    lr, wd = _per_head(lr, p, heads), _per_head(weight_decay, p, heads)
    d = grad
    if p.ndim - int(heads) > 1:
        d = grad + wd * p
        dims = tuple(range(int(heads), p.ndim))
        pn = torch.linalg.vector_norm(p, dim=dims, keepdim=True)
        dn = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        one = torch.ones_like(pn)
        q = torch.where(pn > 0, torch.where(dn > 0, trust * pn / dn, one), one)
        d = d * q
    mu.mul_(momentum).add_(d)
    p.sub_(lr * mu)


@torch.no_grad()
def sgd_step(
    p, grad, mu, lr, weight_decay, momentum=0.9, trust=0.0, heads=False, nesterov=False
) -> None:
    """torch.optim.SGD's update (weight decay on every parameter, no dampening), per head with
    ``heads``; ``trust`` is unused. ``nesterov``: torch's SGD(nesterov=True), d = grad + wd p,
    mu <- m mu + d, p <- p - lr (d + m mu), which is also TF1's MomentumOptimizer with
    use_nesterov (accum <- m accum + d, var <- var - lr d - lr m accum)."""
    lr, wd = _per_head(lr, p, heads), _per_head(weight_decay, p, heads)
    d = grad + wd * p
    mu.mul_(momentum).add_(d)
    p.sub_(lr * (d + momentum * mu) if nesterov else lr * mu)


OPTIMISERS = {"lars": lars_step, "sgd": sgd_step}


class LARS(torch.optim.Optimizer):
    """``lars_step`` as a torch optimiser (MAE's defaults: momentum 0.9, trust 0.001)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = torch.zeros_like(p)
                lars_step(
                    p,
                    p.grad,
                    st["mu"],
                    g["lr"],
                    g["weight_decay"],
                    g["momentum"],
                    g["trust_coefficient"],
                )


def mae_lr(epoch: float, peak: float, warmup: float, epochs: float, floor: float = 0.0) -> float:
    """MAE's util/lr_sched.adjust_learning_rate at a fractional ``epoch`` (it calls it every
    iteration at epoch + iteration / iterations per epoch): linear warmup from 0, then a half
    cosine from ``peak`` to ``floor`` at ``epochs``."""
    if epoch < warmup:
        return peak * epoch / warmup
    return floor + (peak - floor) * 0.5 * (
        1 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup))
    )
