"""What a run writes into its output folder, each file atomically:

* ``backbone.safetensors`` + ``backbone.json``: the backbone's weights and the sidecar the
  evaluator rebuilds it from (format: ssl_eval.backbones.trained_format), rewritten every epoch;
* ``train_state.pt``: everything ``--resume`` needs (model with targets/teachers, optimiser,
  epoch, monitor history), behind a length and crc32 header (``fsutil.write_checked``); loaded
  with ``weights_only=True``. A damaged one is reported in one line, removed, and the training
  starts again from epoch 0 (training is deterministic, so the result is the same).
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
    EVAL_SPLIT,
    FORMAT,
    FORMAT_VERSION,
    SIDECAR,
    WEIGHTS,
    write_trained_backbone,
)
from ..core.errors import UserError
from ..core.files import DamagedFile, read_checked, write_checked
from ..core.runtime import warn
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .fingerprint import trainer_fingerprint

STATE = "train_state.pt"

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import TrainData
    from .methods.base import MethodSpec


_FIELDS = {"model": dict, "optimizer": dict, "epoch": int, "history": list, "config": dict}


def save_state(out: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_checked(Path(out) / STATE, buf.getvalue())


def _read_state(path: Path) -> dict:
    """The state, verified (checksum, then its form); ``DamagedFile`` otherwise."""
    payload = read_checked(path, legacy=True)  # legacy: states written before checksums
    try:
        st = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on a damaged file
        raise DamagedFile(f"not a readable torch file ({type(e).__name__})") from e
    if not isinstance(st, dict) or any(not isinstance(st.get(k), t) for k, t in _FIELDS.items()):
        raise DamagedFile("not a training state of the form ssl-eval writes")
    if st["epoch"] < 1 or len(st["history"]) != st["epoch"]:
        raise DamagedFile(f"its epoch {st['epoch']} does not match its history")
    return st


def load_state(out: Path) -> dict | None:
    """The saved training state of ``out``; None when it is damaged (truncated, bytes changed,
    not a state ssl-eval writes): that is reported in one line and the file removed, so the
    caller trains from epoch 0."""
    path = Path(out) / STATE
    try:
        return _read_state(path)
    except DamagedFile as e:
        warn(f"training state {path} is damaged ({e}); discarding it, training starts over")
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise UserError(
                f"training state {path} is damaged and cannot be removed ({err.strerror}); "
                "delete it to start over"
            ) from err
        return None


def restore(method: nn.Module, opt: torch.optim.Optimizer, st: dict, path: Path) -> bool:
    """Load ``st`` into ``method`` and ``opt``; False (reported in one line, the state removed)
    when it does not fit them. Nothing is loaded unless everything fits, so on False the caller
    trains from epoch 0 with the model and optimiser as they were built."""
    own = method.state_dict()
    sd = st["model"]
    bad = sorted(set(own) ^ set(sd)) or [
        k for k in own if not isinstance(sd[k], torch.Tensor) or sd[k].shape != own[k].shape
    ]
    saved = opt.state_dict()
    try:
        if bad:
            raise ValueError(f"{len(bad)} entries differ, first {bad[0]!r}")
        opt.load_state_dict(st["optimizer"])  # checks its groups before changing anything
        method.load_state_dict(sd)
    except Exception as e:
        opt.load_state_dict(saved)
        warn(
            f"training state {path} is damaged (it does not fit the model: {_one_line(e)}); "
            "discarding it, training starts over"
        )
        path.unlink(missing_ok=True)
        return False
    return True


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def export_backbone(out: Path, backbone: nn.Module, sidecar: dict) -> None:
    """The backbone's weights, then the sidecar, in the one format the evaluator reads
    (``ssl_eval.backbones.trained_format``)."""
    write_trained_backbone(out, backbone.state_dict(), sidecar)


def make_sidecar(
    cfg: TrainConfig,
    arch: str,
    spec: MethodSpec,
    data: TrainData,
    epochs_done: int,
    history: list,
    pins: dict | None = None,
) -> dict:
    """What the trainer exports beside the weights: how to rebuild and read the backbone
    (architecture, preprocessing, feature kind) and the record of its training: what trained
    it (``trainer``: the trainer's source hash and library versions), which evaluation
    validation split its images avoid (``eval_split``) and what its monitor scored on."""
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
        EVAL_SPLIT: data.eval_split,
        "monitor": data.monitor,
        "epochs": cfg.epochs,
        "epochs_done": epochs_done,
        "complete": epochs_done >= cfg.epochs,
        "seed": cfg.seed,
        "code_version": __version__,
        "trainer": trainer_fingerprint(),
        # the pinned CPU kernels as read back (train/determinism.py); None: not pinned
        "determinism": pins,
        "collapsed": bool(last.get("collapsed", False)),
        "final_diagnostics": last,
        "history": history,
    }
