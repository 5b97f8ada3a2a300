"""One file per SSL method; importing this package imports every module in it (found on disk,
no hand-kept list), and each registers its method in ``METHODS``."""

import importlib
import pkgutil

from .base import METHODS, MethodSpec, SSLMethod

for _m in pkgutil.iter_modules(__path__, prefix=__name__ + "."):
    if _m.name.rpartition(".")[2] not in ("base",) and not _m.name.rpartition(".")[2].startswith(
        "_"
    ):
        importlib.import_module(_m.name)

__all__ = ["METHODS", "MethodSpec", "SSLMethod"]
