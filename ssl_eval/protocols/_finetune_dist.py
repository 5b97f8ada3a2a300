"""Fine-tuning across the processes of a torchrun world (DistributedDataParallel).

The global batch is the single-process batch: the shuffled batches one process draws (the same
generator, drawn in the same order) are cut into W equal shares, one per rank. Each rank's loss
is its share's sum over the global batch size, times W, so that DDP's average of the ranks'
gradients is the gradient of the global batch's mean loss; the schedule counts samples, so it
does not depend on W. What is not bit-identical to one process: the gradient is summed over
the batch in another order (each rank's share, then DDP's all-reduce), so weights and losses
agree to float precision, not to the bit.

Refused across several processes, in one line, where the maths would change: a batch W does
not divide; mixup, cutmix and drop path (their draws span the global batch); and BatchNorm on
CPUs (each rank would normalise with its share's statistics; SyncBatchNorm, which makes them
global, needs GPUs and is used there).

Validation and test evaluation are shared out by ``finetune._evaluate`` (whole single-process
batches per rank, the per-image results gathered in rank order: the same bits as one process).
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler

from ..core import distributed
from ..core.errors import UserError


def check(p, clf: nn.Module, device: torch.device) -> None:
    """Refuse what several processes cannot fine-tune as one process does."""
    w = distributed.world()
    if w == 1:
        return
    if p.batch_size % w:
        raise UserError(
            f"fine-tune: batch_size {p.batch_size} does not split over {w} processes; "
            f"use a multiple of {w} (the global batch is the single-process batch)"
        )
    if p.mixup_alpha > 0 or p.cutmix_alpha > 0 or p.drop_path > 0:
        raise UserError(
            f"fine-tune: mixup, cutmix and drop path draw over the global batch, which {w} "
            "processes split; set mixup_alpha=0 cutmix_alpha=0 drop_path=0 or run one process"
        )
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in clf.modules())
    if has_bn and device.type != "cuda":
        raise UserError(
            f"fine-tune: the backbone has BatchNorm, whose statistics each of {w} CPU processes "
            "would take over its share of the batch (SyncBatchNorm needs GPUs); fine-tune it "
            "in one process or on GPUs"
        )


def wrap(clf: nn.Module, device: torch.device) -> nn.Module:
    """The module to train: ``clf`` itself in one process, else DDP around it (BatchNorm made
    synchronous on GPUs). ``clf`` keeps the weights either way."""
    if distributed.world() == 1:
        return clf
    if device.type == "cuda":
        clf = nn.SyncBatchNorm.convert_sync_batchnorm(clf)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(clf, device_ids=ids)


class _Share:
    """Rank r's share of each of ``batches``' global batches (contiguous, in order)."""

    def __init__(self, batches: BatchSampler):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            yield b[distributed.shard(len(b))]


def loader_args(dataset, batch_size: int, drop_last: bool, generator) -> dict:
    """DataLoader arguments: one process's shuffled batches, or this rank's share of each.
    The generator is also handed to the DataLoader, which draws its worker seed from it before
    the sampler draws the permutation, exactly as ``shuffle=True`` does."""
    if distributed.world() == 1:
        return dict(batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=generator)
    sampler = RandomSampler(dataset, generator=generator)
    return dict(
        batch_sampler=_Share(BatchSampler(sampler, batch_size, drop_last)), generator=generator
    )


def batch_loss(per_sample: torch.Tensor, global_rows: int) -> tuple[torch.Tensor, float]:
    """(the loss to back-propagate, the global batch's mean loss). One process: the mean."""
    if distributed.world() == 1:
        loss = per_sample.mean()
        return loss, loss.item()
    total = per_sample.detach().sum()
    dist.all_reduce(total)  # every rank sees the same value (and stops together on a NaN)
    return per_sample.sum() * (distributed.world() / global_rows), total.item() / global_rows


def share_resume(resume, clf: nn.Module, opt: torch.optim.Optimizer):
    """``resume()`` (load the saved state into clf and opt: (state or None, clf, opt), clf and
    opt rebuilt on a damaged state) run by rank 0 alone: every rank then holds rank 0's
    weights, optimiser state and state."""
    if distributed.world() == 1:
        return resume()
    st = None
    if distributed.is_main():
        st, clf, opt = resume()
    buf = io.BytesIO()
    if distributed.is_main():
        torch.save({"model": clf.state_dict(), "optimizer": opt.state_dict(), "state": st}, buf)
    payload = distributed.broadcast(buf.getvalue() if distributed.is_main() else None)
    if not distributed.is_main():
        dev = next(clf.parameters()).device
        got = torch.load(io.BytesIO(payload), map_location=dev, weights_only=True)
        clf.load_state_dict(got["model"])
        opt.load_state_dict(got["optimizer"])
        st = got["state"]
    return st, clf, opt
