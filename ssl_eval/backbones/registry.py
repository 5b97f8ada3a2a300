"""The backbone registry object, at the bottom of backbones/: the modules in ``families/``
register into it on import, ``catalog.py`` finds those modules and builds from it. It imports
no family, so the dependency runs one way (catalog -> families -> registry)."""

from __future__ import annotations

from ..core.registry import Registry
from .base import BackboneSpec

BACKBONES: Registry[BackboneSpec] = Registry("backbone", listing="ssl-eval list backbones")
