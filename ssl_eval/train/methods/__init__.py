"""One file per SSL method; importing this package registers them all in ``METHODS``."""

from . import simclr  # noqa: F401
from .base import METHODS, MethodSpec, SSLMethod

__all__ = ["METHODS", "MethodSpec", "SSLMethod"]
