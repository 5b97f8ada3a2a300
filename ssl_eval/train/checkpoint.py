"""What a run writes into its output folder, each file atomically:

* ``backbone.safetensors`` + ``backbone.json``: the backbone's weights and the sidecar the
  evaluator rebuilds it from (format: ssl_eval.backbones.trained_format), rewritten every epoch;
* ``train_state.pt``: everything ``--resume`` needs (model with targets/teachers, optimiser,
  epoch, monitor history); loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import __version__

# the trained-backbone format is defined once, on the reading side; re-exported for the trainer
from ..backbones.trained_format import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    SIDECAR,
    WEIGHTS,
    write_trained_backbone,
)
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..errors import UserError
from ..fsutil import atomic_write_bytes

STATE = "train_state.pt"

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import TrainData
    from .methods.base import MethodSpec


def save_state(out: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(out) / STATE, buf.getvalue())


def load_state(out: Path) -> dict:
    path = Path(out) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read training state {path}: {e}. Delete it to start over.") from e


def export_backbone(out: Path, backbone: nn.Module, sidecar: dict) -> None:
    """The backbone's weights, then the sidecar, in the one format the evaluator reads
    (``ssl_eval.backbones.trained_format``)."""
    write_trained_backbone(out, backbone.state_dict(), sidecar)


def make_sidecar(
    cfg: TrainConfig, arch: str, spec: MethodSpec, data: TrainData, epochs_done: int, history: list
) -> dict:
    """What the trainer exports beside the weights: how to rebuild and read the backbone
    (architecture, preprocessing, feature kind) and the record of its training."""
    last = history[-1] if history else {}
    return {
        "method": cfg.method,
        "architecture": {"name": arch, "kwargs": cfg.arch_kwargs},
        "preprocessing": Preprocessing(
            resize=cfg.image_size, crop=cfg.image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD
        ).to_dict(),
        "feature_kind": spec.feature_kind,
        "train_config": cfg.to_dict(),
        "dataset": {"name": data.name, "fingerprint": data.fingerprint},
        "epochs": cfg.epochs,
        "epochs_done": epochs_done,
        "complete": epochs_done >= cfg.epochs,
        "seed": cfg.seed,
        "code_version": __version__,
        "collapsed": bool(last.get("collapsed", False)),
        "final_diagnostics": last,
        "history": history,
    }
