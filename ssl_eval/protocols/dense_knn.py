"""Patch k-NN segmentation, training-free (CAPI's kNN segmentation classifier).

CAPI (facebookresearch/capi @ 98b4fa1, eval_segmentation.py, KNNClassifier; utils.py
extract_features) resizes image and label map to a 224 x 224 square (bicubic / nearest),
gives each patch the labels of its patch_size x patch_size pixels of the resized label map,
drops the training patches whose most common pixel label (``torch.mode``: ties to the
smallest) is ignored, finds each patch's k nearest training patches (cosine: 1 - the product
of unit vectors; L2: ``torch.cdist``) and predicts, for each pixel position of the patch, the
most common label among the neighbours' labels at that position (``torch.mode`` over the
neighbours: ties to the smallest label; an ignored label votes like any other: ADE20K's
ignored 0 wins ties there, where this protocol's ignored 255 loses them). k in (1, 3,
10, 30) x distance in (cosine, L2) is chosen on a validation split by mIoU, the first best in
``itertools.product`` order (k outer, distance inner).

Here ``vote`` chooses the rule: ``pixel_mode`` is CAPI's (above; the pixel labels of a patch
are those of its block of the training crop, crop side / grid side pixels square, stored
uint8), ``share`` this protocol's first rule (each training patch carries the share of each
class among its labelled pixels, patches without one dropped; a test patch scores each class
by the mean share over its neighbours). ``distances`` lists the distances searched: cosine
(unit tokens, the exact search the k-NN protocol uses) and L2 (raw tokens, ``torch.cdist``
by blocks). Either vote's scores go through the same sliding windows and bilinear upsampling
as the linear probe's logits (pixel_mode: one-hot per pixel at the window's resolution, an
extra channel for an ignored label, which counts as wrong wherever the truth is labelled),
and the image is scored at its original resolution. The grid is chosen on the validation rows
(train rows held out, their crops scored at the crop's resolution: a choice, not a reported
number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UserError
from ..data.dense import IGNORE
from ..features.tokens import token_source
from ._edges import edge, grid_edges
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType
from .dense.common import (
    TargetBank,
    cache_of,
    crop_backbone,
    dense_size,
    dense_targets,
    train_tokens,
)
from .dense.metrics import SegmentationScorer
from .dense_seg import score_segmentation
from .search.knn import knn_search
from .search.topk import search_blocks

VOTES = ("share", "pixel_mode")
DISTANCES = ("cosine", "L2")


@dataclass(frozen=True)
class KnnsegParams:
    # added after the first records; at these values a card runs exactly as before them (the
    # default suite pins them), so they stay out of its setting (cards.py)
    NEUTRAL: ClassVar[dict] = {"vote": "share", "distances": ("cosine",)}
    ks: tuple[int, ...] = (1, 3, 10, 30)
    size: int = 0  # shorter side; 0: the backbone's input size (CAPI: 224)
    crop: int = 0
    stride: int = 0
    max_bank_patches: int = 2_000_000  # training patches kept (a seeded subsample beyond)
    token_budget_mb: int = 2048
    target_budget_mb: int = 1024
    memory_mb: int = 512  # the search's working memory
    examples: int = 3
    vote: str = "share"  # share | pixel_mode (CAPI's: the per-pixel mode of the neighbours)
    distances: tuple[str, ...] = ("cosine",)  # searched on validation: cosine, L2 (CAPI's both)

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise UserError("knnseg: ks must list neighbour counts >= 1")
        if min(self.size, self.crop, self.stride, self.examples) < 0:
            raise UserError("knnseg: size, crop, stride and examples must be >= 0")
        if min(self.max_bank_patches, self.token_budget_mb, self.memory_mb) < 1:
            raise UserError("knnseg: max_bank_patches, token_budget_mb, memory_mb must be >= 1")
        if self.vote not in VOTES:
            raise UserError(f"knnseg: vote {self.vote!r}: choose one of {', '.join(VOTES)}")
        bad = [d for d in self.distances if d not in DISTANCES]
        if not self.distances or bad or len(set(self.distances)) < len(self.distances):
            raise UserError(
                f"knnseg: distances {list(self.distances)}: list each of "
                f"{', '.join(DISTANCES)} at most once, at least one"
            )


def _shares(t: torch.Tensor, h: int, w: int, classes: int) -> torch.Tensor:
    """(n, S, S) crop targets -> (n, h, w, C): each patch's share of each class among its
    labelled pixels (all 0: no labelled pixel)."""
    onehot = F.one_hot(torch.where(t == IGNORE, classes, t), classes + 1).float()
    onehot = onehot[..., :classes].permute(0, 3, 1, 2)  # ignored pixels count for none
    share = F.adaptive_avg_pool2d(onehot, (h, w))
    share = share / share.sum(1, keepdim=True).clamp_min(1e-12)
    return share.permute(0, 2, 3, 1)


def _grid(inp, size: int) -> tuple[int, int, int]:
    """(h, w, D) of the patch-token grid of a ``size`` x ``size`` crop."""
    p = next(inp.backbone.model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    with torch.no_grad():
        g = inp.backbone.patch_grid(torch.zeros(1, 3, size, size, device=device))
    return tuple(int(v) for v in g.tokens.shape[1:])  # type: ignore[return-value]


def _pixel_labels(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, S, S) crop targets -> (n, h, w, ph pw) uint8: each patch's pixel labels, its
    block of (S / h) x (S / w) pixels row by row (CAPI's ``(ih ph) (iw pw) -> (ph pw)``)."""
    n, sh, sw = t.shape
    if sh % h or sw % w:
        raise UserError(
            f"knnseg: vote pixel_mode needs a crop of whole patches, and a {sh}x{sw} crop "
            f"gives a {h}x{w} grid; set size to a multiple of the patch grid's stride"
        )
    ph, pw = sh // h, sw // w
    blocks = t.reshape(n, h, ph, w, pw).permute(0, 1, 3, 2, 4)
    return blocks.reshape(n, h, w, ph * pw).to(torch.uint8)


def _patch_targets(t: torch.Tensor, h: int, w: int, classes: int, vote: str):
    """(what each patch carries (P, C) float32 shares or (P, L) uint8 pixel labels, which
    patches may enter the bank (P,) bool) for ``t`` (n, S, S): share: a patch with a labelled
    pixel; pixel_mode (CAPI's ``Classifier.fit``): a patch whose most common pixel label
    (``torch.mode``: ties to the smallest) is not ignored."""
    if vote == "share":
        share = _shares(t, h, w, classes).reshape(-1, classes)
        return share, share.sum(1) > 0
    labels = _pixel_labels(t, h, w).reshape(-1, (t.shape[1] // h) * (t.shape[2] // w))
    return labels, labels.mode(dim=1).values != IGNORE


def _bank(inp, p, dense, rows, size, classes):
    """The k-NN bank of ``rows``' crops, streamed in bounded memory: the L2-normalised patch
    tokens (P, D) float32 when cosine is searched, the raw ones when L2 is, and what each
    patch carries (``_patch_targets``: class shares (P, C) float32 or pixel labels (P, L)
    uint8), only for the patches kept.

    A patch that may not enter (``_patch_targets``) is never kept; beyond
    ``max_bank_patches`` eligible patches, a seeded subsample (numpy's generator of seed 0
    choosing among the eligible patches in row order) is. Memory: the bank itself plus one
    batch, never the training set: when the crops could hold more patches than the bank, a
    first pass over the targets alone counts the eligible patches, so the subsample is chosen
    before any token is kept, and the second pass writes each kept patch into the
    preallocated bank. At most P = ``max_bank_patches`` rows: P x D x 4 bytes per distance,
    and P x C x 4 (share) or P x L bytes (pixel_mode, L the pixels of a patch)."""
    src = train_tokens(inp, size, rows, p.token_budget_mb)
    targets = TargetBank(dense.train, rows, size, False, p.target_budget_mb * 2**20)
    h, w, d = _grid(inp, size)
    bs = src.batch_size
    keep = None  # positions among the eligible patches that stay; None: all of them
    capacity = len(rows) * h * w
    if capacity > p.max_bank_patches:
        eligible = 0
        for s in range(0, len(rows), bs):
            _, ok = _patch_targets(targets.get(rows[s : s + bs]), h, w, classes, p.vote)
            eligible += int(ok.sum())
        capacity = min(eligible, p.max_bank_patches)
        if eligible > p.max_bank_patches:
            keep = np.sort(np.random.default_rng(0).choice(eligible, p.max_bank_patches, False))
    banks = {dist: torch.empty(capacity, d) for dist in p.distances}
    carried = None
    n = seen = 0  # patches written; eligible patches passed
    for take, tokens, _ in src.batches(rows, shared=True):
        carry, ok = _patch_targets(targets.get(take), h, w, classes, p.vote)
        pos = torch.nonzero(ok)[:, 0]
        if keep is not None:
            ordinal = np.arange(seen, seen + len(pos))
            pos = pos[torch.from_numpy(np.isin(ordinal, keep, assume_unique=True))]
        seen += int(ok.sum())
        if carried is None:
            carried = torch.empty(capacity, carry.shape[1], dtype=carry.dtype)
        raw = tokens.reshape(-1, d)[pos]
        for dist, bank in banks.items():
            bank[n : n + len(pos)] = F.normalize(raw, dim=1) if dist == "cosine" else raw
        carried[n : n + len(pos)] = carry[pos]
        n += len(pos)
    if carried is None:
        carried = torch.empty(0, classes)
    block = (size // h, size // w)  # pixel_mode: the pixels of a patch, (rows, columns)
    return {dist: bank[:n] for dist, bank in banks.items()}, carried[:n], src, block


def _l2_block(q: torch.Tensor, blk: torch.Tensor, k: int):
    """A block's top-``k`` by L2 distance (CAPI's ``torch.cdist``), as (minus the distance,
    column index): ``search_blocks`` keeps the largest."""
    return torch.topk(-torch.cdist(q, blk), k, dim=1)


def _search(bank: torch.Tensor, queries: torch.Tensor, k: int, dist: str, memory_mb: int):
    """Indices (Q, k) of each query's ``k`` nearest bank rows, best first: cosine on unit
    vectors (the k-NN protocol's exact search), L2 on raw tokens (by blocks within
    ``memory_mb``; the block of distances and its negation take twice the plan's bytes)."""
    if dist == "cosine":
        return knn_search(bank, F.normalize(queries, dim=1), k, memory_mb=memory_mb)[1]
    return search_blocks(bank, queries, k, max(1, memory_mb // 2), _l2_block)[1]


def pixel_mode(neighbour_labels: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """(Q, k, L) uint8 pixel labels of each query's neighbours -> (Q, L) uint8: at each pixel
    position the most common label among the neighbours' labels there (CAPI's
    ``neighbor_labels.mode(dim=1)``: ties to the smallest label; the ignored label 255 votes
    too, and wins no tie against a class). Queries ``chunk`` at a time."""
    out = torch.empty(neighbour_labels.shape[0], neighbour_labels.shape[2], dtype=torch.uint8)
    for s in range(0, len(out), chunk):
        out[s : s + chunk] = neighbour_labels[s : s + chunk].mode(dim=1).values
    return out


def _label_map(labels: torch.Tensor, n: int, h: int, w: int, block, classes: int):
    """(n h w, ph pw) pixel labels of the patches -> (n, h ph, w pw) label maps, each patch's
    block in place, the ignored label as C (an ignored prediction is wrong wherever the truth
    is labelled)."""
    ph, pw = block
    m = labels.long().reshape(n, h, w, ph, pw).permute(0, 1, 3, 2, 4).reshape(n, h * ph, w * pw)
    return torch.where(m == IGNORE, classes, m)


def _one_hot(m: torch.Tensor, classes: int) -> torch.Tensor:
    """(n, H, W) label maps (0..C) -> (n, C + 1, H, W) one-hot scores."""
    return torch.zeros(m.shape[0], classes + 1, *m.shape[1:]).scatter_(1, m[:, None], 1.0)


def _one_hot_map(labels: torch.Tensor, n: int, h: int, w: int, block, classes: int):
    """(n h w, ph pw) pixel labels of the patches -> (n, C + 1, h ph, w pw) one-hot scores,
    each patch's block in place; the ignored label in channel C."""
    return _one_hot(_label_map(labels, n, h, w, block, classes), classes)


def run_knnseg(inp: ImageInputs, p: KnnsegParams) -> ProtocolOutput:
    dense = dense_targets(inp, "segmentation")
    classes = len(dense.classes)
    size = dense_size(inp.backbone, p.size)
    train_rows = np.sort(np.asarray(inp.train_idx, dtype=np.int64))
    banks, carried, src, block = _bank(inp, p, dense, train_rows, size, classes)
    if len(carried) == 0:
        if p.vote == "share":
            raise UserError("knnseg: no training patch has a labelled pixel")
        raise UserError("knnseg: every training patch's most common pixel label is ignored")
    kmax = min(max(p.ks), len(carried))
    grid = [(k, dist) for k in p.ks for dist in p.distances]  # CAPI's itertools.product order

    def vote(tokens: torch.Tensor, choices, labels: bool = False):
        """(choice, scores) for each choice in turn, one cell's scores alive at a time:
        (n, C, h, w) shares, or with pixel_mode (n, C + 1, h ph, w pw) one-hot maps, or with
        ``labels`` the (n, h ph, w pw) label maps those one-hot maps encode (channel C: the
        ignored label), their argmax without the one-hot's C + 1 floats a pixel."""
        n, h, w, d = tokens.shape
        q = tokens.reshape(-1, d).float().cpu()
        for dist in dict.fromkeys(dist for _, dist in choices):
            idx = _search(banks[dist], q, kmax, dist, p.memory_mb)
            neigh = carried[idx]  # (Q, k, C) shares or (Q, k, L) pixel labels, best first
            for k in [k for k, dd in choices if dd == dist]:
                kk = min(k, kmax)
                if p.vote == "share":
                    sc = neigh[:, :kk].mean(1).reshape(n, h, w, classes).permute(0, 3, 1, 2)
                elif labels:
                    sc = _label_map(pixel_mode(neigh[:, :kk]), n, h, w, block, classes)
                else:
                    sc = _one_hot_map(pixel_mode(neigh[:, :kk]), n, h, w, block, classes)
                yield (k, dist), sc
                del sc

    # the grid chosen on the validation rows' crops (at the crop resolution: a choice only)
    val_rows = np.sort(np.asarray(inp.val_idx, dtype=np.int64))
    val_miou = {}
    if len(val_rows) and len(grid) > 1:
        vsrc = token_source(
            crop_backbone(inp.backbone, size), inp.bundle, "train", val_rows,
            budget_bytes=p.token_budget_mb * 2**20, device=inp.device,
            batch_size=inp.batch_size, cache_dir=cache_of(inp), num_workers=inp.num_workers,
        )  # fmt: skip
        vt = TargetBank(dense.train, val_rows, size, False, p.target_budget_mb * 2**20)
        scorers = {c: SegmentationScorer(classes, IGNORE) for c in grid}
        for take, tokens, _ in vsrc.batches(val_rows, shared=True):
            t = vt.get(take)
            for c, sc in vote(tokens, grid, labels=True):
                for i, tg in enumerate(t.numpy()):  # one image's upsampled scores at a time
                    if sc.dim() == 3 and tuple(sc.shape[-2:]) == tg.shape:
                        pr = sc[i].numpy()  # the one-hot map's argmax; the resize: identity
                    else:
                        one = sc[i : i + 1] if sc.dim() == 4 else _one_hot(sc[i : i + 1], classes)
                        up = F.interpolate(one, size=tg.shape, mode="bilinear", align_corners=False)
                        pr = up.argmax(1)[0].numpy()
                    scorers[c].add(pr, tg)
        val_miou = {c: s.results(resamples=0)["miou"] for c, s in scorers.items()}
        # the best mIoU; ties: the smaller k, then the distance listed first (CAPI: the first
        # best in grid order, the same for ks listed in increasing order)
        best = max(grid, key=lambda c: (val_miou[c], -c[0], -p.distances.index(c[1])))
    else:
        best = grid[0]
    best_k, best_dist = best
    neutral = p.distances == KnnsegParams.NEUTRAL["distances"]
    if len(p.distances) == 1:
        at_crop = {str(k): v for (k, _), v in val_miou.items()}
    else:
        at_crop = {f"k={k},distance={dd}": v for (k, dd), v in val_miou.items()}
    out = score_segmentation(
        inp,
        p,
        dense,
        lambda tokens, prefix: next(vote(tokens, [best]))[1],
        src.record()
        | {
            "k": best_k,
            **({} if neutral else {"distance": best_dist}),
            **(grid_edges(edge("ks", p.ks, [best_k], floor=1)) if val_miou else {}),
            "val_miou_at_crop": at_crop,
            "bank_patches": len(carried),
        },
    )
    return out


PROTOCOL_TYPES.register(
    "knnseg",
    ProtocolType(
        "knnseg", KnnsegParams, run_knnseg, inputs="images", seeded=False, dense="segmentation"
    ),
)
