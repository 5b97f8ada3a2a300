"""Training data held in memory as one uint8 tensor (N, 3, S, S): at 32x32 even CIFAR-10 is
150 MB, and batched tensor augmentation then needs no DataLoader workers.

No image the evaluation selects on is trained on: the evaluation carves its validation split
from train (``stratified_val_split``, ``ssl-eval run --val-fraction --split-seed``), and the
trainer draws its images from the rest only (``trained_format.training_split``, the one
function both sides call). The per-epoch monitor's k-NN bank is drawn from the training images
and its queries from the held-out rest of train (neither trained on nor validation; never
test images), so the monitor reads no image the evaluation scores or selects on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..backbones.trained_format import indices_sha256, training_split
from ..core.config import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION
from ..core.errors import UserError
from ..data.datasets import DatasetOptions, ImageSplit, get_dataset
from ..data.transforms import Preprocessing


@dataclass
class TrainData:
    name: str
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # used only by the monitor
    bank_images: torch.Tensor
    bank_labels: torch.Tensor
    query_images: torch.Tensor  # held-out train images (possibly none)
    query_labels: torch.Tensor
    num_classes: int
    fingerprint: dict = field(default_factory=dict)
    # the evaluation's validation split the training images avoid (sidecar "eval_split")
    eval_split: dict = field(default_factory=dict)
    # what the monitor scores on (sidecar "monitor")
    monitor: dict = field(default_factory=dict)
    train_index: np.ndarray | None = None  # indices into the dataset's train split
    query_index: np.ndarray | None = None


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
    val_fraction: float = DEFAULT_VAL_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> TrainData:
    """Decode the training images once: the (seeded subset of the) train split minus the
    evaluation's validation split (``val_fraction``, ``split_seed``). The k-NN bank is drawn
    from the training images and the queries from the held-out rest of train."""
    from pathlib import Path

    b = get_dataset(dataset, DatasetOptions(data_root=Path(data_root) if data_root else None))
    if subset is not None and subset < 1:
        raise UserError("train_subset must be a positive number of images")
    labels = np.asarray(b.train.labels)
    train_idx, held_idx, val_idx = training_split(labels, subset, seed, val_fraction, split_seed)
    rng = np.random.default_rng([seed, 1])  # the monitor's draws, apart from the subset's
    bank_idx = train_idx[np.sort(rng.permutation(len(train_idx))[: min(bank, len(train_idx))])]
    q_idx = held_idx[np.sort(rng.permutation(len(held_idx))[: min(queries, len(held_idx))])]
    images = _stack(b.train, train_idx, image_size)
    pos = {int(i): j for j, i in enumerate(train_idx)}
    bank_images = images[[pos[int(i)] for i in bank_idx]]
    return TrainData(
        name=b.name,
        images=images,
        labels=torch.from_numpy(labels[train_idx]),
        bank_images=bank_images,
        bank_labels=torch.from_numpy(labels[bank_idx]),
        query_images=_stack(b.train, q_idx, image_size),
        query_labels=torch.from_numpy(labels[q_idx]),
        num_classes=b.num_classes,
        fingerprint={**b.fingerprint, "train_images": len(train_idx)},
        eval_split={
            "val_fraction": val_fraction,
            "split_seed": split_seed,
            "val_images": len(val_idx),
            "val_sha256": indices_sha256(val_idx),
            "train_images": len(train_idx),
            "train_sha256": indices_sha256(train_idx),
        },
        monitor={
            "bank": f"{len(bank_idx)} training images",
            "queries": f"{len(q_idx)} held-out train images (not trained on, not in the "
            "evaluation's validation split)"
            if len(q_idx)
            else "none: every train image outside the validation split is trained on "
            "(online k-NN off; lower --train-subset to hold some out)",
            "bank_sha256": indices_sha256(bank_idx),
            "queries_sha256": indices_sha256(q_idx),
        },
        train_index=train_idx,
        query_index=q_idx,
    )
