"""``ssl-eval leaderboard``: leaderboard.csv and leaderboard.md from the records."""

from __future__ import annotations

import argparse

from ._args import add_results_dir

NAME = "leaderboard"
HELP = "build leaderboard.csv and leaderboard.md from the records"
ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="top1")
    add_results_dir(p)


def run(a: argparse.Namespace) -> int:
    from ..report.leaderboard import write_leaderboard

    csv_path, md_path = write_leaderboard(a.results_dir, a.metric)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0
