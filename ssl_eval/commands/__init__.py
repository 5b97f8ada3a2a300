"""The ``ssl-eval`` subcommands: one module per command, found by ``pkgutil``.

Each module defines ``NAME``, ``HELP``, ``ORDER`` (its place in ``--help``),
``add_arguments(parser)`` and ``run(args) -> int``. argparse lives only in these modules and
in ``ssl_eval/cli.py``: a command turns its Namespace into a config and calls the library; no
Namespace travels further. Adding a command is adding a module here; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def discover() -> list[ModuleType]:
    mods = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for attr in ("NAME", "HELP", "add_arguments", "run"):
            if not hasattr(mod, attr):
                raise RuntimeError(f"command module {mod.__name__} lacks {attr}")
        mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))
