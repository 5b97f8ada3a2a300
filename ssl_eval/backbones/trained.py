"""Backbones trained by ``ssl-eval train``: a folder with ``backbone.safetensors`` and its
``backbone.json`` sidecar (architecture, preprocessing, feature kind, training record).

The evaluator needs no extra flags: the sidecar says how to rebuild the module (through the
architecture registry in ``archs.py``, never through the trainer) and how to feed it. Weights
load with safetensors (no unpickling) and strictly: every key must match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data.transforms import Preprocessing
from ..errors import UserError
from ..fsutil import sha256_file
from .archs import build_arch
from .base import Backbone, BuildOptions, WeightsInfo
from .checkpoints import strict_load

FORMAT = "ssl-eval-trained-backbone"
SUPPORTED_VERSIONS = (1,)
WEIGHTS = "backbone.safetensors"
SIDECAR = "backbone.json"


def is_training_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder written by ``ssl-eval train`` (it has the sidecar)."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / SIDECAR).is_file()


def read_sidecar(path: str | os.PathLike) -> dict:
    p = Path(path).expanduser() / SIDECAR
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {p}: {e}. Is this an `ssl-eval train` output folder?") from e
    if meta.get("format") != FORMAT:
        raise UserError(f"{p} is not an ssl-eval training sidecar (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("format_version") not in SUPPORTED_VERSIONS:
        raise UserError(
            f"{p} has format version {meta.get('format_version')}; this ssl-eval reads {SUPPORTED_VERSIONS}. "
            "Upgrade ssl-eval or re-export the checkpoint."
        )
    return meta


def build_from_training_dir(path: str | os.PathLike, opt: BuildOptions | None = None) -> Backbone:
    """Rebuild the trained backbone in folder ``path``. ``opt.image_size`` and
    ``opt.feature_kind`` override the sidecar's preprocessing size and feature kind."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    opt = opt or BuildOptions()
    root = Path(path).expanduser()
    if not is_training_dir(root):
        raise UserError(f"{root} is not a training folder: expected {root / SIDECAR} (written by `ssl-eval train`)")
    meta = read_sidecar(root)
    wpath = root / WEIGHTS
    if not wpath.is_file():
        raise UserError(f"{wpath} is missing; the run in {root} has not finished an epoch yet")
    arch = meta["architecture"]
    model = build_arch(arch["name"], arch.get("kwargs") or {})
    try:
        sd = load_file(str(wpath))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {wpath}: {e}. The file is damaged; retrain or restore it.") from e
    report = strict_load(model, sd, fmt=FORMAT)
    model.eval()
    pp = meta["preprocessing"]
    pre = Preprocessing(resize=pp.get("resize"), crop=pp.get("crop"), mean=tuple(pp["mean"]),
                        std=tuple(pp["std"]), interpolation=pp.get("interpolation", "bilinear"))
    if opt.image_size:
        pre = pre.with_size(opt.image_size)
    done, total = meta.get("epochs_done"), meta.get("epochs")
    desc = f"{meta.get('method')} {arch['name']} trained {done}/{total} epochs on {meta.get('dataset', {}).get('name')}"
    if meta.get("collapsed"):
        desc += " (COLLAPSED during training)"
    return Backbone(
        tag=f"ckpt:{root}",
        model=model,
        preprocessing=pre,
        feature_kind=opt.feature_kind or meta.get("feature_kind", "model"),
        weights=WeightsInfo("file", sha256_file(wpath), str(wpath)),
        load_report={**report, "training": {k: meta.get(k) for k in ("method", "epochs", "epochs_done", "seed",
                                                                        "collapsed", "code_version")}},
        description=desc,
    )
