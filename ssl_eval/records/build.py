"""Records from one evaluation unit: ``build_records`` turns a protocol's output (metrics,
per-image correctness, spread over seeds) into typed records with their intervals, setting and
full provenance (code, packages, machine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.provenance import code_version, machine_info, package_versions
from ..core.stats import bootstrap_ci, bootstrap_stat, mean_ci, pack_bits
from .schema import SCHEMA_VERSION, ResultRecord, make_setting
from .store import utc_now

if TYPE_CHECKING:  # types only: the builder reads these objects, it does not import their layers
    from ..backbones.base import Backbone
    from ..data.datasets import DatasetBundle
    from ..protocols.base import ProtocolOutput
    from ..protocols.cards import ProtocolCard


@dataclass(frozen=True)
class Unit:
    """What every record of one evaluation unit shares, besides the protocol's output."""

    key: str
    run_id: str
    seed: int
    split: dict  # val_fraction, split_seed
    sizes: dict  # train, val, test
    device: str
    feature_options: (
        dict  # dtype, and the image_size / feature_kind overrides (None: the backbone's)
    )
    seed_dependent: bool = True
    features: dict | None = (
        None  # feature cache keys, dtype and extraction seconds (frozen protocols)
    )


def build_records(
    unit: Unit,
    backbone: Backbone,
    bundle: DatasetBundle,
    card: ProtocolCard,
    output: ProtocolOutput,
    wall_s: float,
    peak_mb: float,
    bootstrap_resamples: int = 1000,
) -> list[ResultRecord]:
    """One record per metric of ``output``, each with the unit's full provenance and a 95%
    interval: the t interval over the protocol's own repetitions where it reports a spread,
    else the bootstrap over test images (whose per-image correctness top-1 keeps, packed); a
    metric that is no mean over images (``output.resampled``) is recomputed on each resample."""
    details = dict(output.details)
    if unit.features:
        details.update(unit.features)
    common = dict(
        schema_version=SCHEMA_VERSION,
        run_id=unit.run_id,
        time=utc_now(),
        unit=unit.key,
        backbone=backbone.tag,
        weights=backbone.weights.to_dict(),
        load_report=backbone.load_report,
        preprocessing=backbone.preprocessing.to_dict(),
        feature_kind=backbone.feature_kind,
        protocol=card.to_record(),
        dataset={
            "name": bundle.name,
            "fingerprint": bundle.fingerprint,
            "num_classes": bundle.num_classes,
            "sizes": dict(unit.sizes),
        },
        split=dict(unit.split),
        seed=unit.seed,
        wall_time_s=round(wall_s, 3),
        peak_memory_mb=round(peak_mb, 1),
        device=unit.device,
        packages=package_versions(),
        code_version=code_version(),
        seed_dependent=unit.seed_dependent,
        machine=machine_info(),
    )
    common["setting"] = make_setting(
        common["backbone"],
        common["weights"],
        common["preprocessing"],
        common["feature_kind"],
        common["protocol"],
        common["dataset"],
        common["split"],
        unit.feature_options,
    )
    records = []
    trivial_top5 = bundle.num_classes <= 5  # top-5 of 5 or fewer classes is always 100%
    if trivial_top5:
        details["top5_omitted"] = f"{bundle.num_classes} classes: top-5 is trivially 100%"
    for metric, value in output.metrics.items():
        if trivial_top5 and metric.startswith("top5"):
            continue
        ci, method, spread, extra = None, "", None, {}
        if metric in output.spread:
            m, sd, lo, hi = mean_ci(output.spread[metric])
            ci, method = [lo, hi], output.details.get("spread_over", "t-seeds")
            spread = {"mean": m, "std": sd, "n": len(output.spread[metric])}
        elif metric in output.intervals:
            ci, method = [float(v) for v in output.intervals[metric]], "bootstrap-test"
        elif metric in output.per_sample:
            correct = output.per_sample[metric]
            ci, method = (
                list(bootstrap_ci(correct, bootstrap_resamples, unit.seed)),
                "bootstrap-test",
            )
            if metric == "top1":
                extra = {"per_sample_correct": pack_bits(correct), "n_test": len(correct)}
        elif metric in output.resampled:  # a metric recomputed on each resample of the test set
            ci = list(
                bootstrap_stat(
                    output.resampled[metric], unit.sizes["test"], bootstrap_resamples, unit.seed
                )
            )
            method = "bootstrap-test"
        records.append(
            ResultRecord(
                metric=metric,
                value=float(value),
                ci95=ci,
                ci_method=method,
                spread=spread,
                details=details | extra,
                **common,
            )
        )
    return records
