"""Users' own backbones, without editing ssl-eval.

Two ways in, both built, cached and recorded like a built-in backbone:
  * ``--backbone py:package.module:factory``
  * an entry point in the ``ssl_eval.backbones`` group (``name = "package.module:factory"``),
    listed by ``ssl-eval list backbones`` under its name.

The factory is called with keyword arguments it accepts among ``weights`` (a Path or None)
and ``image_size`` and returns either a ``ssl_eval.backbones.Backbone`` or a plain
``torch.nn.Module`` mapping a normalised (N, 3, H, W) batch to (N, D) features (ImageNet
mean/std at native resolution is then assumed, and recorded).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable

from torch import nn

from ..core.errors import UserError
from ..core.files import sha256_json
from ..core.provenance import module_sources
from ..data.transforms import Preprocessing
from .architecture import describe
from .base import Backbone, BackboneSpec, BuildOptions, WeightsInfo, state_dict_sha256
from .registry import BACKBONES

ENTRY_POINT_GROUP = "ssl_eval.backbones"


def _import_factory(target: str) -> Callable:
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"plugin {target!r} must look like package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"cannot import {module_name!r} for backbone plugin ({e}); is it installed?"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UserError(f"{module_name} has no callable {attr!r}")
    return factory


def _call_factory(tag: str, factory: Callable, opt: BuildOptions) -> Backbone:
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "weights" in params:
        kwargs["weights"] = opt.weights
    elif opt.weights is not None:
        raise UserError(f"backbone {tag!r} takes no --weights")
    if "image_size" in params:
        kwargs["image_size"] = opt.image_size
    out = factory(**kwargs)
    if isinstance(out, Backbone):
        if opt.feature_kind:
            out = Backbone(
                out.tag,
                out.model,
                out.preprocessing,
                opt.feature_kind,
                out.weights,
                out.load_report,
                out.description,
            )
        return _with_source(out, factory)
    if isinstance(out, nn.Module):
        pre = Preprocessing()
        if opt.image_size:
            pre = pre.with_size(opt.image_size)
        bb = Backbone(
            tag,
            out,
            pre,
            opt.feature_kind or "model",
            WeightsInfo("plugin", ""),
            {"format": "plugin"},
            f"plugin {tag}",
        )
        return _with_source(bb, factory)
    raise UserError(
        f"backbone plugin {tag!r} returned {type(out).__name__}, not a Backbone or nn.Module"
    )


def _with_source(bb: Backbone, factory: Callable) -> Backbone:
    """A plugin's identity is its parameters AND its code: a parameter-free module whose
    ``forward`` changed must not serve the old features. The source files of the factory and
    of the model's classes are hashed into the weights' sha256 and listed in the load report."""
    if "architecture" not in bb.load_report:
        bb.load_report = {
            **bb.load_report,
            "architecture": {**describe(bb.model), "from": "plugin"},
        }
    if bb.weights.source != "plugin":  # the plugin named a weights file: that is its identity
        return bb
    sources = module_sources(factory, type(bb.model))
    params = state_dict_sha256(bb.model)
    bb.weights = WeightsInfo("plugin", sha256_json({"parameters": params, "sources": sources}))
    bb.load_report = {**bb.load_report, "parameters_sha256": params, "plugin_sources": sources}
    return bb


def plugin_spec(name: str, target: str) -> BackboneSpec:
    return BackboneSpec(
        name,
        lambda opt: _call_factory(name, _import_factory(target), opt),
        lambda: "plugin",
        f"plugin {target}",
    )


def register_entry_points() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in BACKBONES:
            BACKBONES.register(ep.name, plugin_spec(ep.name, ep.value))


BACKBONES.register_prefix(
    "py",
    lambda target: plugin_spec(f"py:{target}", target),
    "py:package.module:factory, your own backbone",
)
