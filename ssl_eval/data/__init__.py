"""Datasets, preprocessing and splits."""

from . import dense as dense  # noqa: E402  registers the dense datasets
