"""Datasets, preprocessing and splits."""

from . import transfer as _transfer  # noqa: F401  (registers the transfer datasets in DATASETS)
