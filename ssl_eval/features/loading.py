"""The image loading extraction and the decode cache both run: ``Images`` (uint8 CHW images,
resized and cropped by the preprocessing's geometry: the one decoding path, so a decoded entry holds
the pixels extraction would see), ``loader`` (a DataLoader that leaves the global RNG alone),
``worker_errors`` (a DataLoader worker's UserError as one line) and ``progress_bar``."""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.errors import UserError
from ..data.datasets import ImageSplit
from ..data.transforms import Preprocessing


class Images(Dataset):
    """uint8 CHW images, resized and cropped; normalisation happens per batch."""

    def __init__(self, split: ImageSplit, pre: Preprocessing):
        self.split, self.pre = split, pre

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = torch.from_numpy(np.ascontiguousarray(self.split.load(i))).permute(2, 0, 1)
        out = self.pre.geometric(img).contiguous()
        if self.pre.crop is None:  # no crop to a fixed size: the sizes must agree
            first = self._first_shape()
            if tuple(out.shape) != first:
                where = self.split.paths[i] if self.split.paths else f"image {i}"
                raise UserError(
                    f"{where} is {out.shape[1]}x{out.shape[2]} but the first image is {first[1]}x{first[2]}, "
                    "and this backbone does not resize; pass --image-size N to resize every image"
                )
        return out

    def _first_shape(self) -> tuple[int, ...]:
        if not hasattr(self, "_first"):
            self._first = tuple(
                self.pre.geometric(
                    torch.from_numpy(np.ascontiguousarray(self.split.load(0))).permute(2, 0, 1)
                ).shape
            )
        return self._first


def loader(dataset, **kw) -> DataLoader:
    """``DataLoader(dataset, **kw)`` with its own generator unless one is given. A DataLoader
    without one draws its workers' base seed from the global RNG each time it is iterated, so
    loading images would move the draws of whatever runs next (a head's initialisation, its
    dropout) by how many loaders ran before, and by which batches a torchrun rank loaded."""
    kw.setdefault("generator", torch.Generator())
    return DataLoader(dataset, **kw)


def worker_errors(loader):
    """Iterate ``loader``; a UserError raised in a DataLoader worker (a corrupt image) arrives
    wrapped in the worker's traceback text: reduce it to its own one-line message."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UserError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            last = lines[-1] if lines else str(e)
            raise UserError(last.split("UserError: ", 1)[-1]) from None
        yield batch


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None)
