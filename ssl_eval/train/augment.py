"""Batched, seeded SSL augmentations on float tensors (N, 3, H, W) in [0, 1].

Every operation draws its per-image parameters from an explicit ``torch.Generator`` and
applies them to the whole batch at once (no per-image Python loop): random resized crops
through ``roi_align``, colour jitter as per-image blends, blur as one grouped convolution.
The order follows SimCLR/BYOL: crop, flip, colour jitter (brightness, contrast, saturation,
hue, in that fixed order), grayscale, blur, solarise, normalise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from .config import AugConfig, ViewAug

_GRAY = torch.tensor([0.299, 0.587, 0.114])


def _u(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _bern(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def crop_boxes(n: int, h: int, w: int, a: ViewAug, g: torch.Generator) -> torch.Tensor:
    """(n, 4) boxes x1, y1, x2, y2 as in torchvision's RandomResizedCrop: area fraction from
    ``crop_scale``, log-uniform aspect ratio, clipped to the image; whole image when off."""
    area = _u(n, *a.crop_scale, g) * h * w
    logr = _u(n, math.log(a.crop_ratio[0]), math.log(a.crop_ratio[1]), g)
    ratio = logr.exp()
    cw = (area * ratio).sqrt().clamp(1.0, w)
    ch = (area / ratio).sqrt().clamp(1.0, h)
    x1 = torch.rand(n, generator=g) * (w - cw)
    y1 = torch.rand(n, generator=g) * (h - ch)
    boxes = torch.stack([x1, y1, x1 + cw, y1 + ch], dim=1)
    full = torch.tensor([0.0, 0.0, float(w), float(h)])
    on = _bern(n, a.crop_p, g).unsqueeze(1)
    return torch.where(on, boxes, full)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (x * _GRAY.view(1, 3, 1, 1).to(x)).sum(1, keepdim=True)


def _hue_rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per image) in YIQ space: a linear map,
    so the whole batch is one batched matmul (close to HSV hue shift, much faster)."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]).to(
        x
    )
    rgb = torch.linalg.inv(yiq)
    th = shift * 2 * math.pi
    c, s = th.cos(), th.sin()
    rot = torch.zeros(len(x), 3, 3).to(x)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = rgb @ rot @ yiq  # (n, 3, 3)
    return torch.einsum("nij,njhw->nihw", m, x)


def colour_jitter(x: torch.Tensor, a: ViewAug, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    on = _bern(n, a.jitter_p, g).view(n, 1, 1, 1).to(x)
    b = _u(n, max(0.0, 1 - a.brightness), 1 + a.brightness, g).view(n, 1, 1, 1)
    c = _u(n, max(0.0, 1 - a.contrast), 1 + a.contrast, g).view(n, 1, 1, 1)
    s = _u(n, max(0.0, 1 - a.saturation), 1 + a.saturation, g).view(n, 1, 1, 1)
    h = _u(n, -a.hue, a.hue, g)
    y = (x * b).clamp(0, 1)
    y = (
        (y - _gray(y).mean(dim=(2, 3), keepdim=True)) * c + _gray(y).mean(dim=(2, 3), keepdim=True)
    ).clamp(0, 1)
    y = ((y - _gray(y)) * s + _gray(y)).clamp(0, 1)
    if a.hue > 0:
        y = _hue_rotate(y, h).clamp(0, 1)
    return on * y + (1 - on) * x


def gaussian_blur(x: torch.Tensor, a: ViewAug, g: torch.Generator) -> torch.Tensor:
    """Per-image sigma (pixels of the output view), separable kernel covering +-3 sigma_max
    (capped by the image), one grouped conv for the whole batch."""
    n, ch, hh, ww = x.shape
    on = _bern(n, a.blur_p, g)
    sigma = _u(n, *a.blur_sigma, g)
    if not bool(on.any()):
        return x
    k = min(2 * math.ceil(3 * a.blur_sigma[1]) + 1, (min(hh, ww) - 1) // 2 * 2 + 1)
    r = torch.arange(k, dtype=x.dtype) - k // 2
    ker = torch.exp(-(r.view(1, k) ** 2) / (2 * sigma.view(n, 1).clamp_min(1e-3) ** 2))
    ker = ker / ker.sum(1, keepdim=True)
    ker = ker.repeat_interleave(ch, 0)  # (n*ch, k)
    y = x.reshape(1, n * ch, hh, ww)
    y = F.pad(y, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = F.conv2d(y, ker.view(n * ch, 1, 1, k), groups=n * ch)
    y = F.conv2d(y, ker.view(n * ch, 1, k, 1), groups=n * ch).view(n, ch, hh, ww)
    return torch.where(on.view(n, 1, 1, 1), y, x)


def augment_view(x: torch.Tensor, a: ViewAug, g: torch.Generator) -> torch.Tensor:
    """One view of a float batch in [0, 1] (N, 3, H, W) -> (N, 3, size, size) in [0, 1]."""
    n, _, h, w = x.shape
    boxes = crop_boxes(n, h, w, a, g)
    rois = torch.cat([torch.arange(n, dtype=x.dtype).view(n, 1), boxes.to(x)], dim=1)
    y = roi_align(
        x, rois, output_size=(a.size, a.size), spatial_scale=1.0, sampling_ratio=2, aligned=True
    )
    flip = _bern(n, a.flip_p, g).view(n, 1, 1, 1)
    y = torch.where(flip, y.flip(-1), y)
    if a.jitter_p > 0:
        y = colour_jitter(y, a, g)
    gray = _bern(n, a.gray_p, g).view(n, 1, 1, 1)
    y = torch.where(gray, _gray(y).expand_as(y), y)
    if a.blur_p > 0:
        y = gaussian_blur(y, a, g)
    sol = _bern(n, a.solarize_p, g).view(n, 1, 1, 1)
    y = torch.where(sol & (y >= 0.5), 1.0 - y, y)
    return y.clamp_(0, 1)


def make_views(
    x: torch.Tensor, cfg: AugConfig, g: torch.Generator, mean: tuple, std: tuple
) -> list[torch.Tensor]:
    """All views of a uint8 or [0, 1] batch, normalised: the global views first, then locals."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    specs = list(cfg.global_views) + [cfg.local] * cfg.local_views
    return [(augment_view(x, a, g) - m) / s for a in specs]


def step_generator(
    seed: int, epoch: int, step: int, rank: int = 0, stream: int = 0
) -> torch.Generator:
    """A generator determined by (seed, epoch, step, rank, stream) alone, so a resumed run draws
    exactly what an uninterrupted one would, whatever happened before."""
    key = (((seed * 1_000_003 + epoch) * 1_000_003 + step) * 1009 + rank) * 31 + stream
    return torch.Generator().manual_seed(key % (2**63 - 1))
