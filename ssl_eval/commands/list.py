"""``ssl-eval list``: backbones, datasets and protocols."""

from __future__ import annotations

import argparse

from ._args import add_results_dir

NAME = "list"
HELP = "list backbones, datasets or protocols"
ORDER = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what", nargs="?", default="all", choices=["backbones", "datasets", "protocols", "all"]
    )
    add_results_dir(p)


def run(a: argparse.Namespace) -> int:
    what = a.what
    if what in ("backbones", "all"):
        from ..backbones import list_backbones

        print("backbones (name, weights, description):")
        for name, status, desc in list_backbones():
            print(f"  {name:28s} {status:34s} {desc}")
    if what in ("datasets", "all"):
        from ..data.datasets import DATASETS, DEFAULT_DATASET

        print("datasets:")
        for e in DATASETS.entries():
            mark = " (default)" if e.name == DEFAULT_DATASET else ""
            print(f"  {e.name:28s} {e.obj.description}{mark}")
        for e in DATASETS.prefixes():
            print(f"  {e.name + ':<...>':28s} {e.help}")
        from ..data.transfer import COLLECTIONS

        for name, members in COLLECTIONS.items():
            print(f"  {name:28s} collection: {', '.join(members)}")
    if what in ("protocols", "all"):
        from ..protocols.cards import load_card, shipped_cards

        print("protocols (shipped cards):")
        for name in shipped_cards():
            c = load_card(name)
            print(f"  {name:28s} type={c.type} version={c.version}")
    return 0
