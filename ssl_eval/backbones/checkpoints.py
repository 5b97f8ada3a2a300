"""Safe checkpoint reading and strict loading with a report.

Only safetensors or ``torch.load(weights_only=True)``: a pickle that would run code is
refused. A load succeeds only when every model key is filled and the only extra keys are
known heads or projectors; the report says what was kept, dropped, missing and unexpected.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError

# Top-level containers that official checkpoints wrap their state dict in.
_CONTAINERS = ("state_dict", "model", "model_state", "module", "net")


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file safely. Returns (flat tensor dict, detected container)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), "safetensors"
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"weights file {path} is corrupt or truncated ({e}); download it again") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise UserError(
                f"refusing to load {path}: it is a pickle that would import or run code "
                f"({msg.splitlines()[0][:200]}). ssl-eval only reads plain tensors; re-save the "
                "state dict with torch.save(model.state_dict(), ...) or as safetensors"
            ) from e
        raise UserError(f"weights file {path} is corrupt or truncated ({e}); download it again") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"weights file {path} is corrupt or truncated ({e}); download it again") from e
    return unwrap(obj, path)


def unwrap(obj: object, path: Path | str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Find the tensor dict inside a checkpoint's container."""
    container = "flat"
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _CONTAINERS:
            if isinstance(obj.get(key), dict) and _is_tensor_dict(obj[key]):
                obj, container = obj[key], key
                break
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise UserError(
            f"{path} holds no state dict ssl-eval recognises (top-level keys: {keys}); "
            "pass a file with a flat state dict or one under 'state_dict' / 'model'"
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return sd, container


def _is_tensor_dict(d: dict) -> bool:
    vals = list(d.values())
    return bool(vals) and sum(isinstance(v, torch.Tensor) for v in vals) >= max(1, len(vals) // 2)


def strip_prefix(sd: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the first matching prefix from every key (e.g. 'module.' from DataParallel)."""
    prefixes = list(prefixes)
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def strict_load(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    droppable: Iterable[str] = (),
    fmt: str = "",
) -> dict:
    """Load ``sd`` into ``model``; allow only keys matching ``droppable`` (regexes for heads and
    projectors) to be unexpected. Any missing key, any other unexpected key or a shape
    mismatch is an error that lists the offenders. Returns the load report."""
    patterns = [re.compile(p) for p in droppable]
    own = model.state_dict()
    dropped = sorted(k for k in sd if k not in own and any(p.match(k) for p in patterns))
    unexpected = sorted(k for k in sd if k not in own and k not in dropped)
    missing = sorted(k for k in own if k not in sd)
    shape_bad = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} with the wrong shape (e.g. {shape_bad[:3]})")
        raise UserError(
            "checkpoint does not match the architecture: "
            + "; ".join(parts)
            + ". Check that --backbone names the right architecture for this file"
        )
    model.load_state_dict({k: sd[k] for k in own}, strict=True)
    return {
        "format": fmt,
        "kept": len(own),
        "dropped": dropped,
        "missing": missing,
        "unexpected": unexpected,
    }
