"""One file per SSL method; importing this package registers them all in ``METHODS``."""

from . import barlowtwins, byol, dino, mae, mocov3, simclr, simsiam, swav  # noqa: F401
from .base import METHODS, MethodSpec, SSLMethod

__all__ = ["METHODS", "MethodSpec", "SSLMethod"]
