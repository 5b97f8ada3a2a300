"""The result record schema, atomic writing and reading the store.

One record per (backbone, dataset, protocol, metric). Each evaluation unit (backbone x dataset
x protocol) writes one JSON file ``<results>/records/<unit>-<run_id>.json`` in one rename, so
concurrent runs never collide and a killed run leaves either the whole file or nothing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import platform
import secrets
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from . import __version__
from .fsutil import atomic_write_json

SCHEMA_VERSION = 1


@dataclass
class ResultRecord:
    schema_version: int
    run_id: str
    time: str
    unit: str
    backbone: str
    weights: dict
    load_report: dict
    preprocessing: dict
    feature_kind: str
    protocol: dict  # the card: name, version, type, params, overrides, source
    dataset: dict  # name, fingerprint, num_classes, sizes {train, val, test}
    split: dict  # val_fraction, split_seed
    metric: str
    value: float
    seed: int
    wall_time_s: float
    peak_memory_mb: float
    device: str
    packages: dict
    code_version: str
    ci95: list[float] | None = None  # 95% interval of ``value``
    ci_method: str = ""  # "bootstrap-test" (resampling test images) or "t-seeds" / "t-episodes"
    spread: dict | None = None  # mean/std/n over seeds or episodes where the protocol ran several
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@lru_cache(maxsize=1)
def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "ssl_eval": __version__}
    for name in ("torch", "torchvision", "timm", "numpy", "scikit-learn", "faiss-cpu", "faiss-gpu-cu12"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the ssl-eval source (with '+dirty' if modified), else the version."""
    here = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0 and (here / ".git").exists():
            dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "ssl_eval", "protocols"],
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return f"{__version__}+g{rev.stdout.strip()}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def peak_memory_mb(device_type: str) -> float:
    """Peak resident memory of this process (MB), or peak GPU memory when on a GPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20
    except ImportError:  # Windows
        return float("nan")


def records_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "records"


def unit_done(results_dir: Path, unit: str) -> bool:
    return any(records_dir(results_dir).glob(f"{unit}-*.json"))


def write_unit(results_dir: Path, unit: str, run_id: str, records: list[ResultRecord]) -> Path:
    path = records_dir(results_dir) / f"{unit}-{run_id}.json"
    atomic_write_json(path, {"schema_version": SCHEMA_VERSION, "records": [r.to_dict() for r in records]})
    return path


def load_records(results_dir: Path) -> list[dict]:
    """Every record under ``results_dir``; files that are not valid records are skipped with a
    warning (they can only come from outside ssl-eval, since writes are atomic)."""
    out = []
    for p in sorted(records_dir(results_dir).glob("*.json")):
        try:
            data = json.loads(p.read_text())
            out.extend(data["records"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            print(f"warning: skipping unreadable record file {p} ({e})", file=sys.stderr)
    return out
