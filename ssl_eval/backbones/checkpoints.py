"""Safe checkpoint reading and strict loading with a report.

Only safetensors or ``torch.load(weights_only=True)``: a pickle that would run code is
refused. A load succeeds only when every model key is filled and the only extra keys are
known heads or projectors; the report says what was kept, dropped, missing and unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError, one_line

# Top-level containers that official checkpoints wrap their state dict in.
_CONTAINERS = ("state_dict", "model", "model_state", "module", "net")

# Plain-data classes some training scripts pickle beside the weights (DINO and MAE save their
# argparse Namespace). Rebuilding one only sets attributes: no code of the file's choosing runs.
SAFE_EXTRA_GLOBALS = (argparse.Namespace,)


def _corrupt(path: Path, e: BaseException) -> UserError:
    return UserError(
        f"weights file {path} is corrupt or truncated ({type(e).__name__}: {one_line(e)}); "
        "download it again"
    )


def _safe_globals():
    ctx = getattr(torch.serialization, "safe_globals", None)
    if ctx is not None:
        return ctx(list(SAFE_EXTRA_GLOBALS))
    torch.serialization.add_safe_globals(list(SAFE_EXTRA_GLOBALS))  # torch 2.4
    return contextlib.nullcontext()


def load_object(path: Path) -> object:
    """Read a weights file without running code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError, ValueError ...
            raise _corrupt(path, e) from e
    try:
        with _safe_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
        # code can run only through a global the unpickler refused to import; torch has worded that
        # refusal in several ways ("Unsupported global", "Unsupported class", "not an allowed global").
        # An unknown opcode ("Unsupported operand") is damage, not code.
        refused = any(
            w in msg for w in ("Unsupported global", "Unsupported class", "not an allowed global")
        )
        if found or refused:
            what = found.group(1) if found else "an object that is not a tensor"
            raise UserError(
                f"refusing to load {path}: it is a pickle that would import or run code "
                f"(it asks for {what}). ssl-eval only reads tensors and plain containers; re-save "
                "the weights with torch.save(model.state_dict(), ...) or as safetensors"
            ) from e
        raise _corrupt(path, e) from e
    except Exception as e:  # truncated zip, bad magic, short reads ...
        raise _corrupt(path, e) from e


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file safely. Returns (flat tensor dict, detected container)."""
    return unwrap(load_object(path), path)


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
            return {k[len(p) :]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------- nested checkpoints


@dataclass
class Checkpoint:
    """A safely read weights file with every tensor under one dotted name: containers are
    flattened, so ``{"teacher": {"backbone.x": t}}`` holds ``teacher.backbone.x``. ``meta``
    keeps what the file says about itself beside the tensors: top-level plain values (MoCo
    v3's ``"arch": "vit_small"``) and pickled argparse Namespaces as dicts of their plain
    values (DINO's and MAE's ``args``)."""

    path: Path
    flat: dict[str, torch.Tensor]
    top: list[str] = field(default_factory=list)
    meta: dict[str, object] = field(default_factory=dict)

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix`` (e.g. 'state_dict.module.'), with it removed."""
        n = len(prefix)
        return {k[n:]: v for k, v in self.flat.items() if k.startswith(prefix)}

    def has(self, *keys: str) -> bool:
        return all(k in self.flat for k in keys)

    def any_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.flat)

    def first_prefix(self, key: str, prefixes: Iterable[str]) -> str | None:
        """The first prefix p for which ``p + key`` is a tensor in the file."""
        return next((p for p in prefixes if p + key in self.flat), None)


def _flatten(obj: Mapping, prefix: str, out: dict[str, torch.Tensor]) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif isinstance(v, Mapping):
            _flatten(v, name + ".", out)


_PLAIN = (str, int, float, bool, type(None))


def _meta(obj: Mapping) -> dict[str, object]:
    """Top-level plain values, and Namespaces as dicts of their plain values."""
    out: dict[str, object] = {}
    for k, v in obj.items():
        if isinstance(v, argparse.Namespace):
            out[str(k)] = {a: x for a, x in vars(v).items() if isinstance(x, _PLAIN)}
        elif isinstance(v, _PLAIN):
            out[str(k)] = v
    return out


def read_checkpoint(path: Path) -> Checkpoint:
    """Read any weights file safely into a :class:`Checkpoint`."""
    obj = load_object(path)
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict or a dict of them")
    flat: dict[str, torch.Tensor] = {}
    _flatten(obj, "", flat)
    if not flat:
        raise UserError(f"{path} holds no tensors (top-level keys: {list(obj)[:8]})")
    return Checkpoint(Path(path), flat, [str(k) for k in obj], _meta(obj))


def summarise_keys(keys: Iterable[str], limit: int = 16) -> list[str]:
    """Short list for a report: the keys themselves when few, else 'a.b.* (n keys)' groups at
    the finest depth that keeps at most ``limit`` groups."""
    keys = sorted(set(keys))
    if len(keys) <= limit:
        return keys
    best: dict[str, int] = {}
    for depth in range(1, max(k.count(".") for k in keys) + 2):
        groups: dict[str, int] = {}
        for k in keys:
            head = ".".join(k.split(".")[:depth])
            groups[head] = groups.get(head, 0) + 1
        if best and len(groups) > limit:
            break
        best = groups
    return [g if n == 1 and g in keys else f"{g}.* ({n} keys)" for g, n in sorted(best.items())]


def uninitialised(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` without its random initialisation, which costs seconds for big models and
    is wasted when a strict load overwrites every tensor. Built on the meta device and given
    empty CPU storage; BatchNorm step counters (which old files lack) start at zero. A module
    with non-persistent buffers (computed at construction, never loaded) is built normally."""
    with torch.device("meta"):
        model = factory()
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return factory()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("num_batches_tracked"):
                buf.zero_()
    return model


# Buffers that only count training steps: checkpoints saved before PyTorch 0.4.1 lack them and
# evaluation never reads them, so a missing one keeps its initial value and is reported.
DEFAULTABLE = (r"(^|.*\.)num_batches_tracked$",)


def strict_load(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    droppable: Iterable[str] = (),
    fmt: str = "",
    defaultable: Iterable[str] = DEFAULTABLE,
) -> dict:
    """Load ``sd`` into ``model``; allow only keys matching ``droppable`` (regexes for heads and
    projectors) to be unexpected, and only ``defaultable`` buffers (BatchNorm step counters)
    to be missing. Any other missing key, any other unexpected key or a shape mismatch is an
    error that lists the offenders. Returns the load report."""
    patterns = [re.compile(p) for p in droppable]
    optional = [re.compile(p) for p in defaultable]
    own = model.state_dict()
    dropped = sorted(k for k in sd if k not in own and any(p.match(k) for p in patterns))
    unexpected = sorted(k for k in sd if k not in own and k not in dropped)
    absent = [k for k in own if k not in sd]
    defaulted = sorted(k for k in absent if any(p.match(k) for p in optional))
    missing = sorted(k for k in absent if k not in defaulted)
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
    model.load_state_dict({k: sd.get(k, own[k]) for k in own}, strict=True)
    report = {
        "format": fmt,
        "kept": len(own) - len(defaulted),
        "dropped": dropped,
        "missing": missing,
        "unexpected": unexpected,
    }
    if defaulted:
        leaves: dict[str, int] = {}
        for k in defaulted:
            leaf = k.rsplit(".", 1)[-1]
            leaves[leaf] = leaves.get(leaf, 0) + 1
        report["defaulted"] = [
            f"*.{leaf} ({n} keys, absent from the file)" for leaf, n in leaves.items()
        ]
    return report
