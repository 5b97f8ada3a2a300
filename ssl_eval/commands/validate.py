"""``ssl-eval validate``: check every shipped card and suite, and given cards."""

from __future__ import annotations

import argparse

from ._args import add_results_dir

NAME = "validate"
HELP = "check every shipped protocol card and suite (and given cards)"
ORDER = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cards", nargs="*", help="extra card files to check")
    add_results_dir(p)


def run(a: argparse.Namespace) -> int:
    from ..protocols.cards import load_card, validate_all
    from ..protocols.published import load_published

    for line in validate_all():
        print(line)
    pub = load_published()  # the schema only: its cards may ship with a later ssl-eval
    print(f"published {pub.path}: ok ({len(pub.entries)} entries)")
    for path in a.cards or ():
        c = load_card(path)
        print(f"card  {path}: ok (type={c.type}, version={c.version})")
    return 0
