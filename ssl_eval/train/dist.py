"""Data-parallel helpers of the trainer: gather a tensor from every process (the process group
itself is set up by ``core.distributed.setup``, shared with the evaluation).

``gather_with_grad`` is differentiable across processes: its backward sums, over processes,
the gradient each one's loss sends to the gathered rows and hands every process the sum for
the rows it owns. A negative (SimCLR) or a batch statistic (Barlow Twins) that came from
another process therefore still returns its gradient to the process that computed it, and
DDP's average of the parameter gradients over W processes is the gradient of the
global-batch loss, provided the processes' losses average to the global loss (each one a
mean over its local rows, as SimCLR and MoCo v3 are, or each one the global loss itself, as
Barlow Twins is). ``tests/test_train_dist.py`` checks this against one process on the same
global batch, for every method.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.distributed import DistInfo, setup  # noqa: F401  (the trainer's entry: dist.setup)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """Forward: the rows of every process, concatenated in rank order. Backward: every process
    holds the gradient of its own loss with respect to all the rows; their sum over processes
    is the gradient of the summed losses, and each process keeps its own rows of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = len(x)
        return _all_gather(x.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every process must reach this backward, in the same order
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every process (equal sizes), keeping the gradient of every row
    for the process that owns it. Returns (gathered, offset of the local rows). On one process
    it is ``(x, 0)``."""
    if not is_dist():
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * len(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``gather_with_grad`` for constants (momentum keys, Sinkhorn inputs): no gradient."""
    if not is_dist():
        return x.detach(), 0
    return _all_gather(x.detach()), dist.get_rank() * len(x)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()
