"""Dense metrics, scored on each test image's full-resolution target.

Segmentation (mmsegmentation's definitions, as DINOv2/DINOv3 report them): per class, the
intersection and union of predicted and labelled pixels summed over the test set, pixels
labelled ``ignore`` left out; IoU = intersection / union; mIoU the mean over the classes whose
union is not empty; pixel accuracy (mmseg's aAcc) = correct / labelled pixels. The interval
resamples test images and recomputes mIoU from their summed areas.

Depth (DINOv3's eval/depth/eval.py and metrics.py, per image, then averaged over images): the
prediction clamped to ``depth_range``; the valid pixels are those whose target lies strictly
inside ``depth_range`` (the official evaluation sets targets >= max or <= min to its ignored
value 0) and inside the evaluation box, a target of 0 never valid: RMSE, AbsRel =
mean |pred - gt| / gt, delta1 = share with max(pred/gt, gt/pred) < 1.25. Intervals: the
bootstrap over test images of the per-image values. Which metrics are errors (lower is
better) is ``records.schema.LOWER_IS_BETTER``, the one list the gate and the reports read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...core.errors import UserError
from ...core.stats import bootstrap_ci, bootstrap_sum_ci


def _check_full_resolution(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise UserError(
            f"a prediction of {pred.shape} scored against a target of {target.shape}: dense "
            "scores are computed on the target's full resolution; upsample the prediction"
        )


@dataclass
class SegmentationScorer:
    """Accumulates per-image areas; ``add(pred, target)`` per test image (full resolution)."""

    num_classes: int
    ignore_index: int = 255
    rows: list = field(default_factory=list)  # per image: intersect, pred area, label area (C)

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        self.add_row(self.row(pred, target))

    def add_row(self, areas: np.ndarray) -> None:
        self.rows.append(areas)

    def row(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        """One test image's areas (intersection, predicted, labelled; C each), for ``rows``."""
        _check_full_resolution(pred, target)
        keep = target != self.ignore_index
        p, t = pred[keep].astype(np.int64), target[keep].astype(np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.num_classes):
            raise UserError(
                f"target class {int(t.max())} outside 0..{self.num_classes - 1} (ignore "
                f"{self.ignore_index}): the dataset's labels do not match its class list"
            )
        c = self.num_classes
        inter = np.bincount(t[p == t], minlength=c)[:c]
        return np.concatenate(
            [inter, np.bincount(p, minlength=c)[:c], np.bincount(t, minlength=c)[:c]]
        )

    def parts(self) -> np.ndarray:
        return np.stack(self.rows).astype(np.float64)

    def _stats(self, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = self.num_classes
        inter, pred, label = sums[..., :c], sums[..., c : 2 * c], sums[..., 2 * c :]
        union = pred + label - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, inter / union, np.nan)
            acc = inter.sum(-1) / label.sum(-1)
        return iou, np.nanmean(iou, axis=-1), acc

    def results(self, resamples: int = 1000, seed: int = 0) -> dict:
        """{"miou", "pixel_acc", "per_class_iou" (None where a class is absent), "intervals"}."""
        parts = self.parts()
        iou, miou, acc = self._stats(parts.sum(0))
        c = self.num_classes
        out = {
            "miou": float(miou),
            "pixel_acc": float(acc),
            "per_class_iou": [None if np.isnan(v) else round(float(v), 6) for v in iou],
        }
        if not resamples:  # a choice on validation: the value alone
            return out
        return out | {
            "intervals": {
                "miou": bootstrap_sum_ci(parts, lambda s: self._stats(s)[1], resamples, seed),
                "pixel_acc": bootstrap_sum_ci(
                    parts[:, [*range(c), *range(2 * c, 3 * c)]],
                    lambda s: s[:, :c].sum(1) / s[:, c:].sum(1),
                    resamples,
                    seed,
                ),
            },
        }


def valid_depth(
    target: np.ndarray, depth_range: tuple[float, float] | None, eval_box=None
) -> np.ndarray:
    """The pixels a depth score counts: a measured depth strictly inside ``depth_range``,
    inside ``eval_box`` (y1, y2, x1, x2 as fractions, scaled to the target's size as DINOv3
    does)."""
    valid = target > 0
    if depth_range is not None:
        valid &= (target > depth_range[0]) & (target < depth_range[1])
    if eval_box is not None:
        h, w = target.shape
        y1, y2, x1, x2 = eval_box
        box = np.zeros_like(valid)
        box[int(y1 * h) : int(y2 * h), int(x1 * w) : int(x2 * w)] = True
        valid &= box
    return valid


@dataclass
class DepthScorer:
    depth_range: tuple[float, float] | None = None
    eval_box: tuple[float, float, float, float] | None = None
    per_image: dict = field(default_factory=lambda: {"rmse": [], "abs_rel": [], "delta1": []})

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        self.add_row(self.row(pred, target))

    def row(self, pred: np.ndarray, target: np.ndarray) -> dict | None:
        """One test image's metrics on its valid pixels; None when it has none (an image
        without a valid pixel scores nothing, as the official metric)."""
        _check_full_resolution(pred, target)
        valid = valid_depth(target, self.depth_range, self.eval_box)
        if not valid.any():
            return None
        gt = target[valid].astype(np.float64)
        pr = pred[valid].astype(np.float64)
        if self.depth_range is not None:  # the official clamp to the evaluation range
            pr = np.clip(pr, self.depth_range[0], self.depth_range[1])
        pr = np.maximum(pr, 1e-6)  # without a range: a depth is positive
        err = pr - gt
        return {
            "rmse": np.sqrt(np.mean(err**2)),
            "abs_rel": np.mean(np.abs(err) / gt),
            "delta1": np.mean(np.maximum(pr / gt, gt / pr) < 1.25),
        }

    def add_row(self, row: dict | None) -> None:
        if row is not None:
            for k, v in row.items():
                self.per_image[k].append(v)

    def results(self, resamples: int = 1000, seed: int = 0) -> dict:
        if not self.per_image["rmse"]:
            raise UserError("no test image has a valid depth pixel: nothing to score")
        arrays = {k: np.asarray(v) for k, v in self.per_image.items()}
        return {
            **{k: float(v.mean()) for k, v in arrays.items()},
            "per_image": arrays,
            "intervals": {k: bootstrap_ci(v, resamples, seed) for k, v in arrays.items()},
        }
