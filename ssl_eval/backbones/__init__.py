"""Backbones: a registry of tagged names, each with preprocessing, feature kind and weights."""

from .base import Backbone, BackboneSpec, BuildOptions, WeightsInfo  # noqa: F401
from .catalog import build_backbone, get_spec, list_backbones  # noqa: F401
from .registry import BACKBONES  # noqa: F401
