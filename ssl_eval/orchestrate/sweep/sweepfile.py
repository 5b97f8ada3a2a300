"""``<results>/sweeps/<id>.json``: a sweep's planned units and every job submitted for them.

The id is a hash of the planned unit keys, so the same command run again (to resume after a
failure) finds its sweep and appends its new jobs; another configuration gets another file.
Each update is a read-modify-write under the file's lock, written atomically."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ...core.errors import UserError
from ...core.files import atomic_write_json, file_lock, lock_path, sha256_json
from ...records.store import utc_now

SWEEP_VERSION = 1


def sweeps_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "sweeps"


def sweep_id(unit_keys: Iterable[str]) -> str:
    return sha256_json(sorted(unit_keys))[:12]


def sweep_path(results_dir: Path, sid: str) -> Path:
    return sweeps_dir(results_dir) / f"{sid}.json"


def read_sweep(path: Path) -> dict:
    """A sweep file, checked for the fields status reads; a damaged one is a one-line UserError."""
    try:
        doc = json.loads(Path(path).read_text())
        if not isinstance(doc, dict) or doc.get("version") != SWEEP_VERSION:
            raise ValueError(f"not a version-{SWEEP_VERSION} sweep file")
        for u in doc["units"]:
            for k in ("key", "backbone", "dataset", "protocol", "seed"):
                u[k]  # noqa: B018 (present)
        for j in doc["jobs"]:
            for k in ("job_id", "executor", "submitted", "folder", "units"):
                j[k]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"the sweep file {path} is damaged ({e}); remove it and rerun the sweep's command "
            "(finished units are kept in the records)"
        ) from e
    return doc


def record_jobs(results_dir: Path, sid: str, units: list[dict], config: dict, jobs: list[dict]):
    """Append ``jobs`` to sweep ``sid`` (created with its ``units`` and ``config`` if new)."""
    path = sweep_path(results_dir, sid)
    with file_lock(lock_path(path), f"sweep file {path}"):
        if path.exists():
            doc = read_sweep(path)
        else:
            doc = {
                "version": SWEEP_VERSION,
                "sweep": sid,
                "created": utc_now(),
                "config": config,
                "units": units,
                "jobs": [],
            }
        doc["jobs"] += jobs
        atomic_write_json(path, doc)


def load_sweeps(results_dir: Path) -> list[dict]:
    folder = sweeps_dir(results_dir)
    return [read_sweep(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
