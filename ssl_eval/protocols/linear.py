"""Linear probe on frozen features: a grid of learning rates x weight decays trained at once.

All heads share each mini-batch: one GEMM computes every head's logits (the bias added inside
it), one GEMM every head's gradient (softmax cross-entropy has a closed-form gradient, so no
autograd). Each head has its own learning rate and weight decay; SGD with momentum (the
update of ``torch.optim.SGD``, weight decay on weights and bias) and a cosine schedule counted
in steps. Features are standardised with the training rows' mean and standard deviation
(BatchNorm without affine, as MAE), one mini-batch at a time, so the training matrix is never
copied. The head with the best validation top-1 is reported on test.

The features are streamed from their (memory-mapped, float16) arrays: mini-batches, the
statistics' chunks and the evaluation chunks are gathered and converted to float32 one at a
time (``FeatureRows``), so no float32 copy of the train or test matrix is ever held. Chunk
sizes come from ``STREAM_MB`` (``linear_chunks``) and are recorded in the result's details.

Small datasets get at least ``min_steps`` optimiser steps (more epochs), so a 1,000-image
dataset is not probed with a handful of updates.

Recipe cards (linear@dinov2, linear@dinov3) add the official scripts' grid over layers and
poolings (``n_last_blocks`` x ``avgpool``: heads reading column subsets of one ``layers:N``
cache entry), their learning-rate scaling, fixed iteration count and N(0, 0.01) start
(``_linear_grid.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..core import distributed
from ..core.errors import UserError
from ..features.stream import FeatureRows, as_rows
from ._edges import edge, grid_edges
from ._linear_grid import (
    column_plan,
    feature_kind,
    initial_weights,
    num_heads,
    scaled_lrs,
    setting_dict,
    setting_name,
    settings_of,
    total_steps,
)
from .base import (
    PROTOCOL_TYPES,
    ProtocolInputs,
    ProtocolOutput,
    ProtocolType,
    topk_hits,
)

STREAM_MB = 256  # memory for one streamed chunk of features and its logits


def linear_chunks(dim: int, num_heads: int, num_classes: int) -> dict[str, int]:
    """Rows per chunk within ``STREAM_MB``: ``stats`` (a chunk, its float32 copy and the
    centred copy: 3 x 4 bytes per value) and ``eval`` (the float32 chunk and the logits of every
    head: 4 x (D + H x C) bytes per row), capped at 4,096 and 8,192 rows (the sizes used before
    streaming, so results on CIFAR-size data are unchanged bit for bit)."""
    budget = STREAM_MB << 20
    return {
        "stats": max(1, min(4096, budget // (12 * dim))),
        "eval": max(1, min(8192, budget // (4 * (dim + num_heads * num_classes)))),
    }


@dataclass(frozen=True)
class LinearParams:
    # params added with the recipe cards; at these values a card trains exactly as before them
    # (the quick suite's records are unchanged), so they stay out of its setting (cards.py)
    NEUTRAL: ClassVar[dict] = {
        "n_last_blocks": (),
        "avgpool": (),
        "lr_batch_ref": 0,
        "iterations": 0,
        "init_std": 0.0,
        "report_test_choice": False,
    }
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    weight_decays: tuple[float, ...] = (0.0, 0.01)
    epochs: int = 3
    min_steps: int = 200  # at least this many optimiser steps: small datasets get more epochs
    batch_size: int = 512
    momentum: float = 0.9
    batchnorm: bool = (
        True  # standardise features with train statistics (BatchNorm without affine, as MAE)
    )
    # recipe cards: heads over the last n blocks' class tokens (x the last block's patch mean
    # or not), read from one layers:N cache entry; () reads the backbone's own feature
    n_last_blocks: tuple[int, ...] = ()
    avgpool: tuple[bool, ...] = ()
    lr_batch_ref: int = 0  # > 0: each lr is scaled by batch_size / lr_batch_ref (scale_lr)
    iterations: int = 0  # > 0: this many optimiser steps, whatever the data size (else epochs)
    init_std: float = 0.0  # > 0: weights start N(0, init_std^2), bias 0 (else zeros)
    # also record the head the official script would pick: the best on the test split
    # (optimistic, never the reported number)
    report_test_choice: bool = False

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0:
            raise UserError(
                "linear: epochs and batch_size must be at least 1, min_steps at least 0"
            )
        if not self.lrs or not self.weight_decays:
            raise UserError("linear: lrs and weight_decays must each list at least one value")
        if min(self.lrs) <= 0 or min(self.weight_decays) < 0 or not 0 <= self.momentum < 1:
            raise UserError(
                "linear: every lr must be > 0, every weight decay >= 0, momentum in [0, 1)"
            )
        if bool(self.n_last_blocks) != bool(self.avgpool):
            raise UserError(
                "linear: n_last_blocks and avgpool go together (e.g. n_last_blocks=[1,4] "
                "avgpool=[false,true]), or both empty for the backbone's own feature"
            )
        if self.n_last_blocks and min(self.n_last_blocks) < 1:
            raise UserError(f"linear: n_last_blocks must be >= 1, got {list(self.n_last_blocks)}")
        if any(not isinstance(a, bool) for a in self.avgpool):
            raise UserError(f"linear: avgpool lists true/false, got {list(self.avgpool)}")
        if self.lr_batch_ref < 0 or self.iterations < 0 or self.init_std < 0:
            raise UserError("linear: lr_batch_ref, iterations and init_std must be >= 0")


def schedule(n: int, p: LinearParams) -> tuple[int, int]:
    """(epochs, steps per epoch) for ``n`` training rows: ``p.epochs``, raised to reach
    ``p.min_steps``; with ``p.iterations``, the epochs begun to make that many steps."""
    epochs, per_epoch, _ = total_steps(n, p)
    return epochs, per_epoch


@dataclass
class HeadGrid:
    """Trained heads: weight (D, H, C), bias (H, C), settings [(lr, wd)] or [(n last blocks,
    avgpool, lr, wd)], feature statistics, and how long they trained. ``columns``: the columns
    of a feature row the heads read (None: all)."""

    weight: torch.Tensor
    bias: torch.Tensor
    settings: list[tuple[float, float]]
    mean: torch.Tensor | None
    inv_std: torch.Tensor | None
    epochs: int = 0
    steps: int = 0
    diverged: int = 0  # heads whose weights stopped being finite (too high a learning rate)
    diverged_mask: torch.Tensor | None = None  # (H,) bool
    columns: torch.Tensor | None = None

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        if self.columns is not None:
            x = x.index_select(1, self.columns)
        return (x - self.mean) * self.inv_std if self.mean is not None else x

    def logits(self, x: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """(N, D) -> (N, H, C), or (N, C) for one ``head``."""
        x = self._standardise(x)
        if head is not None:
            return torch.addmm(self.bias[head], x, self.weight[:, head])
        D, H, C = self.weight.shape
        return torch.addmm(self.bias.reshape(H * C), x, self.weight.reshape(D, H * C)).view(
            -1, H, C
        )

    def top1_per_head(self, x, y: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Top-1 accuracy of every head on (x, y), in chunks (bounded memory); ``x`` a tensor,
        an array or ``FeatureRows``."""
        x = as_rows(x, self.weight.device)
        correct = torch.zeros(self.weight.shape[1], device=self.weight.device)
        for s in range(0, len(x), chunk):
            correct += (
                self.logits(x.read(s, s + chunk)).argmax(2) == y[s : s + chunk].view(-1, 1)
            ).sum(0)
        x.release()
        return correct / max(len(x), 1)


def feature_stats(x, rows: torch.Tensor | None, chunk: int = 4096):
    """Mean and 1 / (unbiased std) of ``x[rows]`` per feature (``x`` a tensor, an array or
    ``FeatureRows``), without gathering or copying the matrix: each pass reads row chunks in
    float32 and multiplies a 0/1 row-weight vector into them (a GEMV); chunk sums accumulate in
    float64; the variance is taken around the mean (two passes). A constant feature gets std
    1e-6."""
    x = as_rows(x)
    N, D, dev, dt = len(x), x.dim, x.device, torch.float32
    if rows is None:
        w = torch.ones(N, dtype=dt, device=dev)
    else:
        w = torch.zeros(N, dtype=dt, device=dev).index_add_(
            0, rows.to(dev), torch.ones(len(rows), dtype=dt, device=dev)
        )
    n = float(w.sum())
    total = torch.zeros(D, dtype=torch.float64, device=dev)
    for s in range(0, N, chunk):
        total += (w[s : s + chunk] @ x.read(s, s + chunk)).double()
    mean = (total / n).to(dt)
    buf = torch.empty(min(chunk, N), D, dtype=dt, device=dev)
    sq = torch.zeros_like(total)
    for s in range(0, N, chunk):
        d = torch.sub(x.read(s, s + chunk), mean, out=buf[: min(chunk, N - s)])
        sq += (w[s : s + chunk] @ d.mul_(d)).double()
    x.release()
    std = (sq / max(n - 1, 1)).sqrt().clamp_min(1e-6).to(dt)
    return mean.view(1, -1), (1.0 / std).view(1, -1)


def train_heads(
    x,
    y: torch.Tensor,
    num_classes: int,
    p: LinearParams,
    seed: int = 0,
    rows: torch.Tensor | None = None,
    stats_chunk: int = 4096,
    heads: slice | None = None,
) -> HeadGrid:
    """Train one linear head per (lr, wd) in ``p``'s grid on features ``x`` (a tensor, an
    array or ``FeatureRows``) and labels ``y`` (all rows, or the rows listed in ``rows``: the
    matrix is read a mini-batch at a time, never copied). ``heads``: train only this part of
    the grid, diverged heads left as they are (the caller puts the parts together and calls
    ``drop_diverged``)."""
    x = as_rows(x)
    dev = x.device
    n = len(rows) if rows is not None else len(x)
    if n == 0:
        raise UserError("linear: no training rows")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    plan = column_plan(p, x.dim)
    cols = None if plan.columns is None else torch.from_numpy(plan.columns).to(dev)
    D, C = plan.width or x.dim, num_classes
    mean = inv_std = None
    if p.batchnorm:
        mean, inv_std = feature_stats(x, rows, stats_chunk)
        if cols is not None:
            mean, inv_std = mean[:, cols], inv_std[:, cols]
    part = heads or slice(None)
    settings = settings_of(p)[part]
    H = len(settings)
    lr0 = torch.tensor([s[-2] for s in settings], device=dev).repeat_interleave(C).view(1, H * C)
    wd = torch.tensor([s[-1] for s in settings], device=dev).repeat_interleave(C).view(1, H * C)
    decay = any(s[-1] != 0 for s in settings)
    # a head's weights on the columns its input leaves out stay zero: no gradient reaches them
    mask = None if plan.mask is None else plan.mask[:, part].to(dev)
    W = initial_weights(p, D, C, plan, seed)[:, part].reshape(D, H * C).to(dev)
    b = torch.zeros(1, H * C, device=dev)
    mW, mb = torch.zeros_like(W), torch.zeros_like(b)
    bs = min(p.batch_size, n)
    # per-batch buffers, reused: one-hot labels, logits
    onehot = torch.zeros(bs, C, device=dev)
    logits = torch.empty(bs, H * C, device=dev)
    lr_t = torch.empty_like(lr0)
    epochs, per_epoch, total = total_steps(n, p)
    step = 0
    y = y.to(dev)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        if rows is not None:
            order = rows[order]
        for s in range(0, n, bs):
            if step == total:  # a fixed iteration count ends within an epoch
                break
            idx = order[s : s + bs]
            B = len(idx)
            xb = x.take(idx)  # a fresh float32 copy of the batch's rows
            if cols is not None:
                xb = xb.index_select(1, cols)
            if mean is not None:
                xb.sub_(mean).mul_(inv_std)
            tb = onehot[:B].zero_().scatter_(1, y[idx].view(B, 1).long(), 1.0)
            z = torch.addmm(b, xb, W, out=logits[:B]).view(B, H, C)
            g = torch.softmax(z, dim=2)
            g.sub_(tb.unsqueeze(1))  # B x the gradient of the mean cross-entropy w.r.t. the logits
            g2 = g.view(B, H * C)
            # momentum buffer <- momentum * buffer + gradient (data term, then weight decay)
            mW.addmm_(xb.T, g2, beta=p.momentum, alpha=1.0 / B)
            mb.mul_(p.momentum).add_(g2.sum(0, keepdim=True), alpha=1.0 / B)
            if mask is not None:  # (the new data term only: the buffer was zero there)
                mW.view(D, H, C).mul_(mask)
            if decay:
                mW.addcmul_(W, wd)
                mb.addcmul_(b, wd)
            torch.mul(lr0, 0.5 * (1 + math.cos(math.pi * step / total)), out=lr_t)
            W.addcmul_(mW, lr_t, value=-1.0)
            b.addcmul_(mb, lr_t, value=-1.0)
            step += 1
    x.release()
    grid = HeadGrid(W.view(D, H, C), b.view(H, C), settings, mean, inv_std, epochs, step)
    grid.columns = cols
    return grid if heads is not None else drop_diverged(grid, p)


def drop_diverged(grid: HeadGrid, p: LinearParams) -> HeadGrid:
    """Zero the heads whose weights stopped being finite and mark them (never selected);
    refuse when every head diverged."""
    W3, b2 = grid.weight, grid.bias
    bad = ~(torch.isfinite(W3).all(dim=0).all(dim=1) & torch.isfinite(b2).all(dim=1))
    if bool(bad.all()):
        raise UserError(
            f"linear: every head diverged (learning rates {list(p.lrs)} are too high for these "
            "features); lower them, e.g. --set lrs=[0.001,0.01]"
        )
    if bad.any():
        # a diverged head is excluded from the selection (its validation score is -1 below)
        W3[:, bad] = 0.0
        b2[bad] = 0.0
    grid.diverged, grid.diverged_mask = int(bad.sum()), bad
    return grid


@dataclass
class Fitted:
    """The trained grid and the head chosen on validation (``best``), with what ``run_linear``
    records of them; ``scores(x)`` yields that head's logits of ``x`` a chunk at a time."""

    heads: HeadGrid
    best: int
    val_acc: torch.Tensor
    chunks: dict[str, int]
    train_size: int
    val_size: int
    device: torch.device

    def scores(self, x):
        rows = FeatureRows(x, device=self.device)
        step = self.chunks["eval"]
        for s in range(0, len(rows), step):
            yield self.heads.logits(rows.read(s, s + step), head=self.best)
        rows.release()


def fit_and_select(inp: ProtocolInputs, p: LinearParams) -> Fitted:
    """Every head of the grid trained on the training rows, and the best validation top-1
    chosen (the first in grid order on ties; a diverged head never)."""
    dev = inp.device
    torch.manual_seed(inp.seed)
    train = FeatureRows(inp.train_x, device=dev)
    y_all = torch.from_numpy(np.asarray(inp.train_y)).to(dev)
    tr, va = torch.from_numpy(inp.train_idx).to(dev), torch.from_numpy(inp.val_idx).to(dev)
    if len(va) == 0:
        raise UserError("linear: the validation split is empty; raise --val-fraction")
    chunks = linear_chunks(train.dim, num_heads(p), inp.num_classes)
    heads = _train(train, y_all, inp.num_classes, p, inp.seed, tr, chunks["stats"])
    val_x = FeatureRows(inp.train_x, inp.val_idx, dev)
    val_acc = heads.top1_per_head(val_x, y_all[va], chunks["eval"])  # (H,)
    sel = val_acc
    if heads.diverged_mask is not None:  # a diverged head is never selected
        sel = torch.where(heads.diverged_mask.to(val_acc.device), -1.0, val_acc)
    best = int(torch.argmax(sel))  # first best in grid order on ties
    return Fitted(heads, best, val_acc, chunks, len(tr), len(va), dev)


def run_linear(inp: ProtocolInputs, p: LinearParams) -> ProtocolOutput:
    return linear_output(inp, p, fit_and_select(inp, p))


def linear_output(inp: ProtocolInputs, p: LinearParams, fit: Fitted) -> ProtocolOutput:
    """The chosen head scored on the test split, with what the record says of the grid."""
    heads, best, chunks = fit.heads, fit.best, fit.chunks
    test_y = torch.from_numpy(np.asarray(inp.test_y)).to(fit.device)
    hits, s = {1: [], 5: []}, 0
    for scores in fit.scores(inp.test_x):
        h = topk_hits(scores, test_y[s : s + len(scores)])
        s += len(scores)
        hits[1].append(h[1])
        hits[5].append(h[5])
    hits = {k: np.concatenate(v) for k, v in hits.items()}
    extra = {}
    if p.report_test_choice:
        test_x = FeatureRows(inp.test_x, device=fit.device)
        extra["script_choice"] = _test_choice(heads, test_x, test_y, chunks["eval"], p)
        test_x.release()
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        extra
        | {
            "selected": setting_dict(heads.settings[best], p),
            **_grid_edges(heads.settings[best], p),
            "val_top1": {
                setting_name(s): float(v) for s, v in zip(heads.settings, fit.val_acc, strict=False)
            },
            "train_size": fit.train_size,
            "val_size": fit.val_size,
            "epochs_run": heads.epochs,
            "steps": heads.steps,
            "diverged_heads": heads.diverged,
            "chunks": {**chunks, "batch": min(p.batch_size, fit.train_size)},
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )


def _grid_edges(chosen: tuple, p: LinearParams) -> dict:
    """The chosen head's learning rate and weight decay against their grids (``_edges``)."""
    return grid_edges(
        edge("lrs", scaled_lrs(p), [chosen[-2]]),
        edge("weight_decays", p.weight_decays, [chosen[-1]], floor=0.0),
    )


def _test_choice(heads: HeadGrid, test_x, test_y, chunk: int, p: LinearParams) -> dict:
    """The head the official scripts report: the best top-1 on the evaluation set they are
    given (ImageNet val, the test split here), the first on ties. Recorded beside the number
    chosen on validation, never in its place: it is optimistic by the choice."""
    acc = heads.top1_per_head(test_x, test_y, chunk)
    if heads.diverged_mask is not None:
        acc = torch.where(heads.diverged_mask.to(acc.device), -1.0, acc)
    best = int(torch.argmax(acc))
    return {
        "rule": "best test top-1 over the heads, as the official script selects; optimistic, "
        "not the reported number (which is chosen on validation)",
        "selected": setting_dict(heads.settings[best], p),
        "top1": float(acc[best]),
    }


def _train(x, y, num_classes: int, p: LinearParams, seed: int, rows, stats_chunk: int) -> HeadGrid:
    """``train_heads``; across a torchrun world the grid is shared out: each rank trains its
    contiguous part of the heads on every training row, in the same mini-batches, and the parts
    are put together in grid order. A head's columns never meet another head's in any sum, so
    each head is the one a single process trains, bit for bit (an all-reduced gradient would
    not be: the batch sum would be taken in another order)."""
    if distributed.world() == 1:
        return train_heads(x, y, num_classes, p, seed=seed, rows=rows, stats_chunk=stats_chunk)
    part = distributed.shard(num_heads(p))
    mine = train_heads(
        x, y, num_classes, p, seed=seed, rows=rows, stats_chunk=stats_chunk, heads=part
    )
    parts = distributed.all_gather((mine.weight.cpu(), mine.bias.cpu(), mine.settings))
    grid = HeadGrid(
        torch.cat([w for w, _, _ in parts], 1).to(x.device),
        torch.cat([b for _, b, _ in parts], 0).to(x.device),
        [s for _, _, part_settings in parts for s in part_settings],
        mine.mean,
        mine.inv_std,
        mine.epochs,
        mine.steps,
        columns=mine.columns,
    )
    return drop_diverged(grid, p)


PROTOCOL_TYPES.register(
    "linear", ProtocolType("linear", LinearParams, run_linear, feature_kind=feature_kind)
)
