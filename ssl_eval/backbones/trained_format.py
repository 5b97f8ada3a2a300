"""The one contract between the trainer, which writes a trained backbone, and the evaluator,
which reads it back: an output folder of ``ssl-eval train`` holding

  * ``backbone.safetensors``: the backbone's state dict (safetensors: no unpickling);
  * ``backbone.json``, the sidecar: ``format`` and ``format_version`` (below), then what the
    trainer adds: ``architecture`` (``name`` in ``archs.ARCHS``, ``kwargs``), ``preprocessing``
    (``Preprocessing.to_dict``), ``feature_kind`` and the training record (method, epochs,
    epochs_done, seed, dataset, history, ...), and ``weights_sha256``, verified when read.

Both files are written atomically, weights first, so a reader that finds the sidecar always
finds the weights it describes. ``train/`` imports this module; it imports nothing from
``train/`` (data flows one way).

Which train images the trainer may use is decided here too (``training_split``), once for both
sides: the trainer draws from it, and the evaluator redraws it to check that the images it
selects hyperparameters on were not trained on (``families.trained.split_check``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError, one_line
from ..core.files import atomic_write_bytes, atomic_write_json
from ..data.splits import stratified_val_split
from ..data.transforms import Preprocessing

FORMAT = "ssl-eval-trained-backbone"
FORMAT_VERSION = 1  # what this ssl-eval writes
SUPPORTED_VERSIONS = (1,)  # what it reads
WEIGHTS = "backbone.safetensors"
SIDECAR = "backbone.json"
WEIGHTS_SHA256 = "weights_sha256"  # the sidecar's checksum of the weights file
EVAL_SPLIT = "eval_split"  # the sidecar's record of the evaluation's validation split it avoided


def indices_sha256(idx) -> str:
    """A short hash (16 hex) of a set of image indices (sorted, as int64)."""
    a = np.sort(np.asarray(idx, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


def training_split(
    labels: np.ndarray, subset: int | None, seed: int, val_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, held-out, validation) indices of a train split with ``labels``. Validation is
    the evaluation's own split (``stratified_val_split(labels, val_fraction, split_seed)``,
    what ``ssl-eval run`` selects hyperparameters on); the trainer's images are the first
    ``subset`` of a ``seed``-ed permutation of the rest (all of it when None), and held-out is
    the rest of the rest: train images neither trained on nor in validation. Sorted."""
    pool, val = stratified_val_split(np.asarray(labels), val_fraction, split_seed)
    order = np.random.default_rng(seed).permutation(len(pool))
    k = min(subset or len(pool), len(pool))
    return np.sort(pool[order[:k]]), np.sort(pool[order[k:]]), val


def is_training_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``ssl-eval train`` (it has the sidecar)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / SIDECAR).is_file()


def write_trained_backbone(
    out: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], sidecar: dict
) -> None:
    """Weights as safetensors (contiguous CPU copies), then the sidecar stamped with the format:
    a reader that finds the sidecar always finds the weights it describes."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    data = save(sd)
    atomic_write_bytes(Path(out) / WEIGHTS, data)
    atomic_write_json(
        Path(out) / SIDECAR,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **sidecar,
            WEIGHTS_SHA256: hashlib.sha256(data).hexdigest(),
        },
    )


def read_sidecar(path: str | os.PathLike) -> dict:
    """The sidecar of folder ``path``, checked: this format, a version this ssl-eval reads, and
    the fields the evaluator rebuilds the backbone from."""
    p = Path(path).expanduser() / SIDECAR
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON
        raise UserError(
            f"cannot read {p}: {one_line(e) or 'nested too deeply'}. "
            "Is this an `ssl-eval train` output folder?"
        ) from e
    if not isinstance(meta, dict):
        raise UserError(
            f"{p} is not an ssl-eval training sidecar (a JSON {type(meta).__name__}, not an object)"
        )
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{p} is not an ssl-eval training sidecar (format {meta.get('format')!r}, expected {FORMAT!r})"
        )
    if not any(meta.get("format_version") == v for v in SUPPORTED_VERSIONS):
        raise UserError(
            f"{p} has format version {meta.get('format_version')}; this ssl-eval reads {SUPPORTED_VERSIONS}. "
            "Upgrade ssl-eval or re-export the checkpoint."
        )
    arch = meta.get("architecture")
    if not isinstance(arch, dict) or not arch.get("name"):
        raise UserError(
            f"{p} names no architecture ('architecture': {{'name': ...}}); the file is damaged"
        )
    if not isinstance(meta.get("preprocessing"), dict):
        raise UserError(f"{p} has no 'preprocessing'; the file is damaged")
    return meta


def sidecar_preprocessing(meta: dict) -> Preprocessing:
    """The preprocessing the backbone was trained with, as the sidecar records it."""
    return Preprocessing.from_dict(meta["preprocessing"])


def read_weights(path: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in folder ``path``, read with safetensors, verified against the sha256
    its sidecar records (``sha256``; sidecars written before it carry none: unverified). A
    changed byte in a tensor would otherwise load, and score, as different weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    root = Path(path).expanduser()
    wpath = root / WEIGHTS
    if not wpath.is_file():
        raise UserError(f"{wpath} is missing; the run in {root} has not finished an epoch yet")
    try:
        data = wpath.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise UserError(
                f"{wpath} does not match the sha256 its sidecar records (damaged since "
                "training); retrain or restore it"
            )
        return load(data)
    except (SafetensorError, OSError) as e:
        raise UserError(
            f"cannot read {wpath}: {one_line(e)}. The file is damaged; retrain or restore it."
        ) from e
