"""The results store as one pandas table: ``load_frame(results_dir)``.

Every consumer of many records (the leaderboard, ``compare``, the regression gate, ``export``,
reports) reads them through this frame, so how a record file becomes a row is decided once.
Files are read with the checksummed reader of ``results.py``; a damaged file is skipped with
the same warning ``load_records`` gives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.runtime import warn
from .schema import ResultRecord
from .store import read_unit_file, records_dir

if TYPE_CHECKING:
    import pandas as pd

# the per-image data a record keeps for paired tests: its own columns, never flattened
_PER_SAMPLE = ("per_sample_correct", "n_test")
# what each record of a unit keeps for itself (the rest of ``details`` is the unit's)
_PER_METRIC_DETAILS = (*_PER_SAMPLE, "top5_omitted")

IDENTITY = (
    "backbone",
    "dataset",
    "protocol",
    "seed",
    "unit",
    "run_id",
    "time",
    "file",
    "schema_version",
    "seed_dependent",
)


def flatten(obj: object, prefix: str) -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1}``. Lists become their canonical JSON text
    (one cell, comparable, exportable); an empty mapping is its JSON text ``{}``."""
    if isinstance(obj, dict):
        if not obj:
            return {prefix: "{}"}
        out: dict[str, object] = {}
        for k, v in obj.items():
            out |= flatten(v, f"{prefix}.{k}")
        return out
    if isinstance(obj, list | tuple):
        return {prefix: json.dumps(list(obj), sort_keys=True, default=str)}
    return {prefix: obj}


def canonical(obj: object) -> str:
    """The canonical JSON text of a summary (sorted keys): equal settings, equal text."""
    return json.dumps(obj, sort_keys=True, default=str)


def unit_row(path: Path, records: list[ResultRecord]) -> dict[str, object]:
    """The frame row of one record file (one evaluation unit run): what its records share,
    then one group of columns per metric."""
    first = records[0]
    head = next((r for r in records if r.metric == "top1"), first)
    setting = first.setting
    row: dict[str, object] = {
        "backbone": first.backbone,
        "dataset": first.dataset.get("name"),
        "protocol": first.protocol.get("name"),
        "seed": first.seed,
        "unit": first.unit,
        "run_id": first.run_id,
        "time": first.time,
        "file": path.name,
        "schema_version": first.schema_version,
        "seed_dependent": bool(first.seed_dependent),
        "setting.hash": setting["hash"],
        "setting.row_hash": setting["row"],
        "setting.column_hash": setting["column"],
        "setting.summary": canonical(setting["summary"]),
    }
    row |= flatten(setting["summary"]["row"], "setting.row")
    row |= flatten(setting["summary"]["column"], "setting.column")
    row |= {
        "protocol.type": first.protocol.get("type"),
        "protocol.version": first.protocol.get("version"),
        "protocol.source": first.protocol.get("source"),
        "feature_kind": first.feature_kind,
        "code_version": first.code_version,
        "device": first.device,
        "wall_time_s": first.wall_time_s,
        "peak_memory_mb": first.peak_memory_mb,
    }
    row |= flatten(first.protocol.get("overrides") or {}, "protocol.overrides")
    row |= flatten({k: v for k, v in first.dataset.items() if k != "name"}, "dataset")
    row |= flatten(first.split, "split")
    row |= flatten(first.weights, "weights")
    row |= flatten(first.preprocessing, "preprocessing")
    row |= flatten(first.packages, "packages")
    row |= flatten(first.machine, "machine")
    row |= flatten(first.load_report, "load_report")
    row |= flatten(
        {k: v for k, v in head.details.items() if k not in _PER_METRIC_DETAILS}, "details"
    )
    for r in records:
        m = r.metric
        row[m] = r.value
        if r.ci95 is not None:
            row[f"{m}.lo"], row[f"{m}.hi"] = r.ci95
        if r.ci_method:
            row[f"{m}.ci_method"] = r.ci_method
        if r.spread:
            row[f"{m}.std"], row[f"{m}.n"] = r.spread.get("std"), r.spread.get("n")
        if "per_sample_correct" in r.details:
            row[f"{m}.per_sample_correct"] = r.details["per_sample_correct"]
            row[f"{m}.n_test"] = r.details.get("n_test")
        if "top5_omitted" in r.details:
            row["details.top5_omitted"] = r.details["top5_omitted"]
    return row


def units_of(records: list[ResultRecord]) -> list[list[ResultRecord]]:
    """The records of a file grouped by unit run (a file ssl-eval writes holds one; a file
    merged by hand may hold several): each group becomes one row, so no metric of one unit
    run overwrites another's."""
    groups: dict[tuple, list[ResultRecord]] = {}
    for r in records:
        k = (r.unit, r.run_id, r.time, r.seed, r.backbone, r.setting["hash"])
        groups.setdefault(k, []).append(r)
    return list(groups.values())


def load_frame(results_dir: str | Path) -> pd.DataFrame:
    """Every record file under ``<results_dir>/records/`` as one row of a DataFrame, in the
    order of the file names (as ``load_records``). A file that is not a valid record file
    (damaged, a checksum mismatch, a newer schema) is skipped with a warning naming it.

    A row is one evaluation unit run (backbone x dataset x protocol x seed): its records
    (one per metric) share everything but the metric. Columns (a column a row lacks is NaN):

    * identity: ``backbone``, ``dataset`` (name), ``protocol`` (card name), ``seed``,
      ``unit`` (the unit key), ``run_id``, ``time`` (UTC ISO), ``file`` (record file name),
      ``schema_version``, ``seed_dependent``;
    * every metric the unit reports (``top1``, ``top5``, ``top1@k20``, ``top1@K5/logreg`` ...):
      the value (a fraction in [0, 1]), with ``<metric>.lo`` / ``<metric>.hi`` (the 95%
      interval) and ``<metric>.ci_method`` (``bootstrap-test``, ``t-seeds``, ``t-draws``,
      ``t-episodes``) where the record has an interval, ``<metric>.std`` / ``<metric>.n``
      where it reports a spread over repetitions, and ``<metric>.per_sample_correct``
      (packed bits, ``stats.unpack_bits``) / ``<metric>.n_test`` where it keeps per-image
      correctness (top-1 of knn, linear, finetune);
    * the setting: ``setting.hash``, ``setting.row_hash``, ``setting.column_hash``,
      ``setting.summary`` (the whole summary as canonical JSON), and its fields flattened:
      ``setting.row.backbone``, ``setting.row.weights``, ``setting.row.preprocessing.*``,
      ``setting.row.feature_kind``, ``setting.column.protocol.{name,version,type}``,
      ``setting.column.protocol.params.*``, ``setting.column.dataset.{name,fingerprint}``,
      ``setting.column.split.*``, ``setting.column.features.{dtype,image_size,feature_kind}``;
    * the protocol card: ``protocol.type``, ``protocol.version``, ``protocol.source``,
      ``protocol.overrides.*``;
    * data: ``dataset.num_classes``, ``dataset.sizes.{train,val,test}``,
      ``dataset.fingerprint.*``, ``split.{val_fraction,split_seed}``;
    * backbone: ``weights.{source,sha256,path}``, ``preprocessing.*``, ``feature_kind``,
      ``load_report.*`` (for ``ssl-eval train`` backbones ``load_report.training.*``, with
      ``load_report.training.recipe``, the sha256 of the training recipe);
    * provenance: ``code_version``, ``packages.<name>`` (library versions), ``device``,
      ``machine.{cpu_model,cpu_capability,cpu_count}`` (schema 3),
      ``wall_time_s``, ``peak_memory_mb``, ``details.*`` (what the protocol reports besides
      its metrics: selected hyperparameters, validation scores, feature-cache keys ...).

    Lists are stored as their JSON text; nested mappings are flattened with dots.
    """
    import pandas as pd

    rows, metrics, n_records = [], [], 0
    for p in sorted(records_dir(Path(results_dir)).glob("*.json")):
        try:
            records = read_unit_file(p)
        except ValueError as e:
            warn(f"skipping {p}: {e}")
            continue
        n_records += len(records)
        for group in units_of(records):
            rows.append(unit_row(p, group))
            metrics += [m for m in dict.fromkeys(r.metric for r in group) if m not in metrics]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(IDENTITY))
    frame = frame[_column_order(frame.columns, metrics)]
    frame.attrs["n_records"] = n_records  # one per metric of each file
    return frame


# the column groups after the identity and the metrics, in this order
_GROUPS = (
    "setting.",
    "protocol.",
    "dataset.",
    "split.",
    "weights.",
    "preprocessing.",
    "feature_kind",
    "load_report.",
    "code_version",
    "packages.",
    "machine.",
    "device",
    "wall_time_s",
    "peak_memory_mb",
    "details.",
)
_METRIC_PARTS = ("", ".lo", ".hi", ".ci_method", ".std", ".n", ".per_sample_correct", ".n_test")


def _column_order(columns: pd.Index, metrics: list[str]) -> list[str]:
    """Identity, then the metrics (top1, top5 first; each with its interval and per-image
    columns), then the setting, the card, the data, the backbone and the provenance."""
    present = set(columns)
    out = [c for c in IDENTITY if c in present]
    ranked = sorted(metrics, key=lambda m: (m != "top1", m != "top5", metrics.index(m)))
    out += [m + part for m in ranked for part in _METRIC_PARTS if m + part in present]
    taken = set(out)
    rest = [c for c in columns if c not in taken]

    def group(c: str) -> int:
        return next(
            (i for i, g in enumerate(_GROUPS) if c == g or (g.endswith(".") and c.startswith(g))),
            len(_GROUPS),
        )

    summary_first = {
        "setting.hash": 0,
        "setting.row_hash": 1,
        "setting.column_hash": 2,
        "setting.summary": 3,
    }
    return out + sorted(rest, key=lambda c: (group(c), summary_first.get(c, 4), c))
