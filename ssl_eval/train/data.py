"""Training data held in memory as one uint8 tensor (N, 3, S, S): at 32x32 even CIFAR-10 is
150 MB, and batched tensor augmentation then needs no DataLoader workers. A held-out k-NN bank
(training images) and query set (test images) feed the per-epoch monitor."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.datasets import DatasetOptions, ImageSplit, get_dataset
from ..data.transforms import Preprocessing
from ..errors import UserError


@dataclass
class TrainData:
    name: str
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # used only by the monitor
    bank_images: torch.Tensor
    bank_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor
    num_classes: int
    fingerprint: dict = field(default_factory=dict)


def _stack(split: ImageSplit, idx: np.ndarray, size: int) -> torch.Tensor:
    pre = Preprocessing(resize=size, crop=size)
    out = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
    for j, i in enumerate(idx):
        img = torch.from_numpy(np.ascontiguousarray(split.load(int(i)))).permute(2, 0, 1)
        out[j] = pre.geometric(img)
    return out


def load_train_data(
    dataset: str,
    image_size: int,
    seed: int,
    subset: int | None,
    bank: int,
    queries: int,
    data_root: str | None = None,
) -> TrainData:
    """Decode the (seeded subset of the) train split once; the k-NN bank is drawn from it and
    the queries from the test split, so the monitor never trains on what it scores."""
    from pathlib import Path

    b = get_dataset(dataset, DatasetOptions(data_root=Path(data_root) if data_root else None))
    n = len(b.train)
    if subset is not None and subset < 1:
        raise UserError("train_subset must be a positive number of images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    train_idx = np.sort(order[: min(subset or n, n)])
    bank_idx = train_idx[np.sort(rng.permutation(len(train_idx))[: min(bank, len(train_idx))])]
    q_idx = np.sort(rng.permutation(len(b.test))[: min(queries, len(b.test))])
    images = _stack(b.train, train_idx, image_size)
    pos = {int(i): j for j, i in enumerate(train_idx)}
    bank_images = images[[pos[int(i)] for i in bank_idx]]
    return TrainData(
        name=b.name,
        images=images,
        labels=torch.from_numpy(b.train.labels[train_idx]),
        bank_images=bank_images,
        bank_labels=torch.from_numpy(b.train.labels[bank_idx]),
        query_images=_stack(b.test, q_idx, image_size),
        query_labels=torch.from_numpy(b.test.labels[q_idx]),
        num_classes=b.num_classes,
        fingerprint={**b.fingerprint, "train_images": len(train_idx)},
    )
