"""``ssl-eval suites``: the shipped protocol collections (``run --suite NAME``)."""

from __future__ import annotations

import argparse

NAME = "suites"
HELP = "show the shipped protocol collections (run --suite NAME)"
ORDER = 70


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?")


def run(a: argparse.Namespace) -> int:
    from ..protocols.cards import load_suite, shipped_suites

    for name in [a.name] if a.name else shipped_suites():
        s = load_suite(name)
        print(
            f"{s.name}: {', '.join(s.protocols)}"
            + (f"  - {s.description}" if s.description else "")
        )
    return 0
