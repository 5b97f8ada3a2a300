"""Evaluation protocols on frozen features (k-NN, linear probe)."""

from . import fewshot, finetune, knn, linear  # noqa: F401,E402  (register themselves)
from .base import (  # noqa: F401
    PROTOCOL_TYPES,
    DataShape,
    ImageInputs,
    ProtocolInputs,
    ProtocolOutput,
    ProtocolType,
)
