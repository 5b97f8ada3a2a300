"""Process-level helpers every layer shares: the one logger (stderr, so stdout stays the
command's answer), device resolution and seeding."""

from __future__ import annotations

import random
import sys
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch


def log(msg: str, scope: str = "") -> None:
    """One progress line on stderr; ``scope`` (``train``, ``cache`` ...) prefixes it."""
    print(f"[{scope}] {msg}" if scope else msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` (a CUDA GPU when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(
            f"--device {name!r} is not a device torch knows (use auto, cpu, cuda)"
        ) from e


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
