"""Patch k-NN segmentation, training-free (CAPI's kNN segmentation classifier).

CAPI (facebookresearch/capi @ 98b4fa1, eval_segmentation.py, KNNClassifier) gives each
training patch the labels of its pixels, finds each test patch's nearest training patches and
takes the most common label per pixel among them; k in (1, 3, 10, 30) and the distance
(cosine, L2) are chosen on a validation split by mIoU, and training patches whose most
common label is ignored are dropped. Here: each training patch carries the share of each
class among its labelled pixels; a test patch scores each class by the mean share over its
k nearest training patches (cosine similarity, the exact search the k-NN protocol uses);
those scores go through the same sliding windows and bilinear upsampling as the linear probe's
logits, and the image is scored at its original resolution. k is chosen on the validation rows
(train rows held out, their crops scored at the crop's resolution: a choice, not a reported
number); the L2 distance of CAPI's grid is not searched (cosine only, stated in the card).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class KnnsegParams:
    ks: tuple[int, ...] = (1, 3, 10, 30)
    size: int = 0  # shorter side; 0: the backbone's input size (CAPI: 224)
    crop: int = 0
    stride: int = 0
    max_bank_patches: int = 2_000_000  # training patches kept (a seeded subsample beyond)
    token_budget_mb: int = 2048
    target_budget_mb: int = 1024
    memory_mb: int = 512  # the search's working memory
    examples: int = 3

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise UserError("knnseg: ks must list neighbour counts >= 1")
        if min(self.size, self.crop, self.stride, self.examples) < 0:
            raise UserError("knnseg: size, crop, stride and examples must be >= 0")
        if min(self.max_bank_patches, self.token_budget_mb, self.memory_mb) < 1:
            raise UserError("knnseg: max_bank_patches, token_budget_mb, memory_mb must be >= 1")


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


def _bank(inp, p, dense, rows, size, classes):
    """The k-NN bank of ``rows``' crops, streamed in bounded memory: L2-normalised patch
    tokens (P, D) float32 and each patch's class shares (P, C), only for the patches kept.

    A patch without a labelled pixel is never kept; beyond ``max_bank_patches`` labelled
    patches, a seeded subsample (numpy's generator of seed 0 choosing among the labelled
    patches in row order) is. Memory: the bank itself plus one batch, never the training
    set: when the crops could hold more patches than the bank, a first pass over the
    targets alone counts the labelled patches, so the subsample is chosen before any token
    is kept, and the second pass writes each kept patch into the preallocated bank."""
    src = train_tokens(inp, size, rows, p.token_budget_mb)
    targets = TargetBank(dense.train, rows, size, False, p.target_budget_mb * 2**20)
    h, w, d = _grid(inp, size)
    bs = src.batch_size
    keep = None  # positions among the labelled patches that stay; None: all of them
    capacity = len(rows) * h * w
    if capacity > p.max_bank_patches:
        labelled = 0
        for s in range(0, len(rows), bs):
            share = _shares(targets.get(rows[s : s + bs]), h, w, classes)
            labelled += int((share.sum(-1) > 0).sum())
        capacity = min(labelled, p.max_bank_patches)
        if labelled > p.max_bank_patches:
            keep = np.sort(np.random.default_rng(0).choice(labelled, p.max_bank_patches, False))
    bank = torch.empty(capacity, d)
    shares = torch.empty(capacity, classes)
    n = seen = 0  # patches written; labelled patches passed
    for take, tokens, _ in src.batches(rows, shared=True):
        share = _shares(targets.get(take), h, w, classes).reshape(-1, classes)
        lab = share.sum(1) > 0  # patches with no labelled pixel carry nothing
        pos = torch.nonzero(lab)[:, 0]
        if keep is not None:
            ordinal = np.arange(seen, seen + len(pos))
            pos = pos[torch.from_numpy(np.isin(ordinal, keep, assume_unique=True))]
        seen += int(lab.sum())
        feats = F.normalize(tokens.reshape(-1, d)[pos], dim=1)
        bank[n : n + len(pos)], shares[n : n + len(pos)] = feats, share[pos]
        n += len(pos)
    return bank[:n], shares[:n], src


def run_knnseg(inp: ImageInputs, p: KnnsegParams) -> ProtocolOutput:
    dense = dense_targets(inp, "segmentation")
    classes = len(dense.classes)
    size = dense_size(inp.backbone, p.size)
    train_rows = np.sort(np.asarray(inp.train_idx, dtype=np.int64))
    bank, shares, src = _bank(inp, p, dense, train_rows, size, classes)
    if len(bank) == 0:
        raise UserError("knnseg: no training patch has a labelled pixel")
    kmax = min(max(p.ks), len(bank))

    def vote(tokens: torch.Tensor, ks) -> dict[int, torch.Tensor]:
        n, h, w, d = tokens.shape
        q = F.normalize(tokens.reshape(-1, d).float().cpu(), dim=1)
        _, idx = knn_search(bank, q, kmax, memory_mb=p.memory_mb)
        neigh = shares[idx]  # (Q, k, C), best first
        return {
            k: neigh[:, : min(k, kmax)].mean(1).reshape(n, h, w, classes).permute(0, 3, 1, 2)
            for k in ks
        }

    # k chosen on the validation rows' crops (at the crop resolution: a choice only)
    val_rows = np.sort(np.asarray(inp.val_idx, dtype=np.int64))
    val_miou = {}
    if len(val_rows) and len(p.ks) > 1:
        vsrc = token_source(
            crop_backbone(inp.backbone, size), inp.bundle, "train", val_rows,
            budget_bytes=p.token_budget_mb * 2**20, device=inp.device,
            batch_size=inp.batch_size, cache_dir=cache_of(inp), num_workers=inp.num_workers,
        )  # fmt: skip
        vt = TargetBank(dense.train, val_rows, size, False, p.target_budget_mb * 2**20)
        scorers = {k: SegmentationScorer(classes, IGNORE) for k in p.ks}
        for take, tokens, _ in vsrc.batches(val_rows, shared=True):
            t = vt.get(take)
            for k, sc in vote(tokens, p.ks).items():
                up = F.interpolate(sc, size=t.shape[-2:], mode="bilinear", align_corners=False)
                for pr, tg in zip(up.argmax(1).numpy(), t.numpy(), strict=True):
                    scorers[k].add(pr, tg)
        val_miou = {k: s.results(resamples=0)["miou"] for k, s in scorers.items()}
        best_k = max(p.ks, key=lambda k: (val_miou[k], -k))
    else:
        best_k = p.ks[0]
    out = score_segmentation(
        inp,
        p,
        dense,
        lambda tokens, prefix: vote(tokens, (best_k,))[best_k],
        src.record()
        | {
            "k": best_k,
            **(grid_edges(edge("ks", p.ks, [best_k], floor=1)) if val_miou else {}),
            "val_miou_at_crop": {str(k): v for k, v in val_miou.items()},
            "bank_patches": len(bank),
        },
    )
    return out


PROTOCOL_TYPES.register(
    "knnseg",
    ProtocolType(
        "knnseg", KnnsegParams, run_knnseg, inputs="images", seeded=False, dense="segmentation"
    ),
)
