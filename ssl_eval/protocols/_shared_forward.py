"""The augmented linear probe's backbone forwards, shared out across a torchrun world.

One process cuts each epoch's training rows into ``cuts`` (the images of one forward pass)
and embeds them in order. Under torchrun rank r embeds cuts r, r + W, r + 2W ... of that same
list, each cut the very batch one process forms (the same images, the same neighbours, the
same size), so its features are the same bits; the ranks' features and labels are gathered
round by round (W cuts at a time, ``distributed.in_rounds``) to every rank in cut order, and
every rank then runs the same head steps on them. A crop is drawn from (seed, epoch, image
index), so which rank decodes an image changes nothing. A UserError of one rank (a corrupt
image) reaches every rank at the end of its round. The validation and test sets are embedded
the same way, in consecutive cuts of ``forward_batch`` images.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..core import distributed
from ..features.loading import loader, worker_errors


class SharedForward:
    """``embed`` (uint8 batch -> features on ``device``) applied to cuts of a dataset, shared
    out over the ranks; ``images`` counts the images this rank passed through the backbone."""

    def __init__(self, embed, loading: dict, device: torch.device):
        self.embed, self.loading, self.device = embed, loading, device
        self.images = 0

    def cuts(self, ds, cuts: list[list[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) of every cut, in cut order, on every rank."""
        w = distributed.world()
        mine = cuts[distributed.rank() :: w]

        def embedded():
            for x, y in worker_errors(loader(ds, batch_sampler=mine, **self.loading)):
                self.images += len(y)
                f = self.embed(x)
                yield (f, y) if w == 1 else (f.cpu(), y)  # gathered through host memory

        for f, y in distributed.in_rounds(len(cuts), embedded()):
            yield f.to(self.device), y

    def all(self, ds, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image of ``ds`` (consecutive cuts of ``batch``), features and labels."""
        n = len(ds)
        cuts = [list(range(s, min(s + batch, n))) for s in range(0, n, batch)]
        feats, labels = zip(*self.cuts(ds, cuts), strict=True) if cuts else ((), ())
        return torch.cat(feats), torch.cat(labels)

    def by_rank(self) -> list[int] | None:
        """The images each rank embedded (a collective); None in one process."""
        return distributed.all_gather(self.images) if distributed.world() > 1 else None
