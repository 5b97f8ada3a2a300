"""The single orchestrator: for each dataset x backbone x protocol -> features -> protocol ->
records. Units already in the results store are skipped unless ``force``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from ..backbones import BuildOptions, build_backbone
from ..backbones.base import Backbone
from ..backbones.tokens import has_tokens
from ..core import distributed
from ..core.config import RunConfig
from ..core.errors import UserError
from ..core.files import claim_each, ensure_writable_dir, lock_path, sha256_json, sweep_leftovers
from ..core.provenance import (
    PROTOCOL_LIBRARIES,
    autocast_dtype,
    device_name,
    library_versions,
    peak_memory_mb,
    source_hash,
)
from ..core.runtime import log, resolve_device, seed_everything
from ..data.datasets import DatasetBundle, DatasetOptions, get_dataset
from ..data.splits import stratified_val_split
from ..data.transfer import label_kind
from ..features.accel import Accel
from ..features.extraction import default_cache_dir, extract
from ..features.layers import layout
from ..protocols import DataShape, ImageInputs, ProtocolInputs
from ..protocols._metrics import with_dataset_metric
from ..protocols.base import PROTOCOL_TYPES
from ..protocols.cards import ProtocolCard
from ..records.build import Unit, build_records
from ..records.schema import SCHEMA_VERSION
from ..records.store import new_run_id, records_dir, unit_done, write_unit

SHOWN_METRICS = (
    "top1",
    "top5",
    "mean_per_class",
    "map11",
    "miou",
    "rmse",
)  # what a finished unit prints


@dataclass
class UnitOutcome:
    backbone: str
    dataset: str
    protocol: str
    status: str  # "done", "skipped", "n/a" (the protocol cannot apply to the backbone)
    metrics: dict
    path: Path | None = None
    key: str | None = None  # the unit's key (its records' file name), None where it did not apply


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


def run(cfg: RunConfig) -> list[UnitOutcome]:
    """Evaluate every backbone on every dataset under every protocol in ``cfg``.

    Each seed of ``cfg.seeds`` seeds the protocol and, for ``random:<arch>``, the
    initialisation. A unit that depends on neither (k-NN on pretrained weights) runs once and
    serves every seed.

    Launched by torchrun, every rank runs this same function: rank 0 decides what is done and
    what to skip and hands its decisions to the others, every rank takes a share of each unit's
    work, and rank 0 alone writes records (see docs/distributed.md)."""
    device, created = distributed.init(resolve_device(cfg.device))
    try:
        return _run(cfg, device)
    finally:
        if created:
            distributed.close()


def _run(cfg: RunConfig, device: torch.device) -> list[UnitOutcome]:
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    distributed.on_main(lambda: _prepare(cfg, cache_dir))
    return _units(cfg, device, cache_dir, distributed.broadcast(new_run_id()))


def _prepare(cfg: RunConfig, cache_dir: Path) -> None:
    """Before any work (a result computed for a folder that cannot take it would be lost): the
    folders take files, and what killed processes left is removed."""
    ensure_writable_dir(records_dir(cfg.results_dir), "results folder")
    ensure_writable_dir(cache_dir, "cache folder")
    states = cache_dir / "train_state"
    state_dirs = [d for d in states.iterdir() if d.is_dir()] if states.is_dir() else []
    for folder in (
        records_dir(cfg.results_dir),
        cache_dir / "features",
        cache_dir / "tokens",
        cache_dir / "decoded",
        cache_dir / "manifests",
        *state_dirs,
        states,  # then its empty folders nobody holds (a killed fine-tune's)
    ):
        for p in sweep_leftovers(folder):
            log(f"removed {p}, left by a killed process", "cleanup")


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


def _units(cfg: RunConfig, device, cache_dir: Path, run_id: str) -> list[UnitOutcome]:
    outcomes: list[UnitOutcome] = []
    backbones: dict[tuple[str, int], Backbone] = {}

    def backbone(name: str, seed: int) -> Backbone:
        first = (name, cfg.seeds[0])
        if first not in backbones:
            log(f"building backbone {name}")
            backbones[first] = build_backbone(name, _build_options(cfg, cfg.seeds[0]))
        if not _seeded_backbone(backbones[first]):
            return backbones[first]
        if (name, seed) not in backbones:
            log(f"building backbone {name} (initialisation seed {seed})")
            backbones[(name, seed)] = build_backbone(name, _build_options(cfg, seed))
        return backbones[(name, seed)]

    walk = _walk(cfg, device, cache_dir, backbone)
    # one dataset x backbone at a time: its units are evaluated before the next is walked
    for _, units in groupby(walk, key=lambda u: (u.ds_name, u.bb_name)):
        todo: dict[int, list] = {}
        for u in units:
            where = (u.bundle, u.split)
            bb, bundle, card, seed = u.bb, u.bundle, u.card, u.seed
            if u.key is None:  # a suite: the cell stays empty, and says why
                log(
                    f"[n/a] {u.why}: not run"
                    if u.why
                    else f"[n/a] {card.name} trains the backbone; {bb.tag} has no trainable "
                    "parameters: not run"
                )
                outcomes.append(UnitOutcome(bb.tag, bundle.name, card.name, "n/a", {}))
                continue
            if not u.dependent and len(cfg.seeds) > 1:
                log(
                    f"{card.name} on {bb.tag} does not depend on the seed: one run serves "
                    f"seeds {', '.join(map(str, cfg.seeds))}"
                )
            if not cfg.force and distributed.on_main(lambda k=u.key: unit_done(cfg.results_dir, k)):
                log(
                    f"[skip] {bb.tag} x {bundle.name} x {card.name} (seed {seed}): already in "
                    f"{cfg.results_dir} (use --force to redo)"
                )
                outcomes.append(
                    UnitOutcome(bb.tag, bundle.name, card.name, "skipped", {}, key=u.key)
                )
            else:
                todo.setdefault(id(bb), [bb, []])[1].append((card, u.key, seed, u.dependent))
        for bb, work in todo.values():
            outcomes += _evaluate(bb, *where, work, cfg, device, cache_dir, run_id)
    return outcomes


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
                "targets; use a dense dataset (ssl-eval list datasets: shapes-seg, voc2012-seg, "
                "shapes-depth, nyu-depth ...)"
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


def _evaluate(
    bb, bundle, split, todo, cfg: RunConfig, device, cache_dir, run_id
) -> list[UnitOutcome]:
    feats: dict = {}
    readers: dict = {}  # feature kind -> the backbone reading it (the same model)

    def features(split: str, kind: str | None = None):
        """``split``'s features in the backbone's own kind, or in ``kind`` (a card that reads
        several layers): one cache entry per (split, kind), shared by every card reading it."""
        kind = kind or bb.feature_kind
        if kind not in readers:
            readers[kind] = bb if kind == bb.feature_kind else replace(bb, feature_kind=kind)
        if (split, kind) not in feats:
            feats[(split, kind)] = extract(
                readers[kind],
                bundle,
                split,
                cache_dir=cache_dir,
                device=device,
                batch_size=cfg.batch_size,
                dtype=cfg.feature_dtype,
                num_workers=cfg.num_workers,
                progress=cfg.progress and distributed.is_main(),
                decode_cache=cfg.decode_cache,
                accel=accel_of(cfg),
            )
        return feats[(split, kind)]

    image_source: dict = {}

    def image_bundle():
        """The bundle protocols that train on images read: with the decode cache, from
        decoded full-size maps where the images allow it (decode_cache.native_bundle)."""
        if not image_source:
            source, how = bundle, "original files or arrays (--decode-cache off)"
            if cfg.decode_cache:
                from ..features.decode_cache import native_bundle

                source, how = native_bundle(
                    bundle, cache_dir=cache_dir, num_workers=cfg.num_workers, progress=cfg.progress
                )
                log(f"{bundle.name} images for training protocols: {how}")
            image_source.update(bundle=source, how=how)
        return image_source["bundle"]

    train_idx, val_idx = split
    training = bb.load_report.get("training")  # ckpt:DIR of `ssl-eval train`: trained on val?
    if training is not None and distributed.is_main():
        from ..backbones.families.trained import split_check

        training["split_check"] = split_check(
            training, bundle.name, bundle.fingerprint, val_idx, bundle.train.labels
        )
    out = []
    # one process per unit: a unit another process finished while this one waited is skipped
    claims = distributed.follow_main(
        claim_each,
        todo,
        lambda u: (
            lock_path(records_dir(cfg.results_dir) / u[1]),
            f"unit {u[1]} ({bb.tag} x {bundle.name} x {u[0].name}, seed {u[2]})",
        ),
        lambda u: not cfg.force and unit_done(cfg.results_dir, u[1]),
    )
    for (card, key, seed, dependent), mine in claims:
        if not mine:
            log(f"[skip] {bb.tag} x {bundle.name} x {card.name} (seed {seed}): done meanwhile")
            out.append(UnitOutcome(bb.tag, bundle.name, card.name, "skipped", {}, key=key))
            continue
        seed_everything(seed)
        ptype = card.protocol
        kind = ptype.features_of(card.params) if ptype.inputs != "images" else None
        if ptype.inputs == "images":
            inputs = ImageInputs(
                bb,
                image_bundle(),
                train_idx,
                val_idx,
                device,
                seed,
                cache_dir / "train_state" / key,
                cfg.num_workers,
                cache_dir,
                accel_of(cfg),
                cfg.batch_size,
                cfg.bootstrap_resamples,
            )
        else:
            tr, te = features("train", kind), features("test", kind)
            inputs = ProtocolInputs(
                tr.features,
                tr.labels,
                te.features,
                te.labels,
                train_idx,
                val_idx,
                bundle.num_classes,
                device,
                seed,
                *(
                    (bundle.multilabel["train"], bundle.multilabel["test"])
                    if bundle.multilabel is not None
                    else ()
                ),
            )
            if ptype.extra_tests:  # the robustness sets, scored with the same head or bank
                for name in bundle.extra_tests:
                    fs = features(name)
                    inputs.extra_tests[name] = (
                        fs.features,
                        fs.labels,
                        bundle.class_subsets.get(name),
                    )
        t0 = time.perf_counter()
        result = with_dataset_metric(
            ptype.run(inputs, card.params), bundle.metric, bundle.test.labels
        )
        wall = time.perf_counter() - t0
        if kind is not None:
            result.details["features_read"] = {"feature_kind": kind, "layout": layout(kind)}
        if distributed.describe():  # provenance: the same number, computed by several processes
            result.details["processes"] = distributed.describe()
        if not distributed.is_main():  # rank 0 alone writes and reports
            out.append(UnitOutcome(bb.tag, bundle.name, card.name, "done", dict(result.metrics)))
            continue
        # the cache entries extracted so far in this unit's feature kind
        read = {s: f for (s, k), f in feats.items() if k == (kind or bb.feature_kind)}
        unit = Unit(
            key=key,
            run_id=run_id,
            seed=seed,
            split={"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed},
            sizes={"train": len(train_idx), "val": len(val_idx), "test": len(bundle.test)},
            device=device_name(device),
            feature_options=_feature_options(cfg),
            seed_dependent=dependent,
            features={
                "feature_cache": {s: f.key for s, f in read.items()},
                "feature_dtype": cfg.feature_dtype,
                "feature_seconds": {s: round(f.seconds, 2) for s, f in read.items()},
                "decode_cache": cfg.decode_cache,
                "accel": accel_of(cfg).record(device.type),
            }
            if feats
            else {"image_source": image_source["how"], "accel": accel_of(cfg).record(device.type)}
            if image_source
            else None,
        )
        records = build_records(
            unit,
            bb,
            bundle,
            card,
            result,
            wall,
            peak_memory_mb(device.type),
            cfg.bootstrap_resamples,
        )
        path = write_unit(cfg.results_dir, key, run_id, records)
        metrics = {r.metric: r.value for r in records}
        log(
            f"[done] {bb.tag} x {bundle.name} x {card.name} (seed {seed}): "
            + ", ".join(f"{m}={metrics[m]:.4f}" for m in SHOWN_METRICS if m in metrics)
            + f" ({wall:.1f}s) -> {path}"
        )
        out.append(UnitOutcome(bb.tag, bundle.name, card.name, "done", metrics, path, key))
    return out


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
