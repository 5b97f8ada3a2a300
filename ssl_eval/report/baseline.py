"""Baselines for the regression gate: ``ssl-eval baseline`` writes the current records' rows
(``write_baseline``), ``ssl-eval check`` reads them back (``read_baseline``).

A row is one (backbone, dataset, protocol, seed, metric) with its setting, and keeps every
training run of its recipe (``runs``: training seed, weights, setting hash, value, interval and
per-image correctness): ``group_runs`` puts the records' runs that differ only by their trained
weights (one per training seed) into one row, so the check knows the recipe's retraining noise.
Format version 2; version 1 files (one run per row) are still read.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.files import atomic_write_text, sha256_json
from ..records.schema import DENSE_HEADLINES

BASELINE_FORMAT = "ssl-eval-baseline"
BASELINE_VERSION = 2  # 2: rows hold their training runs; 1 (one run per row) is still read
KEY = ("backbone", "dataset", "protocol", "seed", "metric")
GATED = ("top1", *DENSE_HEADLINES)
RUN_FIELDS = ("train_seed", "weights", "setting_hash", "value", "ci95", "per_sample_correct")
RUN_FIELDS += ("n_test", "time")


# ---------------------------------------------------------------- baseline rows


def frame_rows(results_dir: Path, metrics: tuple[str, ...] = GATED) -> list[dict]:
    """One row per (unit run, metric) of the records, the newest run of each key and setting.
    The gated metrics: top-1, and the dense probes' mIoU and RMSE (lower is better)."""
    from ..records.frame import load_frame

    frame = load_frame(results_dir)
    if frame.empty:
        return []
    frame = frame.sort_values("time", kind="stable")
    rows: dict[tuple, dict] = {}
    for _, r in frame.iterrows():
        summary = json.loads(r["setting.summary"])
        for m in metrics:
            if m not in r or _missing(r[m]):
                continue
            row = {
                "backbone": r["backbone"],
                "dataset": r["dataset"],
                "protocol": r["protocol"],
                "seed": None if _missing(r.get("seed")) else int(r["seed"]),
                "metric": m,
                "value": float(r[m]),
                "ci95": _pair(r, m),
                "setting": {
                    "hash": r["setting.hash"],
                    "row": r["setting.row_hash"],
                    "column": r["setting.column_hash"],
                    "summary": summary,
                },
                "recipe": _get(r, "load_report.training.recipe"),
                "train_seed": _int(_get(r, "load_report.training.seed")),
                "weights": summary["row"].get("weights"),
                "per_sample_correct": _get(r, f"{m}.per_sample_correct"),
                "n_test": _int(_get(r, f"{m}.n_test")),
                "time": r["time"],
            }
            rows[(*row_key(row), row["setting"]["hash"])] = row  # newest wins
    return list(rows.values())


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _get(r, col):
    v = r.get(col)
    return None if _missing(v) else v


def _int(v):
    return None if v is None else int(v)


def _pair(r, m):
    lo, hi = _get(r, f"{m}.lo"), _get(r, f"{m}.hi")
    return None if lo is None or hi is None else [float(lo), float(hi)]


def row_key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def _recipe_group(row: dict) -> tuple:
    """What two runs of one recipe share: everything but the trained weights (rows without a
    training recipe are their own group)."""
    s = row["setting"]
    if not row.get("recipe"):
        return (*row_key(row), s["hash"])
    others = {k: v for k, v in s["summary"]["row"].items() if k != "weights"}
    return (*row_key(row), s["column"], sha256_json(others), row["recipe"])


def run_of(row: dict) -> dict:
    run = {k: row.get(k) for k in RUN_FIELDS if k != "setting_hash"}
    run["setting_hash"] = row["setting"]["hash"]
    return run


def group_runs(rows: list[dict]) -> list[dict]:
    """Baseline rows: the frame rows grouped by recipe, each keeping its ``runs`` (one per
    trained weights, the newest of each), ``value`` the mean over them, the first run's
    setting as the row's (runs sorted by training seed, then time)."""
    groups: dict[tuple, dict[object, dict]] = {}
    for r in sorted(rows, key=lambda r: str(r.get("time"))):
        groups.setdefault(_recipe_group(r), {})[r["setting"]["hash"]] = r  # newest wins
    out = []
    for members in groups.values():
        runs = sorted(members.values(), key=lambda r: (seed_order(r), str(r.get("time"))))
        first = runs[0]
        row = {k: v for k, v in first.items() if k not in ("per_sample_correct", "n_test")}
        row["runs"] = [run_of(r) for r in runs]
        row["value"] = float(np.mean([r["value"] for r in runs]))
        row["per_sample_correct"], row["n_test"] = first.get("per_sample_correct"), first["n_test"]
        out.append(row)
    return out


def seed_order(r: dict) -> tuple:
    s = r.get("train_seed")
    return (s is None, s if s is not None else 0)


def write_baseline(results_dir: Path, out: Path, update: bool = False) -> int:
    """Write the baseline of ``results_dir`` to ``out``; refuses to replace a file unless
    ``update``. Returns the number of rows."""
    out = Path(out)
    if out.exists() and not update:
        raise UserError(f"{out} exists; add --update to replace it with the current records")
    rows = group_runs(frame_rows(Path(results_dir)))
    if not rows:
        raise UserError(f"no records in {Path(results_dir) / 'records'}: nothing to write")
    doc = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(results_dir),
        "rows": sorted(rows, key=lambda r: tuple(str(x) for x in row_key(r))),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return len(rows)


def read_baseline(path: Path) -> list[dict]:
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise UserError(
            f"baseline {path} does not exist; write one with `ssl-eval baseline`"
        ) from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(
            f"baseline {path} is not a readable JSON baseline ({e.__class__.__name__}); rewrite it with `ssl-eval baseline --update`"
        ) from e
    if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT:
        raise UserError(f"{path} is not an ssl-eval baseline (no format {BASELINE_FORMAT!r})")
    if doc.get("version") not in (1, BASELINE_VERSION):
        raise UserError(
            f"baseline {path} has version {doc.get('version')!r}; this ssl-eval reads 1 and {BASELINE_VERSION}"
        )
    rows = doc.get("rows")
    need = {*KEY, "value", "setting"}
    if not isinstance(rows, list) or not all(_row_ok(r, need) for r in rows):
        raise UserError(
            f"baseline {path}: every row needs {sorted(need)} (and a list of runs, each with a "
            "value and a setting_hash); rewrite it with `ssl-eval baseline --update`"
        )
    for r in rows:
        if "runs" not in r:  # version 1: one run per row
            r["runs"] = [run_of(r)]
    return rows


def _row_ok(r, need) -> bool:
    if not isinstance(r, dict) or not need <= set(r):
        return False
    if not isinstance(r["setting"], dict) or "hash" not in r["setting"]:
        return False
    runs = r.get("runs", [])
    return (
        isinstance(runs, list)
        and all(
            isinstance(x, dict)
            and isinstance(x.get("value"), int | float)
            and not isinstance(x.get("value"), bool)
            and "setting_hash" in x
            for x in runs
        )
        and (("runs" not in r) or len(runs) > 0)
    )
