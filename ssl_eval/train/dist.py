"""Data-parallel helpers: set up the process group from torchrun's environment, and gather
a tensor from every process while keeping the gradient of the local part (negatives from
other processes are constants; each process back-propagates into its own rows, and DDP's
gradient averaging then equals the gradient of the global-batch loss)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on
    GPUs, gloo on CPU. A plain ``python`` launch is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from every process (equal sizes); the local slice is ``x`` itself, so
    gradients flow into it. Returns (gathered, offset of the local rows)."""
    if not is_dist():
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    r = dist.get_rank()
    parts[r] = x
    return torch.cat(parts), r * len(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    return gather_with_grad(x.detach())[0]


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    y = x.clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()
