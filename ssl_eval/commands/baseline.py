"""``ssl-eval baseline``: write (or, with --update, replace) a baseline from the records."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import add_results_dir

NAME = "baseline"
HELP = "write a regression baseline from the records (replace one only with --update)"
ORDER = 46


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="the baseline file to write")
    p.add_argument("--update", action="store_true", help="replace an existing baseline file")
    add_results_dir(p)


def run(a: argparse.Namespace) -> int:
    from ..report.baseline import write_baseline

    n = write_baseline(a.results_dir, a.out, a.update)
    print(f"wrote {a.out}: {n} row(s) from {a.results_dir}")
    return 0
