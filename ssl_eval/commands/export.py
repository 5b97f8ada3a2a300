"""``ssl-eval export``: every record as one table (csv, parquet or jsonl)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import add_results_dir

NAME = "export"
HELP = "write every record as a table (one row per record file; settings and provenance as columns)"
ORDER = 47


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["csv", "parquet", "jsonl"], default="csv")
    p.add_argument("--out", type=Path, help="output file (default: <results-dir>/records.<format>)")
    add_results_dir(p)


def run(a: argparse.Namespace) -> int:
    import io

    from ..core.errors import UserError
    from ..core.files import atomic_write_bytes
    from ..records.frame import load_frame

    frame = load_frame(a.results_dir)
    out = a.out or Path(a.results_dir) / f"records.{a.format}"
    if a.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise UserError(
                "parquet export needs pyarrow: pip install pyarrow (or use --format csv|jsonl)"
            ) from e
        buf = io.BytesIO()
        _one_type_per_column(frame).to_parquet(buf, index=False)
        data = buf.getvalue()
    elif a.format == "csv":
        data = frame.to_csv(index=False).encode()
    else:
        data = frame.to_json(orient="records", lines=True).encode()
    atomic_write_bytes(out, data)
    print(f"wrote {out}: {len(frame)} row(s), {len(frame.columns)} column(s)")
    return 0


def _one_type_per_column(frame):
    """Parquet needs one type per column: a column mixing kinds (a number in one record, a
    text in another) keeps its text and numbers as their JSON text; missing stays missing."""
    import json

    out = frame.copy()
    for c in out.columns:
        if out[c].dtype != object:
            continue
        kinds = {type(v) for v in out[c] if v is not None and v == v}
        if len(kinds) > 1:
            out[c] = [
                v if v is None or v != v or isinstance(v, str) else json.dumps(v, default=str)
                for v in out[c]
            ]
    return out
