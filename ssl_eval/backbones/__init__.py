"""Backbones: a registry of tagged names, each with preprocessing, feature kind and weights."""

from .base import Backbone, BackboneSpec, BuildOptions, WeightsInfo  # noqa: F401
from .registry import BACKBONES, build_backbone, list_backbones  # noqa: F401
