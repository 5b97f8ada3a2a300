"""The backbone registry. Built-in families register on import; users' backbones come from
the ``ssl_eval.backbones`` entry-point group or ``py:package.module:factory``."""

from __future__ import annotations

from ..registry import Registry
from .base import Backbone, BackboneSpec, BuildOptions

BACKBONES: Registry[BackboneSpec] = Registry("backbone")
_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    # each module registers its family, tags or prefix on import
    from . import (  # noqa: F401
        builtin,
        cifar,
        dino,
        dinov2,
        dinov3,
        families,
        mae,
        mocov3,
        plugins,
        simclr,
        supervised,
    )

    plugins.register_entry_points()


def get_spec(name: str) -> BackboneSpec:
    _ensure_loaded()
    return BACKBONES.get(name)


def build_backbone(name: str, options: BuildOptions | None = None) -> Backbone:
    """Build the backbone called ``name`` with its weights, in eval mode, on the CPU."""
    spec = get_spec(name)
    backbone = spec.build(options or BuildOptions())
    backbone.tag = spec.name
    backbone.model.eval()
    return backbone


def list_backbones() -> list[tuple[str, str, str]]:
    """(name, weights status, description) for every registered backbone and family."""
    _ensure_loaded()
    rows = [(e.name, e.obj.status(), e.obj.description) for e in BACKBONES.entries()]
    rows += [(f"{e.name}:<...>", "-", e.help) for e in BACKBONES.prefixes()]
    return rows
