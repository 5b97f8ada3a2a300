"""Invariance probes: what a representation can still tell apart, and what it cannot.

On a dataset whose images carry several factors (``shapes``: shape, colour, size, position):

* **decodability** of each factor: a linear classifier (standardised features, logistic
  regression, C chosen on the validation rows) trained on a subset of the training rows with
  that factor's labels, scored on a subset of test images: ``decode_<factor>`` (test top-1,
  with per-image correctness, so its interval is the bootstrap over test images);
* **invariance** to each augmentation (crop, colour jitter, blur, grayscale, flip): the mean
  cosine similarity between the features of a test image and of its augmented version,
  against the mean over pairs of different test images as the reference:
  ``inv_<aug> = (sim_aug - sim_pairs) / (1 - sim_pairs)`` (1: the augmentation changes nothing
  in the features; 0: it moves an image as far as another image is). Features are centred on
  the clean test images' mean first, so a constant offset (raw pixels are all positive) does
  not count as similarity. The raw similarities are in ``details``.

The augmented images are drawn per (seed, image index, augmentation), so every backbone is
probed with the same inputs (ssl_eval/data/views.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import UserError
from ..data.views import AUGMENTATIONS, augment_all
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType, embed_images


@dataclass(frozen=True)
class InvarianceParams:
    train_images: int = 2000  # training rows the decoders learn from
    val_images: int = 500  # validation rows that choose C
    test_images: int = 1000
    logreg_cs: tuple[float, ...] = (0.01, 0.1, 1.0)
    augmentations: tuple[str, ...] = AUGMENTATIONS
    crop_scale: tuple[float, float] = (0.3, 1.0)
    jitter: float = 0.6  # brightness, contrast, saturation factors in [1 - j, 1 + j]
    hue: float = 0.4
    blur_sigma: float = 1.0
    seed: int = 0  # the augmentation draws and subsets (fixed: the same for every backbone)

    def __post_init__(self) -> None:
        if min(self.train_images, self.val_images, self.test_images) < 10:
            raise UserError("invariance: train_images, val_images and test_images must be >= 10")
        bad = sorted(set(self.augmentations) - set(AUGMENTATIONS))
        if bad:
            raise UserError(
                f"invariance: unknown augmentation(s) {bad}; known: {list(AUGMENTATIONS)}"
            )
        if not self.logreg_cs or min(self.logreg_cs) <= 0:
            raise UserError("invariance: logreg_cs is a non-empty list of positive numbers")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise UserError("invariance: crop_scale is [min, max] with 0 < min <= max <= 1")


def _subset(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(idx)[: min(n, len(idx))])


def _images(split, idx: np.ndarray) -> np.ndarray:
    return np.stack([split.load(int(i)) for i in idx])


MAX_ITER = 200


def decode(tr_x, tr_y, va_x, va_y, te_x, te_y, cs) -> tuple[np.ndarray, float, dict, list]:
    """Per-test-image correctness of the logistic regression whose C is best on validation,
    that C, the validation scores, and the Cs whose fit stopped at ``MAX_ITER`` iterations
    (recorded, not hidden)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(tr_x)
    tr, va, te = sc.transform(tr_x), sc.transform(va_x), sc.transform(te_x)
    best, best_c, scores, capped = None, None, {}, []
    for c in cs:  # grid order: the smallest C wins ties
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=c, max_iter=MAX_ITER, tol=1e-3).fit(tr, tr_y)
        if int(np.max(clf.n_iter_)) >= MAX_ITER:
            capped.append(c)
        scores[str(c)] = float((clf.predict(va) == va_y).mean())
        if best is None or scores[str(c)] > scores[str(best_c)]:
            best, best_c = clf, c
    return best.predict(te) == te_y, best_c, scores, capped


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(an * bn, axis=1)))


def invariance_score(
    clean: np.ndarray, augmented: np.ndarray, rng: np.random.Generator
) -> tuple[float, float, float]:
    """(score, sim_aug, sim_pairs) on centred features; pairs are a derangement of the rows."""
    mu = clean.mean(axis=0, keepdims=True)
    c, a = clean - mu, augmented - mu
    n = len(c)
    perm = (np.arange(n) + rng.integers(1, n)) % n  # a cyclic shift: never an image with itself
    s_aug, s_pairs = mean_cosine(c, a), mean_cosine(c, c[perm])
    return (s_aug - s_pairs) / max(1.0 - s_pairs, 1e-12), s_aug, s_pairs


def run_invariance(inp: ImageInputs, p: InvarianceParams) -> ProtocolOutput:
    bundle = inp.bundle
    if not bundle.factors:
        raise UserError(
            f"invariance needs a dataset whose images carry several factor labels (shapes); "
            f"{bundle.name} has one label set"
        )
    rng = np.random.default_rng(p.seed)
    tr_i = _subset(np.asarray(inp.train_idx), p.train_images, rng)
    va_i = _subset(np.asarray(inp.val_idx), p.val_images, rng)
    te_i = _subset(np.arange(len(bundle.test)), p.test_images, rng)
    embed = lambda imgs: embed_images(inp.backbone, imgs, inp.device)  # noqa: E731
    te_img = _images(bundle.test, te_i)
    f_tr = embed(_images(bundle.train, tr_i))
    f_va = embed(_images(bundle.train, va_i))
    f_te = embed(te_img)
    metrics, per_sample = {}, {}
    details = {"chance": {}, "selected_c": {}, "val_top1": {}, "iteration_capped_c": {}}
    for factor, labels in bundle.factors["train"].items():
        te_labels = bundle.factors["test"][factor]
        ok, c, scores, capped = decode(
            f_tr, labels[tr_i], f_va, labels[va_i], f_te, te_labels[te_i], p.logreg_cs
        )
        metrics[f"decode_{factor}"] = float(ok.mean())
        per_sample[f"decode_{factor}"] = ok
        details["chance"][factor] = float(np.bincount(te_labels[te_i]).max() / len(te_i))
        details["selected_c"][factor], details["val_top1"][factor] = c, scores
        details["iteration_capped_c"][factor] = capped
    strength = {
        "crop_scale": p.crop_scale,
        "jitter": p.jitter,
        "hue": p.hue,
        "blur_sigma": p.blur_sigma,
    }
    details["similarity"] = {}
    for aug in p.augmentations:
        f_aug = embed(augment_all(te_img, te_i, aug, p.seed, strength))
        score, s_aug, s_pairs = invariance_score(f_te, f_aug, np.random.default_rng(p.seed))
        metrics[f"inv_{aug}"] = score
        details["similarity"][aug] = {"augmented": s_aug, "other_images": s_pairs}
    details["images"] = {"train": len(tr_i), "val": len(va_i), "test": len(te_i)}
    return ProtocolOutput(metrics, details, per_sample=per_sample)


def preflight_invariance(p: InvarianceParams, shape) -> None:
    if shape.val < 2:
        raise UserError("invariance chooses C on the validation rows; the split has none")


PROTOCOL_TYPES.register(
    "invariance",
    ProtocolType(
        "invariance",
        InvarianceParams,
        run_invariance,
        inputs="images",
        seeded=False,
        preflight=preflight_invariance,
    ),
)
