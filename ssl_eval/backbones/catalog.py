"""Every backbone by name: finds and imports the modules in ``families/`` (each registers on
import; no hand-kept list), then users' backbones from the ``ssl_eval.backbones`` entry-point
group, and builds a backbone from its name."""

from __future__ import annotations

import importlib
import pkgutil
import re

from . import families
from .base import Backbone, BackboneSpec, BuildOptions
from .registry import BACKBONES

_loaded: list[str] | None = None


def family_modules() -> list[str]:
    """The full names of the modules in ``families/``, in file-name order."""
    found = pkgutil.iter_modules(families.__path__, prefix=families.__name__ + ".")
    return [m.name for m in found if not m.name.rpartition(".")[2].startswith("_")]


def _ensure_loaded() -> list[str]:
    """Import every family module once; returns their names."""
    global _loaded
    if _loaded is not None:
        return _loaded
    _loaded = []  # set first: a family that looks a name up while loading must not recurse
    for name in family_modules():
        importlib.import_module(name)
        _loaded.append(name)
    # after the families, so that py: lists after the built-in prefixes and an entry point
    # never takes a built-in name
    from .plugins import register_entry_points

    register_entry_points()
    return _loaded


def get_spec(name: str) -> BackboneSpec:
    _ensure_loaded()
    return BACKBONES.get(name)


_LABEL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.+-]{0,63})=(.+)$")


def split_label(name: str) -> tuple[str | None, str]:
    """``LABEL=SPEC`` -> (LABEL, SPEC); a plain name -> (None, name). A label names a backbone
    in tables (``simclr=ckpt:runs/simclr``); the spec it stands for is recorded in its load
    report, and its weights' sha256 in the setting, so a label never hides what was loaded."""
    m = _LABEL.match(name)
    if m is None or ":" in m.group(1):
        return None, name
    return m.group(1), m.group(2)


def build_backbone(name: str, options: BuildOptions | None = None) -> Backbone:
    """Build the backbone called ``name`` (or ``LABEL=NAME``) with its weights, in eval mode,
    on the CPU."""
    label, name = split_label(name)
    spec = get_spec(name)
    backbone = spec.build(options or BuildOptions())
    backbone.tag = label or spec.name
    if label is not None:
        backbone.load_report = {**backbone.load_report, "labelled": spec.name}
    backbone.model.eval()
    return backbone


def list_backbones() -> list[tuple[str, str, str]]:
    """(name, weights status, description) for every registered backbone and family."""
    _ensure_loaded()
    rows = [(e.name, e.obj.status(), e.obj.description) for e in BACKBONES.entries()]
    rows += [(f"{e.name}:<...>", "-", e.help) for e in BACKBONES.prefixes()]
    return rows
