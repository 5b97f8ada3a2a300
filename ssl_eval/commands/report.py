"""``ssl-eval report``: the static HTML report (and report.md with its figures) of a results folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import add_results_dir

NAME = "report"
HELP = "write index.html and report.md (leaderboard, figures, diagnostics)"
ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_results_dir(p)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="feature cache for the t-SNE maps (default $SSL_EVAL_CACHE or ~/.cache/ssl-eval)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for index.html, report.md and its figures (default <results-dir>/report)",
    )
    p.add_argument(
        "--published",
        type=Path,
        default=None,
        help="published numbers to set our records against (default: the shipped "
        "protocols/published.yaml)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(a: argparse.Namespace) -> int:
    from ..core.errors import UserError
    from ..records.store import records_dir
    from ..report import write_report

    if not records_dir(a.results_dir).is_dir():
        raise UserError(
            f"no records under {a.results_dir}: run 'ssl-eval run' first or pass --results-dir"
        )
    index = write_report(
        a.results_dir,
        cache_dir=a.cache_dir,
        progress=not a.no_progress,
        out_dir=a.out,
        published=a.published,
    )
    print(f"wrote {index} and {index.parent / 'report.md'}")
    return 0
