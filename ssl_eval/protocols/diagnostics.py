"""Label-free diagnostics of a representation, on a subset of test images:

* ``rankme``: the effective rank of the feature matrix (Garrido et al. 2023, RankMe):
  exp of the entropy of its singular values normalised to sum 1 (epsilon 1e-7 as the paper);
  between 1 (collapsed) and min(N, D);
* ``alignment`` (Wang & Isola 2020): the mean squared distance between the L2-normalised
  features of two augmentations of the same image (crop + colour jitter + flip, seeded per
  image, the same for every backbone); 0 is perfectly aligned, 4 the maximum;
* ``uniformity`` (Wang & Isola 2020): log of the mean of exp(-2 ||f(x) - f(y)||^2) over pairs of
  different images' normalised features; 0 when every image maps to one point, lower
  (down to about -4 in high dimension) when features spread over the sphere.

None of them uses a label; the report shows how well each predicts linear accuracy across a
suite's backbones (rank correlation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import UserError
from ..data.views import augment_all
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType, embed_images

RANKME_EPS = 1e-7


def rankme(features: np.ndarray) -> float:
    s = np.linalg.svd(np.asarray(features, dtype=np.float64), compute_uv=False)
    p = s / (s.sum() + RANKME_EPS) + RANKME_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def alignment(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum((_normalise(a) - _normalise(b)) ** 2, axis=1)))


def uniformity(x: np.ndarray, t: float = 2.0) -> float:
    z = _normalise(x)
    sq = np.maximum(2.0 - 2.0 * (z @ z.T), 0.0)  # squared distances of unit vectors
    iu = np.triu_indices(len(z), k=1)
    v = -t * sq[iu]
    m = v.max()
    return float(m + np.log(np.mean(np.exp(v - m))))


@dataclass(frozen=True)
class DiagnosticsParams:
    images: int = 1000  # test images the diagnostics are computed on
    crop_scale: tuple[float, float] = (0.3, 1.0)
    jitter: float = 0.4
    hue: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 10:
            raise UserError("diagnostics: images must be at least 10")


def _two_views(img: np.ndarray, idx: np.ndarray, p: DiagnosticsParams, view: int) -> np.ndarray:
    s = {"crop_scale": p.crop_scale, "jitter": p.jitter, "hue": p.hue, "blur_sigma": 1.0}
    seed = p.seed * 2 + view
    out = augment_all(img, idx, "crop", seed, s)
    out = augment_all(out, idx, "colour", seed, s)
    flip = np.random.default_rng([seed, 7]).random(len(idx)) < 0.5
    out[flip] = out[flip][:, :, ::-1]
    return out


def run_diagnostics(inp: ImageInputs, p: DiagnosticsParams) -> ProtocolOutput:
    test = inp.bundle.test
    rng = np.random.default_rng(p.seed)
    idx = np.sort(rng.permutation(len(test))[: min(p.images, len(test))])
    img = np.stack([test.load(int(i)) for i in idx])
    embed = lambda x: embed_images(inp.backbone, x, inp.device)  # noqa: E731
    clean = embed(img)
    a, b = embed(_two_views(img, idx, p, 0)), embed(_two_views(img, idx, p, 1))
    metrics = {
        "rankme": rankme(clean),
        "alignment": alignment(a, b),
        "uniformity": uniformity(clean),
    }
    details = {"images": len(idx), "feature_dim": int(clean.shape[1])}
    return ProtocolOutput(metrics, details)


PROTOCOL_TYPES.register(
    "diagnostics",
    ProtocolType("diagnostics", DiagnosticsParams, run_diagnostics, inputs="images", seeded=False),
)
