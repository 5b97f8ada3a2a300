"""What every protocol receives and returns, and the registry of protocol types."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..registry import Registry


@dataclass
class ProtocolInputs:
    """Features of one (backbone, dataset). ``train_idx``/``val_idx`` split the train features;
    every choice a protocol makes is made on ``val_idx``; the test split only reports."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    num_classes: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0


@dataclass
class ProtocolOutput:
    metrics: dict[str, float]  # headline metrics: top1, top5, ... (fractions in [0, 1])
    details: dict = field(default_factory=dict)  # selected hyperparameters, per-setting scores


@dataclass(frozen=True)
class ProtocolType:
    """A protocol implementation: its parameter dataclass and ``run(inputs, params)``."""

    name: str
    params: type
    run: Callable[[ProtocolInputs, object], ProtocolOutput]


PROTOCOL_TYPES: Registry[ProtocolType] = Registry("protocol type")


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the ``k`` highest scores, for each k."""
    kmax = min(max(ks), scores.shape[1])
    top = scores.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def as_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Features (often memory-mapped float16) -> float32 tensor on ``device``."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device)
