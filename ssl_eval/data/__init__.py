"""Datasets, preprocessing and splits."""

from . import dense as dense  # noqa: E402  registers the dense datasets
from . import imagenet as _imagenet  # noqa: F401  (registers imagenet, imagenet-robust)
from . import transfer as _transfer  # noqa: F401  (registers the transfer datasets in DATASETS)
