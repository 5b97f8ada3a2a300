"""The single orchestrator: for each dataset x backbone x protocol -> features -> protocol ->
records. Units already in the results store are skipped unless ``force``. Which units a run
holds, their keys and the checks before any work are in units.py (the walk ``run`` and ``plan``
share; ``plan``, ``unit_key`` and ``PlannedUnit`` stay importable from here, the ``as``
imports); this module executes them."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path

import torch

from ..backbones import build_backbone
from ..backbones.base import Backbone
from ..core import distributed
from ..core.config import RunConfig
from ..core.files import claim_each, ensure_writable_dir, lock_path, sweep_leftovers
from ..core.provenance import device_name, peak_memory_mb
from ..core.runtime import log, resolve_device, seed_everything, warn
from ..features.extraction import default_cache_dir, extract
from ..features.layers import layout
from ..protocols import ImageInputs, ProtocolInputs
from ..protocols._edges import describe as describe_edge
from ..protocols._metrics import with_dataset_metric
from ..records.build import Unit, build_records
from ..records.store import new_run_id, records_dir, unit_done, write_unit
from .units import PlannedUnit as PlannedUnit
from .units import _build_options, _feature_options, _seeded_backbone, _walk, accel_of
from .units import plan as plan
from .units import unit_key as unit_key

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
        for e in result.details.get("grid_edges", ()):
            warn(
                f"{bb.tag} x {bundle.name} x {card.name}: chosen at the edge of its grid "
                f"({describe_edge(e)}); the best may lie beyond it: widen the grid "
                f"(the card's {e['widen']}: --set {card.name}.{e['widen'].split(',')[0]}=...)"
            )
        out.append(UnitOutcome(bb.tag, bundle.name, card.name, "done", metrics, path, key))
    return out
