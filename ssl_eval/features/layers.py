"""The columns of a multi-layer feature row (feature kind ``layers:N``) and the heads that read
subsets of it.

A ``layers:N`` cache entry holds, per image, for each of the backbone's last N blocks (oldest
first) its class token and the mean of its patch tokens after the final norm: ``N`` pairs
``[cls_b, patchmean_b]`` of width D each (``backbones/base._per_block``). It is extracted once
per (backbone, data, N) and every head that needs a subset reads it: DINOv2's linear input for
(n last blocks, avgpool) is the class tokens of the last n blocks, then the patch mean of the
last block (``create_linear_input`` in dinov2/eval/linear.py), so it is a choice of columns.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import UserError

POOLINGS = ("cls", "patch_mean")  # per block, in this order


def layers_kind(n: int) -> str:
    return f"layers:{n}"


def layers_of(kind: str) -> int | None:
    """N of a ``layers:N`` kind, else None."""
    head, _, rest = kind.partition(":")
    return int(rest) if head == "layers" and rest.isdigit() else None


def layout(kind: str) -> dict | None:
    """What a ``layers:N`` row holds, for the feature cache key and the record: the blocks
    (negative indices, -1 the last), the poolings per block, whether the final norm was
    applied. None for the single-layer kinds (their keys stay as they were)."""
    n = layers_of(kind)
    if n is None:
        return None
    return {"blocks": list(range(-n, 0)), "poolings": list(POOLINGS), "final_norm": True}


def block_dim(width: int, n_cached: int) -> int:
    """D of one token from the width of a ``layers:N`` row (2 x N x D)."""
    if width % (2 * n_cached):
        raise UserError(
            f"a layers:{n_cached} feature row has {width} values, not a multiple of "
            f"2 x {n_cached}; the cache entry is not a multi-layer one: rerun with --force"
        )
    return width // (2 * n_cached)


def head_columns(n_cached: int, dim: int, n_last: int, avgpool: bool) -> np.ndarray:
    """The columns of a ``layers:n_cached`` row that DINOv2's ``create_linear_input(x, n_last,
    avgpool)`` concatenates, in its order: the class tokens of the last ``n_last`` blocks
    (oldest first), then, with ``avgpool``, the patch mean of the last block."""
    if not 1 <= n_last <= n_cached:
        raise UserError(f"n_last_blocks {n_last} is outside 1..{n_cached} (the blocks cached)")
    cols = [np.arange(2 * b * dim, (2 * b + 1) * dim) for b in range(n_cached - n_last, n_cached)]
    if avgpool:
        last = n_cached - 1
        cols.append(np.arange((2 * last + 1) * dim, (2 * last + 2) * dim))
    return np.concatenate(cols)
