"""Datasets, preprocessing and splits."""

from . import imagenet as _imagenet  # noqa: F401  (registers imagenet, imagenet-robust)
from . import transfer as _transfer  # noqa: F401  (registers the transfer datasets in DATASETS)
