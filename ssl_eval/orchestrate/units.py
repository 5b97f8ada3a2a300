"""The units of a run: the walk over dataset x backbone x seed x protocol that ``run`` evaluates
and ``plan`` lists, each unit's key, and the checks that refuse a run before any work (a
dataset no protocol can read, a protocol the backbone or the data cannot serve)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..backbones import BuildOptions, build_backbone
from ..backbones.base import Backbone
from ..backbones.tokens import has_tokens
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.files import sha256_json
from ..core.provenance import PROTOCOL_LIBRARIES, autocast_dtype, library_versions, source_hash
from ..data.datasets import DatasetBundle, DatasetOptions, get_dataset
from ..data.dense import DENSE_DATASETS
from ..data.splits import stratified_val_split
from ..data.transfer import label_kind
from ..features.accel import Accel
from ..features.extraction import default_cache_dir
from ..protocols import DataShape
from ..protocols.base import PROTOCOL_TYPES
from ..protocols.cards import ProtocolCard
from ..records.schema import SCHEMA_VERSION


def unit_key(
    backbone: Backbone,
    bundle: DatasetBundle,
    card: ProtocolCard,
    cfg: RunConfig,
    seed: int | None,
    device: torch.device,
) -> str:
    """The identity of one unit of work: everything that changes its numbers, the code and
    library versions included; ``seed`` is None where the unit does not depend on it."""
    fast = accel_of(cfg).key()  # kernels that may change the features' last bits
    return sha256_json(
        ({"accel": fast} if fast else {})
        | {
            "schema": SCHEMA_VERSION,
            "backbone": backbone.tag,
            "weights": backbone.weights.sha256,
            "preprocessing": backbone.preprocessing.to_dict(),
            "feature_kind": backbone.feature_kind,
            "built": backbone.built(),
            "feature_options": _feature_options(cfg),
            "extraction_batch_size": cfg.batch_size,  # the features' last bits depend on it
            "dataset": bundle.name,
            "fingerprint": bundle.fingerprint,
            "protocol": card.to_record() | {"source": None},
            "split": [cfg.val_fraction, cfg.split_seed],
            "seed": seed,
            "bootstrap_resamples": cfg.bootstrap_resamples,  # the recorded interval depends on it
            # what computes the number: ssl-eval's source, the libraries, the device and precision
            "code": source_hash(),
            "libraries": library_versions(PROTOCOL_LIBRARIES),
            "device": device.type,
            "autocast": autocast_dtype(device),
        }
    )[:20]


def _feature_options(cfg: RunConfig) -> dict:
    return {
        "dtype": cfg.feature_dtype,
        "image_size": cfg.image_size,
        "feature_kind": cfg.feature_kind,
    }


def accel_of(cfg: RunConfig) -> Accel:
    return Accel(cfg.channels_last, cfg.compile, cfg.pin_memory)


def _untrainable(card: ProtocolCard, bb: Backbone) -> UserError:
    """The refusal of a protocol that trains the backbone for one without trainable parameters
    (run and plan refuse alike)."""
    return UserError(
        f"{card.name} trains the backbone, but {bb.tag} has no trainable "
        "parameters; evaluate it with a frozen protocol (knn, linear, fewshot)"
    )


def _seeded_backbone(bb: Backbone) -> bool:
    """A seeded random initialisation: each seed of the run is another network."""
    return bb.weights.source.startswith("random-init")


@dataclass(frozen=True)
class _Unit:
    """One unit of a run, in the run's order: ``key`` None for one that does not apply (a
    training protocol on a backbone without trainable parameters, under skip_inapplicable)."""

    ds_name: str  # the names asked for
    bundle: DatasetBundle
    split: tuple
    bb_name: str
    bb: Backbone
    seed: int
    card: ProtocolCard
    key: str | None
    dependent: bool = True  # whether the unit depends on the seed
    why: str = ""  # for a unit that does not apply: why


def _no_protocol(dataset: str, kind: str, cfg: RunConfig) -> UserError:
    fits = sorted(e.name for e in PROTOCOL_TYPES.entries() if e.obj.labels == kind)
    return UserError(
        f"dataset {dataset} is {kind}-label and none of the protocols "
        f"({', '.join(c.name for c in cfg.protocols)}) evaluates {kind}-label data; add "
        f"--protocol {fits[0] if fits else '...'} (or --suite transfer)"
    )


def _label_kind(bundle: DatasetBundle) -> str:
    return "multi" if bundle.multilabel is not None else "single"


def _no_tokens(card: ProtocolCard, bb: Backbone) -> UserError:
    """The refusal of a protocol that reads patch tokens for a backbone that gives none."""
    return UserError(
        f"{card.name} reads patch tokens, but {bb.tag} gives only its pooled output; use a "
        "ViT or CNN backbone, or a protocol of pooled features (knn, linear)"
    )


def _kind_mismatch(card: ProtocolCard, bundle: DatasetBundle) -> str:
    """Why ``card`` cannot evaluate ``bundle`` (a single-label protocol on a multi-label
    dataset or the reverse), or "" where it can."""
    if card.protocol.labels == _label_kind(bundle):
        return ""
    return (
        f"{card.name} is for {card.protocol.labels}-label data; {bundle.name} is "
        f"{_label_kind(bundle)}-label"
    )


def _walk(cfg: RunConfig, device, cache_dir: Path, build) -> Iterator[_Unit]:
    """Every unit of ``cfg`` on ``device``, in order: datasets, then backbones, seeds and
    protocols. ``build(name, seed)`` gives the backbone (its weights and built state are in the
    key). What ``run`` evaluates and what ``plan`` lists are both this walk, so their keys
    cannot drift apart. Refuses an untrainable backbone under a training protocol."""
    for ds_name in cfg.datasets:  # before any work: a dataset no protocol of the run can read
        kind = label_kind(ds_name)
        if kind is not None and all(c.protocol.labels != kind for c in cfg.protocols):
            raise _no_protocol(ds_name, kind, cfg)
    for ds_name in cfg.datasets:
        bundle = get_dataset(
            ds_name, DatasetOptions(cfg.data_root, cfg.download, cache_dir / "manifests")
        )
        split = stratified_val_split(bundle.train.labels, cfg.val_fraction, cfg.split_seed)
        _preflight(bundle, cfg, split)
        for bb_name in cfg.backbones:
            for seed in cfg.seeds:
                bb = build(bb_name, seed)
                trainable = any(p.requires_grad for p in bb.model.parameters())
                for card in cfg.protocols:
                    why = _kind_mismatch(card, bundle)
                    if why:  # another protocol of the run evaluates it (_preflight checked)
                        yield _Unit(ds_name, bundle, split, bb_name, bb, seed, card, None, why=why)
                        continue
                    if card.protocol.reads_tokens and not has_tokens(bb.model):
                        if not cfg.skip_inapplicable:
                            raise _no_tokens(card, bb)
                        why = f"{card.name} reads patch tokens; {bb.tag} gives none"
                        yield _Unit(ds_name, bundle, split, bb_name, bb, seed, card, None, why=why)
                        continue
                    if card.protocol.trains and not trainable:
                        if not cfg.skip_inapplicable:
                            raise _untrainable(card, bb)
                        yield _Unit(ds_name, bundle, split, bb_name, bb, seed, card, None)
                        continue
                    dependent = card.protocol.seeded or _seeded_backbone(bb)
                    if not dependent and seed != cfg.seeds[0]:
                        continue  # one run serves every seed
                    key = unit_key(bb, bundle, card, cfg, seed if dependent else None, device)
                    yield _Unit(ds_name, bundle, split, bb_name, bb, seed, card, key, dependent)


def _preflight(bundle: DatasetBundle, cfg: RunConfig, split: tuple[np.ndarray, np.ndarray]) -> None:
    """Data-dependent checks of every card (k beyond the bank, K beyond a class, a dataset of
    one class), before any backbone is built or feature extracted."""
    if all(_kind_mismatch(card, bundle) for card in cfg.protocols):
        raise _no_protocol(bundle.name, _label_kind(bundle), cfg)
    for card in cfg.protocols:
        if card.protocol.extra_tests and not bundle.extra_tests:
            raise UserError(
                f"{card.name} scores robustness test sets, and {bundle.name} has none; use it "
                "with --dataset imagenet-robust, or linear / knn here"
            )
    _dense_preflight(bundle, cfg)
    if all(card.protocol.dense for card in cfg.protocols):
        return  # dense protocols score pixels: the image-level labels play no part
    labels = np.asarray(bundle.train.labels)
    if bundle.num_classes < 2 or len(np.unique(labels)) < 2:
        raise UserError(
            f"dataset {bundle.name} has a single class: every protocol would score 100%; "
            "give it at least two classes"
        )
    train_idx, val_idx = split
    counts_tr = np.bincount(labels[train_idx], minlength=bundle.num_classes)
    counts_all = np.bincount(labels, minlength=bundle.num_classes)
    shape = DataShape(
        len(train_idx),
        len(val_idx),
        len(bundle.test),
        bundle.num_classes,
        int(counts_tr[counts_tr > 0].min()),
        int(counts_all[counts_all > 0].min()),
    )
    for card in cfg.protocols:
        if card.protocol.preflight is not None:
            card.protocol.preflight(card.params, shape)


def _dense_preflight(bundle: DatasetBundle, cfg: RunConfig) -> None:
    """A dense protocol needs per-pixel targets of its kind; a dataset with per-pixel targets
    only (no image labels) takes dense protocols only."""
    dense = bundle.dense
    for card in cfg.protocols:
        need = card.protocol.dense
        if need and (dense is None or dense.task != need):
            raise UserError(
                f"{card.name} scores {need} per pixel, but dataset {bundle.name} has no {need} "
                f"targets; use a {need} dataset ({', '.join(DENSE_DATASETS.get(need, ()))}: "
                "ssl-eval list datasets)"
            )
        if not need and dense is not None and not dense.image_labels:
            raise UserError(
                f"dataset {bundle.name} has per-pixel {dense.task} targets and no image labels: "
                f"{card.name} cannot score it; use a dense protocol (linseg, knnseg, lindepth)"
            )


def _build_options(cfg: RunConfig, seed: int) -> BuildOptions:
    return BuildOptions(
        cfg.weights,
        cfg.image_size,
        cfg.feature_kind,
        cfg.offline,
        seed=seed,
        family=cfg.family,
        arch=cfg.arch,
        allow_incomplete=cfg.allow_incomplete,
    )


@dataclass(frozen=True)
class PlannedUnit:
    """One unit ``run`` would evaluate, with the key its record will carry; or, ``applies``
    False (a suite's ``skip_inapplicable``), one it leaves out (key empty)."""

    key: str
    backbone: str  # the names asked for (what a job is given)
    tag: str  # the built backbone's tag (what records and tables show)
    dataset: str
    protocol: str
    seed: int | None  # None: the unit does not depend on the seed
    applies: bool = True


def plan(cfg: RunConfig, device: torch.device) -> list[PlannedUnit]:
    """The units ``run(cfg)`` would evaluate on ``device`` (done or not), in its order, with
    their keys: what a sweep (ssl_eval/orchestrate/sweep/) shards into jobs and ``ssl-eval status``
    follows. The same walk as ``run`` (``_walk``); backbones are built one at a time (the key
    holds their weights and built state)."""
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    held: dict = {}

    def backbone(name: str, seed: int) -> Backbone:
        if held.get("name") != name:
            held.update(name=name, seed=cfg.seeds[0])
            held["bb"] = build_backbone(name, _build_options(cfg, cfg.seeds[0]))
        if _seeded_backbone(held["bb"]) and held["seed"] != seed:
            held.update(seed=seed, bb=build_backbone(name, _build_options(cfg, seed)))
        return held["bb"]

    return [
        PlannedUnit(
            u.key or "",
            u.bb_name,
            u.bb.tag,
            u.ds_name,
            u.card.name,
            u.seed if (u.dependent or u.key is None) else None,
            u.key is not None,
        )
        for u in _walk(cfg, device, cache_dir, backbone)
    ]
