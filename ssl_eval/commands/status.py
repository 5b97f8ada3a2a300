"""``ssl-eval status``: each planned unit of the sweeps in a results folder as done, running,
pending or failed, with counts."""

from __future__ import annotations

import argparse

from ._args import add_results_dir

NAME = "status"
HELP = "show which units of the sweeps in a results folder are done, running, pending or failed"
ORDER = 12


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_results_dir(p)
    p.add_argument("--sweep", help="only this sweep (its id, as `run --executor` printed it)")


def run(a: argparse.Namespace) -> int:
    from ..orchestrate.sweep import sweep_status
    from ..orchestrate.sweep.status import format_counts, format_table

    states = sweep_status(a.results_dir, a.sweep)
    print(format_table(states))
    print(format_counts(states))
    return 0
