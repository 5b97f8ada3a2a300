"""What a run writes into its output folder, each file atomically:

  * ``backbone.safetensors`` + ``backbone.json``: the backbone's weights and the sidecar the
    evaluator rebuilds it from (ssl_eval.backbones.trained), rewritten every epoch;
  * ``train_state.pt``: everything ``--resume`` needs (model with targets/teachers, optimiser,
    epoch, monitor history); loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..fsutil import atomic_write_bytes, atomic_write_json

FORMAT = "ssl-eval-trained-backbone"
FORMAT_VERSION = 1
STATE = "train_state.pt"
WEIGHTS = "backbone.safetensors"
SIDECAR = "backbone.json"


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
    """Weights as safetensors (contiguous CPU copies), then the sidecar: a reader that finds the
    sidecar always finds the weights it describes."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    atomic_write_bytes(Path(out) / WEIGHTS, save(sd))
    atomic_write_json(Path(out) / SIDECAR, {"format": FORMAT, "format_version": FORMAT_VERSION, **sidecar})
