"""SimCLR's image geometry (google-research/simclr data_util.py, TF1): the bicubic resize
of TensorFlow 1's ``tf.image.resize_bicubic`` and the evaluation ``center_crop``.

``tf.image.resize_bicubic`` (TF1's default: align_corners and half_pixel_centers false) is the
legacy kernel of resize_bicubic_op.cc: output pixel i reads input position i x in / out (no
half-pixel offset), the cubic convolution kernel with a = -0.75 read from a table of 1024
steps per pixel, the four taps' indices clamped to the image; no antialiasing. SimCLR resizes
float images in [0, 1] and keeps floats; here the result is rounded to uint8 (at most half a
grey level from TF's values, the images every probe reads being uint8).

``center_crop(image, 224, 224, 0.875)``: a square of side rint(0.875 x the shorter side) (the
aspect ratio 1 of the output), its corner at ((H - h + 1) // 2, (W - w + 1) // 2), resized
bicubic (as above) to the input size.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ._images import TrainImages

TABLE = 1024  # resize_bicubic_op.cc kTableSize


def _cubic_table(a: float = -0.75) -> np.ndarray:
    """(TABLE + 1, 2) float32: the kernel at distance x = i / TABLE (near tap) and 1 + x (far
    tap), as InitCoeffsTable fills it."""
    x = (np.arange(TABLE + 1) * 1.0 / TABLE).astype(np.float32).astype(np.float64)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    x1 = x + 1.0
    far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
    return np.stack([near, far], 1).astype(np.float32)


_TABLE = _cubic_table()


@functools.lru_cache(maxsize=4096)
def tf1_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TF1's legacy bicubic resize along one axis, as GetWeightsAndIndices computes it:
    (n_out, 4) input indices (clamped to the image) and float32 weights."""
    scale = np.float32(n_in) / np.float32(n_out)
    pos = np.arange(n_out, dtype=np.float32) * scale  # LegacyScaler: no half-pixel offset
    base = np.floor(pos).astype(np.int64)
    off = np.rint((pos - base.astype(np.float32)) * np.float32(TABLE)).astype(np.int64)
    w = np.stack(
        [_TABLE[off, 1], _TABLE[off, 0], _TABLE[TABLE - off, 0], _TABLE[TABLE - off, 1]], 1
    )
    idx = np.clip(base[:, None] + np.arange(-1, 3), 0, n_in - 1)
    return torch.from_numpy(idx), torch.from_numpy(w)


def tf1_weights(n_in: int, n_out: int) -> torch.Tensor:
    """The same resize as an (n_out, n_in) float64 matrix (a clamped tap adds to the edge)."""
    idx, w = tf1_taps(n_in, n_out)
    W = torch.zeros(n_out, n_in, dtype=torch.float64)
    W.scatter_add_(1, idx, w.double())
    return W


def tf1_bicubic(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 CHW -> uint8 CHW at ``size`` (h, w): TF1's resize_bicubic of img / 255 in
    float32, rows first and then columns as TF, times 255, rounded and clipped."""
    x = img.permute(1, 2, 0).float().div_(255.0)  # (H, W, C), rows gathered whole
    iy, wy = tf1_taps(img.shape[-2], size[0])
    ix, wx = tf1_taps(img.shape[-1], size[1])
    rows = x[iy[:, 0]] * wy[:, 0, None, None]
    for k in range(1, 4):
        rows.add_(x[iy[:, k]] * wy[:, k, None, None])  # (h, W, C)
    cols = rows.transpose(0, 1).contiguous()  # (W, h, C)
    out = cols[ix[:, 0]] * wx[:, 0, None, None]
    for k in range(1, 4):
        out.add_(cols[ix[:, k]] * wx[:, k, None, None])  # (w, h, C)
    return out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(2, 1, 0).contiguous()


def simclr_centre_box(H: int, W: int, fraction: float) -> tuple[int, int, int, int]:
    """(top, left, h, w) of data_util.center_crop's box for a square output: the shorter side
    times ``fraction`` (tf.rint, half to even), centred with the extra pixel below and right."""
    f32 = np.float32
    if f32(1.0) > f32(W) / f32(H):  # _requested_aspect_ratio_wider_than_image
        side = int(np.rint(f32(fraction) / f32(1.0) * f32(W)))
    else:
        side = int(np.rint(f32(fraction) * f32(H)))
    return (H - side + 1) // 2, (W - side + 1) // 2, side, side


def resize(img: torch.Tensor, size: list[int], interpolation: str) -> torch.Tensor:
    """``img`` resized to ``size`` with TF1's bicubic (``tf1_bicubic``) or torchvision's
    (antialiased) ``interpolation``."""
    if interpolation == "tf1_bicubic":
        return tf1_bicubic(img, (size[0], size[1]))
    return TF.resize(img, size, interpolation=InterpolationMode(interpolation), antialias=True)


class ScriptImages(TrainImages):
    """:class:`TrainImages` with a script's geometry: training crops (the same draws) resized
    with ``train_resize``; evaluation images, with ``eval_fraction`` > 0, SimCLR's centre box
    resized with ``eval_resize`` to the input size (0: the backbone's preprocessing). One
    image at a time."""

    def __init__(self, *args, train_resize: str, eval_fraction: float, eval_resize: str, **kw):
        super().__init__(*args, **kw)
        self.train_resize, self.eval_fraction = train_resize, eval_fraction
        self.eval_resize = eval_resize

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        full = torch.from_numpy(np.ascontiguousarray(self.split.load(j))).permute(2, 0, 1)
        label = int(self.split.labels[j])
        size = [self.pre.crop] * 2
        if not self.augment:
            if not self.eval_fraction:
                return super().__getitem__(i)
            top, left, h, w = simclr_centre_box(full.shape[-2], full.shape[-1], self.eval_fraction)
            box = full[:, top : top + h, left : left + w]
            return resize(box, size, self.eval_resize).contiguous(), label
        draw, (top, left, h, w), flip = self._draws(j, full.shape[-2:])
        img = resize(full[:, top : top + h, left : left + w], size, self.train_resize)
        return self._finish(TF.horizontal_flip(img) if flip else img, draw), label

    def __getitems__(self, items: list[int]) -> list:
        return [self[i] for i in items]
