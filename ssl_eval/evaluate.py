"""The single orchestrator: for each dataset x backbone x protocol -> features -> protocol ->
records. Units already in the results store are skipped unless ``force``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import BuildOptions, build_backbone
from .backbones.base import Backbone
from .config import RunConfig
from .data.datasets import DatasetBundle, DatasetOptions, get_dataset
from .data.splits import stratified_val_split
from .features import default_cache_dir, extract
from .fsutil import sha256_json
from .protocols import ImageInputs, ProtocolInputs
from .protocols.cards import ProtocolCard
from .results import (
    SCHEMA_VERSION,
    ResultRecord,
    code_version,
    new_run_id,
    package_versions,
    peak_memory_mb,
    unit_done,
    utc_now,
    write_unit,
)
from .runtime import log, resolve_device, seed_everything
from .stats import bootstrap_ci, mean_ci, pack_bits


@dataclass
class UnitOutcome:
    backbone: str
    dataset: str
    protocol: str
    status: str  # "done", "skipped"
    metrics: dict
    path: Path | None = None


def unit_key(backbone: Backbone, bundle: DatasetBundle, card: ProtocolCard, cfg: RunConfig, seed: int) -> str:
    return sha256_json({
        "schema": SCHEMA_VERSION,
        "backbone": backbone.tag,
        "weights": backbone.weights.sha256,
        "preprocessing": backbone.preprocessing.to_dict(),
        "feature_kind": backbone.feature_kind,
        "feature_dtype": cfg.feature_dtype,
        "dataset": bundle.name,
        "fingerprint": bundle.fingerprint,
        "protocol": card.to_record() | {"source": None},
        "split": [cfg.val_fraction, cfg.split_seed],
        "seed": seed,
    })[:20]


def run(cfg: RunConfig) -> list[UnitOutcome]:
    """Evaluate every backbone on every dataset under every protocol in ``cfg``."""
    device = resolve_device(cfg.device)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    run_id = new_run_id()
    outcomes: list[UnitOutcome] = []
    opts = BuildOptions(cfg.weights, cfg.image_size, cfg.feature_kind, cfg.offline, seed=0, family=cfg.family)
    backbones: dict[str, Backbone] = {}
    for ds_name in cfg.datasets:
        bundle = get_dataset(ds_name, DatasetOptions(cfg.data_root, cfg.download))
        for bb_name in cfg.backbones:
            if bb_name not in backbones:
                log(f"building backbone {bb_name}")
                backbones[bb_name] = build_backbone(bb_name, opts)
            bb = backbones[bb_name]
            todo = []
            for card in cfg.protocols:
                for seed in cfg.seeds:
                    key = unit_key(bb, bundle, card, cfg, seed)
                    if not cfg.force and unit_done(cfg.results_dir, key):
                        log(f"[skip] {bb.tag} x {bundle.name} x {card.name} (seed {seed}): already in "
                            f"{cfg.results_dir} (use --force to redo)")
                        outcomes.append(UnitOutcome(bb.tag, bundle.name, card.name, "skipped", {}))
                    else:
                        todo.append((card, key, seed))
            if todo:
                outcomes += _evaluate(bb, bundle, todo, cfg, device, cache_dir, run_id)
    return outcomes


def _evaluate(bb, bundle, todo, cfg: RunConfig, device, cache_dir, run_id) -> list[UnitOutcome]:
    feats: dict = {}

    def features(split: str):
        if split not in feats:
            feats[split] = extract(
                bb, bundle, split, cache_dir=cache_dir, device=device, batch_size=cfg.batch_size,
                dtype=cfg.feature_dtype, num_workers=cfg.num_workers, progress=cfg.progress,
            )
        return feats[split]

    train_idx, val_idx = stratified_val_split(bundle.train.labels, cfg.val_fraction, cfg.split_seed)
    out = []
    for card, key, seed in todo:
        seed_everything(seed)
        ptype = card.protocol
        if ptype.inputs == "images":
            inputs = ImageInputs(bb, bundle, train_idx, val_idx, device, seed,
                                 cache_dir / "train_state" / key, cfg.num_workers)
        else:
            tr, te = features("train"), features("test")
            inputs = ProtocolInputs(tr.features, tr.labels, te.features, te.labels,
                                    train_idx, val_idx, bundle.num_classes, device, seed)
        t0 = time.perf_counter()
        result = ptype.run(inputs, card.params)
        wall = time.perf_counter() - t0
        records = _records(bb, bundle, card, key, seed, cfg, result, wall, device, run_id,
                           (len(train_idx), len(val_idx)), feats)
        path = write_unit(cfg.results_dir, key, run_id, records)
        log(
            f"[done] {bb.tag} x {bundle.name} x {card.name} (seed {seed}): "
            + ", ".join(f"{m}={result.metrics[m]:.4f}" for m in ("top1", "top5") if m in result.metrics)
            + f" ({wall:.1f}s) -> {path}"
        )
        out.append(UnitOutcome(bb.tag, bundle.name, card.name, "done", result.metrics, path))
    return out


def _records(bb, bundle, card, key, seed, cfg, result, wall, device, run_id, sizes, feats) -> list[ResultRecord]:
    details = dict(result.details)
    if feats:
        details["feature_cache"] = {s: f.key for s, f in feats.items()}
        details["feature_dtype"] = cfg.feature_dtype
        details["feature_seconds"] = {s: round(f.seconds, 2) for s, f in feats.items()}
    dataset_info = {
        "name": bundle.name,
        "fingerprint": bundle.fingerprint,
        "num_classes": bundle.num_classes,
        "sizes": {"train": sizes[0], "val": sizes[1], "test": len(bundle.test)},
    }
    common = dict(
        schema_version=SCHEMA_VERSION, run_id=run_id, time=utc_now(), unit=key,
        backbone=bb.tag, weights=bb.weights.to_dict(), load_report=bb.load_report,
        preprocessing=bb.preprocessing.to_dict(), feature_kind=bb.feature_kind,
        protocol=card.to_record(), dataset=dataset_info,
        split={"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed},
        seed=seed, wall_time_s=round(wall, 3), peak_memory_mb=round(peak_memory_mb(device.type), 1),
        device=_device_name(device), packages=package_versions(), code_version=code_version(),
    )
    records = []
    for metric, value in result.metrics.items():
        ci, method, spread, extra = None, "", None, {}
        if metric in result.spread:
            m, sd, lo, hi = mean_ci(result.spread[metric])
            n = len(result.spread[metric])
            ci, method = [lo, hi], result.details.get("spread_over", "t-seeds")
            spread = {"mean": m, "std": sd, "n": n}
        elif metric in result.per_sample:
            correct = result.per_sample[metric]
            ci, method = list(bootstrap_ci(correct, cfg.bootstrap_resamples, seed)), "bootstrap-test"
            if metric == "top1":
                extra = {"per_sample_correct": pack_bits(correct), "n_test": len(correct)}
        records.append(ResultRecord(
            metric=metric, value=float(value), ci95=ci, ci_method=method, spread=spread,
            details=details | extra, **common,
        ))
    return records


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    import platform

    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"
