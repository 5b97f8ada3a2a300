"""The results store: each evaluation unit (backbone x dataset x protocol x seed) writes one JSON
file ``<results>/records/<unit>-<run_id>.json`` in one rename (``write_unit``), so concurrent
runs never collide and a killed run leaves either the whole file or nothing; readers get typed,
checksum-verified records (``read_unit_file``, ``load_records``) and never crash on the store.
The pandas view of a store is ``records.frame``."""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import sys
from pathlib import Path

from ..core.errors import UserError
from ..core.files import _umask, atomic_write_json, sha256_json
from ..core.runtime import warn
from .schema import SCHEMA_VERSION, ResultRecord


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def records_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "records"


def unit_done(results_dir: Path, unit: str) -> bool:
    """Whether a valid record file of ``unit`` exists; a damaged one is reported and does not
    count, so the unit is computed again."""
    for p in records_dir(results_dir).glob(f"{unit}-*.json"):
        try:
            read_unit_file(p)
            return True
        except ValueError as e:
            warn(f"{p} is damaged ({e}); its unit counts as not done and will be computed again")
    return False


def write_unit(results_dir: Path, unit: str, run_id: str, records: list[ResultRecord]) -> Path:
    path = records_dir(results_dir) / f"{unit}-{run_id}.json"
    body = [r.to_dict() for r in records]
    doc = {"schema_version": SCHEMA_VERSION, "records": body, "sha256": sha256_json(body)}
    try:
        atomic_write_json(path, doc)
    except OSError as e:  # the numbers are computed: never drop them silently
        import tempfile

        try:
            fd, rescue = tempfile.mkstemp(prefix=f"ssl-eval-unsaved-{unit}-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o666 & ~_umask())  # a record once copied back: the umask's mode
                json.dump(doc, f, indent=2, sort_keys=True, default=str)
        except OSError:  # no disk anywhere: the numbers go to the terminal
            print(json.dumps(doc, sort_keys=True, default=str), file=sys.stderr)
            rescue = "the lines above (standard error)"
        raise UserError(
            f"cannot write the record {path} ({e.strerror or e}); its numbers are saved in {rescue}: "
            f"copy that file into {records_dir(results_dir)} once the folder is writable"
        ) from e
    return path


def read_unit_file(path: Path) -> list[ResultRecord]:
    """The records of one file, verified against the checksum it carries; any damage (bytes
    that are not UTF-8 or JSON, a wrong shape, a checksum mismatch, a newer schema) is a
    ValueError saying what."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError:  # [[[[... deeper than the decoder's recursion
        raise ValueError("not a record file (JSON nested too deeply)") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError("not a record file (expected a mapping with a 'records' list)")
    if "sha256" in data and data["sha256"] != sha256_json(data["records"]):
        raise ValueError("its content does not match its checksum")
    return [ResultRecord.from_dict(r) for r in data["records"]]


def load_records(results_dir: Path) -> list[ResultRecord]:
    """Every record under ``results_dir``, typed and verified. A file that is not a valid record
    file is skipped with a warning naming it; readers never crash on the store."""
    out = []
    for p in sorted(records_dir(results_dir).glob("*.json")):
        try:
            out.extend(read_unit_file(p))
        except ValueError as e:
            warn(f"skipping {p}: {e}")
    return out
