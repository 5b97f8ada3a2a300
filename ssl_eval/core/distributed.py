"""Several processes under torchrun (``torchrun --nproc-per-node N -m ssl_eval run|train ...``):
the rank, the world size, the process group (``setup``), and the few collectives extraction,
the token cache, the protocols and the trainer need.

A plain ``python`` launch is a world of one and every helper is then the identity, so the
single-process code path is the multi-process one with W = 1. ``setup`` starts the process group
from torchrun's environment (NCCL on GPUs, gloo on the CPU) for the evaluation and the trainer
alike; the trainer's differentiable gathers are in ``train/dist.py``.

Errors: a UserError raised on one rank while the others wait in a collective would leave them
waiting for ever. Every step that can fail on one rank (decoding an image of its shard, the
writing on rank 0) is therefore followed by ``agree``, which hands every rank the first failure
so that all of them raise the same one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def launched_main() -> bool:
    """Whether this process is rank 0 of its torchrun launch, or a plain launch: what the
    command layer asks, after the process group is closed, before it prints or writes."""
    return int(os.environ.get("RANK", "0")) == 0


def init(device: torch.device) -> tuple[torch.device, bool]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). Returns the device
    this rank uses (``cuda:LOCAL_RANK`` on GPUs) and whether this call created the group (the
    caller then ends it with ``close``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or world() > 1:
        return device, False
    info = setup(device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device, True


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def describe() -> dict | None:
    """What the record's provenance says about the processes; None for a single process."""
    if world() == 1:
        return None
    return {"world_size": world(), "backend": str(dist.get_backend())}


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (picklable objects)."""
    if world() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(obj: object) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 alone (None elsewhere): what rank 0
    writes, without sending every rank's part to every rank."""
    if world() == 1:
        return [obj]
    out: list | None = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def scatter(objs: list | None) -> object:
    """Item r of rank 0's ``objs`` (one per rank) on rank r; the others pass None."""
    if world() == 1:
        return objs[0]
    box: list = [None]
    dist.scatter_object_list(box, objs if is_main() else None, src=0)
    return box[0]


def all_gather(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def agree(error: str | None) -> None:
    """Raise on every rank the first (lowest-rank) error any rank met; nothing when none did."""
    errors = [e for e in all_gather(error) if e]
    if errors:
        raise UserError(errors[0])


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone, its result (or its UserError) handed to every rank."""
    out, err = None, None
    if is_main():
        try:
            out = fn()
        except UserError as e:
            err = str(e)
    out, err = broadcast((out, err))
    if err:
        raise UserError(err)
    return out


def shard(n: int, r: int | None = None, w: int | None = None) -> slice:
    """Rank ``r``'s contiguous share of ``n`` items (sizes differ by at most one): every item in
    exactly one shard, the shards in rank order."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return slice(r * n // w, (r + 1) * n // w)


def rounds(count: int, mine: Iterator[T], to_all: bool = True) -> Iterator[list[tuple[int, T]]]:
    """Items 0 .. count-1 computed across the world, round by round: in round k rank r computes
    item kW + r (``mine`` yields this rank's items r, r + W ... in that order, lazily), and each
    round yields its (item number, item) pairs in item order, on every rank (``to_all``) or on
    rank 0 alone (the others get an empty list for the round, so every rank still passes each
    round together). A rank holds at most one round. A UserError raised by ``mine`` on any rank
    is raised on every rank at the end of that round (``agree``), never a wait. One process:
    each item is a round."""
    w, r = world(), rank()
    if w == 1:
        yield from ([(i, x)] for i, x in enumerate(mine))
        return
    for start in range(0, count, w):
        item, error = None, None
        if start + r < count:
            try:
                item = next(mine)
            except UserError as e:
                error = str(e)
        agree(error)
        parts = all_gather(item) if to_all else (gather(item) or [])
        yield list(enumerate(parts[: count - start], start))


def in_rounds(count: int, mine: Iterator[T]) -> Iterator[T]:
    """Items 0 .. count-1, every one on every rank, in item order, where this rank computes
    only items r, r + W, r + 2W ... (``rounds``, gathered to every rank). One process: ``mine``
    itself."""
    if world() == 1:
        yield from mine
        return
    for part in rounds(count, mine):
        yield from (x for _, x in part)


def follow_main(claim: Callable, items, *args) -> Iterator[tuple[object, bool]]:
    """``claim(items, *args)`` (``fsutil.claim_each``: each item with its lock held, and
    whether it is still this run's to do) run by rank 0 alone, each verdict handed to every
    rank: the ranks work on the same items, under the lock rank 0 holds."""
    if world() == 1:
        yield from claim(items, *args)
        return
    items = list(items)
    claims = claim(items, *args) if is_main() else None
    try:
        for item in items:
            mine = on_main(lambda: next(claims)[1])
            yield item, mine
    finally:
        if claims is not None:
            claims.close()  # releases the last lock


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
