"""``shapes``: a procedurally generated RGB dataset, deterministic from a seed.

Each image holds one shape on a noisy plain background. Four independent label sets:
  shape    circle, square, triangle, plus, ring, star (6 classes; the default label)
  colour   red, green, blue, yellow, magenta, cyan (6)
  size     small, medium, large (3)
  position the quadrant of the shape's centre (4)
Backgrounds are one random colour plus pixel noise, and each shape sits anywhere within its
quadrant (centre jittered by up to 12% of the side), in a random colour, rotation and size, so
raw pixels, which compare images position by position and are dominated by colour, are a weak
representation of the shape, while features invariant to where and in what colour a shape
appears do better: the data separates good and bad representations, and 12,000 images at
32x32 take seconds to generate on one CPU core.

Version 2 (the suite's data; measured on the validation split, 16x16, k-NN): version 1 mixed
two colours by fine gratings (2-9 cycles) and held shapes within 6% of the quadrant centre.
There, self-supervised methods at a CPU budget learnt the background (a grating survives
cropping and colour jitter, so it identifies an image) rather than the shape, and pixels
matched shapes by position: SimCLR with a small CIFAR-stem ResNet, 20 epochs on 4,000 images,
reached 28-34% against pixels' 33%. Slow gratings and looser positions gave pixels 29.6% and
SimCLR 35.7%; plain backgrounds with loose positions, pixels 29.5% and SimCLR 47.5%.

Those figures are historical: they came from an earlier training recipe, and nothing
committed reproduces them. ``generate(..., generator=1)`` still renders version 1 byte for
byte, so the comparison can be measured again with the suite's current recipe
(``python benchmarks/suite_sizing.py --sweep``, results/sizing/sweep.md). In that run, one
training each, v1 against v2 gave pixels 33.2% against 31.9%, SimCLR 45.8% against 42.7% and
the supervised model 53.6% against 63.4%. The registered ``shapes`` datasets use the default,
``GENERATOR_VERSION``, and carry it in their fingerprint.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "plus", "ring", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
}
SIZES = ("small", "medium", "large")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
LABEL_SETS = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
}
GENERATOR_VERSION = 2  # bump when the rendering changes: it is part of every cache key
GENERATORS = (1, 2)  # the versions ``generate`` can still render
_SUPERSAMPLE = 2
# per version: radius ranges (fraction of the side), quadrant centre, position jitter (x and y)
_SIZE_RANGES = {
    1: ((0.17, 0.21), (0.23, 0.27), (0.29, 0.34)),
    2: ((0.18, 0.22), (0.24, 0.28), (0.30, 0.34)),
}
_QUADRANT_CENTRE = {1: 0.25, 2: 0.3}  # centre of a quadrant's shapes, as a fraction of the side
_POSITION_JITTER = {1: 0.06, 2: 0.12}  # shapes move up to this far from it (x and y)


def _mask(kind: str, u: np.ndarray, v: np.ndarray, r: float, theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    ur, vr = c * u + s * v, -s * u + c * v
    rho = np.hypot(u, v)
    if kind == "circle":
        return rho <= r
    if kind == "square":
        return np.maximum(np.abs(ur), np.abs(vr)) <= 0.8 * r
    if kind == "triangle":
        m = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = theta + 2 * np.pi * k / 3
            m &= u * np.cos(a) + v * np.sin(a) <= 0.5 * r
        return m
    if kind == "plus":
        arm = 0.32 * r
        return ((np.abs(ur) <= arm) & (np.abs(vr) <= r)) | ((np.abs(vr) <= arm) & (np.abs(ur) <= r))
    if kind == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if kind == "star":
        phi = np.arctan2(v, u)
        return rho <= r * (0.62 + 0.38 * np.cos(5 * (phi - theta)))
    raise ValueError(kind)


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, generator: int):
    if generator == 1:  # two colours mixed by two fine gratings, plus pixel noise
        c1 = rng.uniform(30, 225, 3)
        c2 = np.clip(c1 + rng.normal(0, 45, 3), 0, 255)
        mix = np.zeros_like(xx)
        for _ in range(2):
            ang, freq, ph = rng.uniform(0, np.pi), rng.uniform(2, 9), rng.uniform(0, 2 * np.pi)
            mix += np.sin(2 * np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)) + ph)
        mix = (mix / 4 + 0.5)[..., None]
        return c1 * mix + c2 * (1 - mix) + rng.normal(0, 8, (*xx.shape, 3))
    # one random colour plus pixel noise
    bg = rng.uniform(30, 225, 3)
    return bg + rng.normal(0, 8, (*xx.shape, 3)) + np.zeros_like(xx)[..., None]


def generate(
    n: int, size: int = 32, seed: int = 0, generator: int = GENERATOR_VERSION
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return ``(images uint8 (n, size, size, 3), {label_set: int64 labels})``, rendered by
    generator version ``generator`` (one of ``GENERATORS``)."""
    images, labels, _, _ = _render(n, size, seed, generator, dense=False)
    return images, labels


def generate_dense(
    n: int, size: int = 32, seed: int = 0, generator: int = GENERATOR_VERSION
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``generate``'s images and labels (the same bytes: the masks and depth are computed from
    the drawing parameters, no random number more is drawn), plus per image

    * ``masks`` uint8 (n, size, size): 0 background, 1 + the shape's class where the shape
      covers at least half of the pixel's supersampled area (``DENSE_CLASSES``);
    * ``depth`` float32 (n, size, size), in metres: a ground plane receding upwards (from
      ``DEPTH_NEAR_FLOOR`` m at the bottom row to ``DEPTH_FAR_FLOOR`` m at the top) and the shape
      standing in front of it at ``DEPTH_SCALE / r`` m (r: its radius as a fraction of the side,
      so a larger shape is nearer), averaged over each pixel's supersampled area."""
    return _render(n, size, seed, generator, dense=True)


DENSE_CLASSES = ("background", *SHAPES)  # the segmentation classes of ``generate_dense``
DEPTH_NEAR_FLOOR, DEPTH_FAR_FLOOR, DEPTH_SCALE = 3.0, 6.0, 0.5


def _render(n: int, size: int, seed: int, generator: int, dense: bool):
    if generator not in GENERATORS:
        raise ValueError(f"shapes generator {generator!r}: one of {list(GENERATORS)}")
    rng = np.random.default_rng(seed)
    s2 = size * _SUPERSAMPLE
    yy, xx = np.mgrid[0:s2, 0:s2].astype(np.float32) / s2  # coordinates in [0, 1)
    labels = {name: rng.integers(0, len(vals), n) for name, vals in LABEL_SETS.items()}
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8) if dense else None
    depth = np.empty((n, size, size), dtype=np.float32) if dense else None
    floor = DEPTH_FAR_FLOOR + (DEPTH_NEAR_FLOOR - DEPTH_FAR_FLOOR) * yy  # far at the top

    def pool(a: np.ndarray) -> np.ndarray:  # supersampled -> pixel: the mean of each block
        return a.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))

    for i in range(n):
        img = _background(rng, xx, yy, generator)
        # the shape
        lo, hi = _SIZE_RANGES[generator][labels["size"][i]]
        r = rng.uniform(lo, hi)
        q = labels["position"][i]
        c, j = _QUADRANT_CENTRE[generator], _POSITION_JITTER[generator]
        cx = (c if q % 2 == 0 else 1 - c) + rng.uniform(-j, j)
        cy = (c if q < 2 else 1 - c) + rng.uniform(-j, j)
        m = _mask(SHAPES[labels["shape"][i]], xx - cx, yy - cy, r, rng.uniform(0, 2 * np.pi))
        colour = palette[labels["colour"][i]] + rng.normal(0, 15, 3)
        img[m] = colour + rng.normal(0, 6, (int(m.sum()), 3))
        img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
        if dense:
            cover = pool(m.astype(np.float32))
            masks[i][cover >= 0.5] = 1 + labels["shape"][i]
            depth[i] = pool(np.where(m, np.float32(DEPTH_SCALE / r), floor))
    return images, labels, masks, depth
