"""``shapes``: a procedurally generated RGB dataset, deterministic from a seed.

Each image holds one shape on a textured background. Four independent label sets:
  shape    circle, square, triangle, plus, ring, star (6 classes; the default label)
  colour   red, green, blue, yellow, magenta, cyan (6)
  size     small, medium, large (3)
  position the quadrant of the shape's centre (4)
Backgrounds are two random colours mixed by a pair of sinusoidal gratings plus noise, so
raw pixels are a weak representation of the shape while convolutional features do better:
the data separates good and bad representations, and 12,000 images at 32x32 take seconds
to generate on one CPU core.
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
GENERATOR_VERSION = 1  # bump when the rendering changes: it is part of every cache key
_SUPERSAMPLE = 2
_SIZE_RANGES = ((0.17, 0.21), (0.23, 0.27), (0.29, 0.34))  # radius as a fraction of the side


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


def generate(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return ``(images uint8 (n, size, size, 3), {label_set: int64 labels})``."""
    rng = np.random.default_rng(seed)
    s2 = size * _SUPERSAMPLE
    yy, xx = np.mgrid[0:s2, 0:s2].astype(np.float32) / s2  # coordinates in [0, 1)
    labels = {name: rng.integers(0, len(vals), n) for name, vals in LABEL_SETS.items()}
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        # background: two colours mixed by two gratings, plus pixel noise
        c1 = rng.uniform(30, 225, 3)
        c2 = np.clip(c1 + rng.normal(0, 45, 3), 0, 255)
        mix = np.zeros_like(xx)
        for _ in range(2):
            ang, freq, ph = rng.uniform(0, np.pi), rng.uniform(2, 9), rng.uniform(0, 2 * np.pi)
            mix += np.sin(2 * np.pi * freq * (xx * np.cos(ang) + yy * np.sin(ang)) + ph)
        mix = (mix / 4 + 0.5)[..., None]
        img = c1 * mix + c2 * (1 - mix) + rng.normal(0, 8, (s2, s2, 3))
        # the shape
        lo, hi = _SIZE_RANGES[labels["size"][i]]
        r = rng.uniform(lo, hi)
        q = labels["position"][i]
        cx = (0.25 if q % 2 == 0 else 0.75) + rng.uniform(-0.06, 0.06)
        cy = (0.25 if q < 2 else 0.75) + rng.uniform(-0.06, 0.06)
        m = _mask(SHAPES[labels["shape"][i]], xx - cx, yy - cy, r, rng.uniform(0, 2 * np.pi))
        colour = palette[labels["colour"][i]] + rng.normal(0, 15, 3)
        img[m] = colour + rng.normal(0, 6, (int(m.sum()), 3))
        img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels
