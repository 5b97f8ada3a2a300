"""The metrics a dataset may declare besides top-1 (``DatasetBundle.metric``, data/transfer.py):

* ``mean_per_class``: the mean over classes of each class's top-1 accuracy, derived from a
  protocol's per-image top-1 hits and the test labels (FGVC-Aircraft, Caltech-101,
  Flowers-102, Oxford-IIIT Pets, as the transfer literature reports them);
* ``map11``: the mean over classes of the VOC2007 devkit's 11-point interpolated average
  precision (VOCevalcls.m of VOCdevkit_08-Jun-2007), from per-image class scores.

Neither is a mean over test images, so each comes with the function that recomputes it on a
resample of the test images (``ProtocolOutput.resampled``): its interval is the plain bootstrap
over test images, the metric recomputed on each resample; a class absent from a resample (no
image, or for AP no positive) is left out of that resample's mean."""

from __future__ import annotations

import numpy as np

from .base import ProtocolOutput

DATASET_METRICS = ("top1", "mean_per_class", "map11")


def mean_per_class_accuracy(hits: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present in ``labels`` of the share of their images hit."""
    labels = np.asarray(labels, dtype=np.int64)
    hits = np.asarray(hits, dtype=np.float64)
    counts = np.bincount(labels)
    present = counts > 0
    per_class = np.bincount(labels, weights=hits, minlength=len(counts))[present] / counts[present]
    return float(per_class.mean())


def ap11(scores: np.ndarray, gt: np.ndarray) -> float:
    """VOC2007's 11-point interpolated AP of one class. ``gt``: 1 positive, -1 negative, 0 an
    image with only difficult objects (neither a true nor a false positive). Images are ranked
    by decreasing score, ties in their given order (MATLAB's stable sort of ``-out``); the
    precision at each recall threshold t = 0, 0.1, ..., 1 (``np.arange(0, 1.1, 0.1)``) is the highest precision at a recall
    of at least t (0 where none reaches t), and the AP is their mean. NaN without positives."""
    gt = np.asarray(gt)
    npos = int((gt > 0).sum())
    if npos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.cumsum(gt[order] > 0)
    fp = np.cumsum(gt[order] < 0)
    rec = tp / npos
    with np.errstate(invalid="ignore"):  # difficult images first: 0/0, skipped as MATLAB's max
        prec = tp / (tp + fp)
    prec = np.where(np.isnan(prec), -np.inf, prec)
    # the best precision at recall >= t: a running maximum from the end, read at the first
    # rank whose recall reaches t
    best_after = np.maximum.accumulate(prec[::-1])[::-1]
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):  # the thresholds of the devkit's Python ports, exactly
        i = np.searchsorted(rec, t, side="left")  # rec is non-decreasing
        p = best_after[i] if i < len(rec) else 0.0
        ap += max(p, 0.0) / 11.0
    return float(ap)


def map11(scores: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
    """(mean AP over the classes with a positive, AP of each class: NaN without positives)."""
    aps = [ap11(scores[:, c], targets[:, c]) for c in range(targets.shape[1])]
    valid = [a for a in aps if a == a]
    return (float(np.mean(valid)) if valid else float("nan")), aps


def with_dataset_metric(
    out: ProtocolOutput, metric: str, test_labels: np.ndarray
) -> ProtocolOutput:
    """``out`` with the dataset's declared metric added where it is derived from per-image
    top-1 hits (``mean_per_class``); ``top1`` and ``map11`` (computed by the multi-label
    protocol itself) leave it as it is."""
    if metric != "mean_per_class" or "top1" not in out.per_sample:
        return out
    hits = np.asarray(out.per_sample["top1"], dtype=np.float64)
    labels = np.asarray(test_labels, dtype=np.int64)
    out.metrics["mean_per_class"] = mean_per_class_accuracy(hits, labels)
    out.resampled["mean_per_class"] = lambda idx: mean_per_class_accuracy(hits[idx], labels[idx])
    return out
