"""What a run writes into its output folder, each file atomically:

  * ``backbone.safetensors`` + ``backbone.json``: the backbone's weights and the sidecar the
    evaluator rebuilds it from (format: ssl_eval.backbones.trained_format), rewritten every epoch;
  * ``train_state.pt``: everything ``--resume`` needs (model with targets/teachers, optimiser,
    epoch, monitor history); loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

# the trained-backbone format is defined once, on the reading side; re-exported for the trainer
from ..backbones.trained_format import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    SIDECAR,
    WEIGHTS,
    write_trained_backbone,
)
from ..errors import UserError
from ..fsutil import atomic_write_bytes

STATE = "train_state.pt"


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
