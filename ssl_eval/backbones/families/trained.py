"""Backbones trained by ``ssl-eval train``: ``ckpt:DIR`` on its output folder (the format is
defined once, in ``trained_format.py``, which the trainer writes through).

The evaluator needs no extra flags: the sidecar says how to rebuild the module (through the
architecture registry in ``archs.py``, never through the trainer) and how to feed it. Weights
load with safetensors (no unpickling) and strictly: every key must match. An unfinished
training is refused unless ``--allow-incomplete`` (``BuildOptions.allow_incomplete``), and
then its record says so. The record's ``load_report.training`` says what trained the weights
(the trainer's source hash and library versions) and, once the evaluation knows its
validation split (``split_check``), whether any validation image was a training image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ...core.errors import UserError
from ...core.files import sha256_file, sha256_json
from ...core.runtime import warn
from ..adapters import FolderReader, register_folder_reader
from ..architecture import describe
from ..archs import build_arch
from ..base import Backbone, BuildOptions, WeightsInfo
from ..checkpoints import strict_load
from ..trained_format import (
    EVAL_SPLIT,
    FORMAT,
    SIDECAR,
    WEIGHTS,
    WEIGHTS_SHA256,
    indices_sha256,
    is_training_dir,
    read_sidecar,
    read_weights,
    sidecar_preprocessing,
    training_split,
)

__all__ = ["build_from_training_dir", "is_training_dir", "split_check"]


def _incomplete(meta: dict) -> bool:
    """The sidecar describes an unfinished training (``complete: false``, or fewer epochs done
    than planned; sidecars without ``complete`` are judged by their epochs)."""
    done, total = meta.get("epochs_done"), meta.get("epochs")
    counted = isinstance(done, int) and isinstance(total, int) and done < total
    return meta.get("complete") is False or counted


def build_from_training_dir(path: str | os.PathLike, opt: BuildOptions | None = None) -> Backbone:
    """Rebuild the trained backbone in folder ``path``. ``opt.image_size`` and
    ``opt.feature_kind`` override the sidecar's preprocessing size and feature kind."""
    opt = opt or BuildOptions()
    root = Path(path).expanduser()
    if not is_training_dir(root):
        raise UserError(
            f"{root} is not a training folder: expected {root / SIDECAR} (written by `ssl-eval train`)"
        )
    if opt.arch:
        raise UserError(
            f"--arch {opt.arch}: {root} is an `ssl-eval train` folder, whose sidecar "
            "names its architecture; drop --arch"
        )
    meta = read_sidecar(root)
    done, total = meta.get("epochs_done"), meta.get("epochs")
    incomplete = _incomplete(meta)
    if incomplete and not opt.allow_incomplete:
        raise UserError(
            f"{root} holds an unfinished training ({done}/{total} epochs); finish it with "
            f"`ssl-eval train ... --out {root} --resume`, or pass --allow-incomplete to "
            "evaluate it as it is (its records will say so)"
        )
    sd = read_weights(root, meta.get(WEIGHTS_SHA256))
    arch = meta["architecture"]
    model = build_arch(arch["name"], arch.get("kwargs") or {})
    report = strict_load(model, sd, fmt=FORMAT)
    report["architecture"] = {
        **describe(model),
        "name": arch["name"],
        "kwargs": arch.get("kwargs") or {},
        "from": f"the training sidecar ({SIDECAR})",
    }
    model.eval()
    pre = sidecar_preprocessing(meta)
    if opt.image_size:
        pre = pre.with_size(opt.image_size)
    desc = f"{meta.get('method')} {arch['name']} trained {done}/{total} epochs on {meta.get('dataset', {}).get('name')}"
    if incomplete:
        desc += " (INCOMPLETE: evaluated with --allow-incomplete)"
    if meta.get("collapsed"):
        desc += " (COLLAPSED during training)"
    wpath = root / WEIGHTS
    return Backbone(
        tag=f"ckpt:{root}",
        model=model,
        preprocessing=pre,
        feature_kind=opt.feature_kind or meta.get("feature_kind", "model"),
        weights=WeightsInfo("file", sha256_file(wpath), str(wpath)),
        load_report={**report, "training": _training_report(meta, incomplete)},
        description=desc,
    )


def _training_report(meta: dict, incomplete: bool) -> dict:
    """The record of the training, as the evaluation's records carry it
    (``load_report.training``)."""
    cfg = meta.get("train_config") if isinstance(meta.get("train_config"), dict) else {}
    trainer = meta.get("trainer") if isinstance(meta.get("trainer"), dict) else {}
    out = {
        **{
            k: meta.get(k)
            for k in ("method", "epochs", "epochs_done", "seed", "collapsed", "code_version")
        },
        # the training recipe: its resolved config without the device and the seed. Two
        # machines that train one recipe write different weights, never a different recipe,
        # and the runs of one recipe with different seeds are runs of the same recipe (the
        # seed is recorded apart, above). What trained it (the trainer's code and library
        # versions) is recorded apart too (trainer_source, trainer_versions), not hashed in.
        # ``deterministic`` (pinned CPU kernels) changes the rounding, not the recipe, and is
        # recorded apart (``determinism``: the pins as read back; None: unpinned)
        "recipe": sha256_json(
            {k: v for k, v in cfg.items() if k not in ("device", "seed", "deterministic")}
        )[:16],
        "determinism": meta.get("determinism"),
        # which code and libraries made the weights (train/fingerprint.py); None: a sidecar
        # written before the trainer recorded them
        "trainer_source": trainer.get("source"),
        "trainer_versions": trainer.get("versions"),
        # what split_check needs: the data it trained on and the validation split it avoided
        "dataset": meta.get("dataset"),
        "train_subset": cfg.get("train_subset"),
        EVAL_SPLIT: meta.get(EVAL_SPLIT),
    }
    if incomplete:
        out["incomplete_allowed"] = True
    return out


def _plain(obj: object) -> object:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def split_check(
    training: dict,
    dataset_name: str,
    fingerprint: dict,
    val_indices: np.ndarray,
    labels: np.ndarray,
) -> str | None:
    """Whether the evaluation's validation images (``val_indices`` into the train split of
    dataset ``dataset_name``, ``labels`` its labels) were training images of the backbone whose
    ``load_report.training`` is ``training``: "ok", "overlap: N of M validation images were
    training images", "unknown: ..." (the sidecar does not say, or its images cannot be
    redrawn), or "other data: ..." (trained on another dataset: nothing to overlap). None for
    a backbone not trained by ``ssl-eval train``. Anything but "ok" and "other data" is also
    warned in one line.

    The trainer draws its images with ``trained_format.training_split`` from train minus the
    validation split it recorded (``eval_split``); with the evaluation's split (same hash)
    nothing overlaps. With another split, the training images are redrawn from the sidecar's
    settings, checked against the hash it recorded, and counted."""
    if not isinstance(training, dict) or "recipe" not in training:
        return None
    ds = training.get("dataset") if isinstance(training.get("dataset"), dict) else {}
    trained_fp = ds.get("fingerprint") if isinstance(ds.get("fingerprint"), dict) else {}
    trained_fp = {k: v for k, v in trained_fp.items() if k != "train_images"}
    if ds.get("name") != dataset_name or _plain(trained_fp) != _plain(fingerprint):
        return f"other data: trained on {ds.get('name')}, evaluated on {dataset_name}"
    verdict = _overlap(training, np.asarray(val_indices), np.asarray(labels))
    if verdict != "ok":
        split = training.get(EVAL_SPLIT) if isinstance(training.get(EVAL_SPLIT), dict) else {}
        fix = (
            f"evaluate with --val-fraction {split.get('val_fraction')} --split-seed "
            f"{split.get('split_seed')}, the split it left out"
            if split
            else "retrain it with this ssl-eval, which records the split it leaves out"
        )
        warn(
            f"{dataset_name} validation split vs the training of {training.get('method')} "
            f"(recipe {training.get('recipe')}): {verdict}; choices made on validation are "
            f"inflated for it: {fix}"
        )
    return verdict


def _overlap(training: dict, val: np.ndarray, labels: np.ndarray) -> str:
    split = training.get(EVAL_SPLIT)
    if not isinstance(split, dict):
        return "unknown: trained before ssl-eval recorded its split"
    if split.get("val_sha256") == indices_sha256(val):
        return "ok"  # the images it avoided are the ones the evaluation selects on
    try:
        train_idx, _, _ = training_split(
            labels,
            training.get("train_subset"),
            int(training.get("seed")),
            float(split["val_fraction"]),
            int(split["split_seed"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        return f"unknown: its training images cannot be redrawn ({type(e).__name__})"
    if indices_sha256(train_idx) != split.get("train_sha256"):
        return "unknown: its training images cannot be redrawn (their hash differs)"
    n = int(np.isin(val, train_idx).sum())
    if not n:
        return "ok"
    return f"overlap: {n} of {len(val)} validation images were training images"


register_folder_reader(
    FolderReader("ssl-eval train output", is_training_dir, build_from_training_dir)
)
