"""Evaluation protocols: one module per protocol type (k-NN, linear probe, few-shot, fine-tune),
each registering itself in ``PROTOCOL_TYPES`` on import. The modules are found on disk (no
hand-kept list); ``cards.py`` reads the YAML cards that name them, ``published.py`` the
published numbers those cards reproduce. The exact k-NN search they and the trainer's monitor
share is the ``search`` subpackage."""

import importlib
import pkgutil

from .base import (  # noqa: F401
    PROTOCOL_TYPES,
    DataShape,
    ImageInputs,
    ProtocolInputs,
    ProtocolOutput,
    ProtocolType,
)

for _m in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
    _short = _m.name.rpartition(".")[2]
    if not _m.ispkg and _short not in ("base", "cards", "published") and not _short.startswith("_"):
        importlib.import_module(_m.name)
