"""The augmented probe's grid over layers and poolings: DINOv2's and DINOv3's linear heads on
the last blocks of a frozen ViT, trained on augmented crops from one backbone forward a batch.

The official scripts (facebookresearch/dinov2 dinov2/eval/linear.py, facebookresearch/dinov3
dinov3/eval/linear.py) build one classifier per ``for n in n_last_blocks_list: for avgpool in
...: for lr in learning_rates``, each reading ``create_linear_input(x, n, avgpool)`` of the
tokens ``get_intermediate_layers(max n, return_class_token=True)`` gives once per batch: the
class tokens of the last n blocks (oldest first), then, with avgpool, the mean patch token of
the last block. Here the forward reads the backbone's ``layers:N`` feature kind (the rows of
the cached multi-layer features, ``features/layers.py``: per block its class token and patch
mean, after the final norm) online, keeps the columns some head reads, and every (n, avgpool)
group of heads trains on its own columns of that row, in the script's order.

DINO's eval_linear.py (facebookresearch/dino, linear@dino-vitb) lays the same values out
otherwise: its class tokens of the last n blocks come out of ``get_intermediate_layers(n)``
(each block through the final norm) oldest first, and with ``--avgpool_patchtokens`` it pairs
that class token with the last block's mean patch token value by value, ``[cls_0, patch_0,
cls_1, patch_1, ...]`` (a (B, D, 2) stack flattened; n must be 1, the script's shapes fail
otherwise): ``avgpool_layout: interleave`` reads those columns in that order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..backbones.tokens import block_reader
from ..core.errors import UserError
from ..features.layers import block_dim, head_columns, layers_kind, layout
from ._linear_grid import cosine_lr

AVGPOOL_LAYOUTS = {
    "concat": "class tokens, then the last block's patch mean (DINOv2's create_linear_input)",
    "interleave": "one block's class token and patch mean alternating (DINO's eval_linear.py)",
}


def check_layout(layout_name: str, n_last_blocks, avgpool) -> None:
    """One-line refusals of an avgpool layout the grid cannot take."""
    if layout_name not in AVGPOOL_LAYOUTS:
        raise UserError(
            f"linear_aug: avgpool_layout is one of {list(AVGPOOL_LAYOUTS)}, not {layout_name!r}"
        )
    if layout_name == "interleave" and True not in avgpool:
        raise UserError(
            "linear_aug: avgpool_layout=interleave orders the heads with avgpool true; "
            "set avgpool=[true] (with n_last_blocks=[1]) or avgpool_layout=concat"
        )
    if layout_name == "interleave" and max(n_last_blocks) > 1:
        raise UserError(
            "linear_aug: avgpool_layout=interleave pairs one block's class token with its patch "
            f"mean (DINO's eval_linear.py): n_last_blocks must be [1], not {list(n_last_blocks)}"
        )


def interleaved(cols: np.ndarray, dim: int) -> np.ndarray:
    """One block's ``[cls (dim), patch mean (dim)]`` columns in DINO's order: the two values
    of each dimension side by side."""
    return cols.reshape(2, dim).T.reshape(-1)


def grid_settings(p) -> list[tuple]:
    """Every head's setting in grid order (ties in the validation score go to the first):
    (base lr, wd), or (n last blocks, avgpool, base lr, wd) for a multi-layer grid, in the
    official scripts' loop order (blocks, then avgpool, then learning rate)."""
    plain = [(lr, wd) for lr in p.base_lrs for wd in p.weight_decays]
    if not p.n_last_blocks:
        return plain
    return [(n, a, lr, wd) for n in p.n_last_blocks for a in p.avgpool for lr, wd in plain]


def setting_dict(s: tuple, scale: float) -> dict:
    """A head's setting as the record names it (``lr``: the rate it trained with)."""
    head = {"n_last_blocks": s[0], "avgpool": s[1]} if len(s) == 4 else {}
    return head | {"base_lr": s[-2], "lr": s[-2] * scale, "weight_decay": s[-1]}


def schedule(n_steps_per_epoch: int, p, n: int = 0, batch: int = 0) -> tuple[int, int]:
    """(scorings of the heads, optimiser steps in all): ``p.epochs`` passes, or with
    ``p.iterations`` (the scripts' epochs x epoch_length, whatever the data size) the passes
    begun to make that many steps, the last one cut short, or with ``p.stream`` the segments
    of :func:`stream_ends` over ``n`` rows in batches of ``batch``."""
    if getattr(p, "stream", False):
        ends = stream_ends(p, n, batch)
        return len(ends), ends[-1]
    if p.iterations:
        return math.ceil(p.iterations / n_steps_per_epoch), p.iterations
    return p.epochs, p.epochs * n_steps_per_epoch


def stream_ends(p, n: int, batch: int) -> list[int]:
    """The steps done at each scoring of a stream's heads (segment e runs steps
    ``[ends[e-1], ends[e])``). The stream has ``p.iterations`` steps (DINOv2's and DINOv3's
    epochs x epoch_length from their infinite samplers), or SimCLR's get_train_steps, n x epochs
    // batch + 1. Scored every ``p.eval_period`` steps and at the end (the DINO scripts'
    eval_period_iterations), or, with eval_period 0, when a pass's last batch is done: after the
    steps whose batch's last row lies in a pass up to q (once where one batch ends several
    passes), the last scoring at the end (SimCLR's final batch reaches into the next pass)."""
    total = p.iterations or n * p.epochs // batch + 1
    period = getattr(p, "eval_period", 0)
    if period:
        return [min(k, total) for k in range(period, total + period, period)]
    passes = math.ceil(total * batch / n) if p.iterations else p.epochs
    # a batch larger than the rows may finish several passes: one scoring after it
    ends = sorted({(q + 1) * n // batch for q in range(passes - 1)} - {0, total})
    return ends + [total]


def stream_rows(step: int, end: int, batch: int, n: int, perm) -> list[list[int]]:
    """Steps ``step`` to ``end`` of a stream: the passes' permutations ``perm(q)`` of the ``n``
    rows one after another, cut into batches of ``batch`` across their boundaries; a row of
    pass q is given as ``q * n + row`` (its pass sets its crop's draws)."""
    out, orders = [], {}
    for k in range(step, end):
        rows = []
        for pos in range(k * batch, (k + 1) * batch):
            q, i = divmod(pos, n)
            if q not in orders:
                orders[q] = perm(q)
            rows.append(q * n + orders[q][i])
        out.append(rows)
    return out


def iteration_lr(step: int, peak: float, p) -> float:
    """torch's CosineAnnealingLR(T_max=iterations, eta_min=0) stepped after every iteration,
    as both scripts schedule their heads: the rate of (0-based) step ``step``."""
    return cosine_lr(peak, step, p.iterations)


@dataclass(frozen=True)
class Group:
    """The heads reading one input: their slice of the grid and the columns of the kept row
    they read (None: the whole row, the backbone's own feature)."""

    heads: slice
    columns: torch.Tensor | None


def check_blocks(model, p) -> None:
    """One-line refusals, before any forward, of a grid over blocks the model does not have."""
    if not p.n_last_blocks:
        return
    want = max(p.n_last_blocks)
    reader = block_reader(model)
    if reader is None:
        raise UserError(
            f"linear_aug: n_last_blocks reads the class tokens of a ViT's last blocks; a "
            f"{type(model).__name__} has no blocks with a class token: run linear_aug without "
            "n_last_blocks (e.g. linear@mae, linear@dino-r50), or pick a ViT"
        )
    depth = reader.block_count()
    if want > depth:
        raise UserError(
            f"linear_aug: n_last_blocks asks for the last {want} blocks, but this "
            f"{type(model).__name__} has {depth}; --set n_last_blocks=[...] with values "
            f"at most {depth}"
        )


class LayerInput:
    """What the heads read of a backbone: its own feature (a plain grid), or the columns of
    its ``layers:N`` row some head reads, N the most blocks a head uses."""

    def __init__(self, p):
        self.p = p
        self.n = max(p.n_last_blocks) if p.n_last_blocks else 0
        self.kind = layers_kind(self.n) if self.n else None
        self.columns: torch.Tensor | None = None  # of the layers:N row, set by the first row
        self.group_cols: list[np.ndarray] = []

    def reader(self, backbone):
        """The backbone reading the heads' input (the same model)."""
        return backbone if self.kind is None else replace(backbone, feature_kind=self.kind)

    def select(self, row: torch.Tensor) -> torch.Tensor:
        """A ``layers:N`` row -> the kept columns (the plain grid's row unchanged)."""
        if self.kind is None:
            return row
        if self.columns is None:
            self._plan(row.shape[1])
        return row.index_select(1, self.columns.to(row.device))

    def _plan(self, width: int) -> None:
        dim = block_dim(width, self.n)
        dino = self.p.avgpool_layout == "interleave"  # n is 1 there (check_layout)
        per = [
            interleaved(head_columns(self.n, dim, n, a), dim)
            if a and dino
            else head_columns(self.n, dim, n, a)
            for n in self.p.n_last_blocks
            for a in self.p.avgpool
        ]
        kept = np.unique(np.concatenate(per))
        where = {int(c): i for i, c in enumerate(kept)}
        self.columns = torch.from_numpy(kept)
        self.group_cols = [np.array([where[int(c)] for c in cols]) for cols in per]

    def groups(self, n_settings: int) -> list[Group]:
        """The (n, avgpool) groups of heads, in grid order, with their columns of the kept row
        (call after the first row is selected)."""
        if self.kind is None:
            return [Group(slice(0, n_settings), None)]
        size = n_settings // len(self.group_cols)
        return [
            Group(slice(i * size, (i + 1) * size), torch.from_numpy(cols))
            for i, cols in enumerate(self.group_cols)
        ]

    def record(self) -> dict:
        """What the heads read, for the record (the multi-layer grid only)."""
        out = {"feature_kind": self.kind, "layout": layout(self.kind)}
        if self.p.avgpool_layout != "concat":
            out["avgpool_layout"] = AVGPOOL_LAYOUTS[self.p.avgpool_layout]
        return out


def width(g: Group, x: torch.Tensor) -> int:
    return x.shape[1] if g.columns is None else len(g.columns)


def columns_of(x: torch.Tensor, g: Group) -> torch.Tensor:
    """A group's input: its columns of the kept row (create_linear_input's order)."""
    return x if g.columns is None else x.index_select(1, g.columns.to(x.device))


def locate(groups: list[Group], h: int) -> tuple[int, int]:
    """(group, index within it) of head ``h`` of the grid."""
    for i, g in enumerate(groups):
        if g.heads.start <= h < g.heads.stop:
            return i, h - g.heads.start
    raise IndexError(h)


def script_choice(test_acc: torch.Tensor, finite, settings: list, scale: float) -> dict:
    """The head the official scripts report: the best top-1 of the final heads on the set
    they evaluate (ImageNet val; the test split here), the first on ties. Recorded beside the
    number chosen on validation, never in its place: it is optimistic by the choice."""
    acc = torch.where(finite, test_acc, -1.0)
    best = int(torch.argmax(acc))
    return {
        "rule": "best test top-1 over the final heads, as the official script selects; "
        "optimistic, not the reported number (which is chosen on validation)",
        "selected": setting_dict(settings[best], scale),
        "top1": float(acc[best]),
    }
