"""Training images for the protocols that read images (fine-tuning, augmented linear probing):
uint8 CHW crops drawn afresh each epoch, and evaluation images through the backbone's own
resize and centre crop.

Every random draw comes from a generator seeded by (seed, epoch, image index), never from
global state, so a resumed or repeated run draws the same crops. Three random-resized-crop
rules: ``torchvision`` (10 tries, then the largest centred box within the aspect range),
``mae`` (MAE's util/crop.py, after BYOL's TF code: one draw, the box clipped to the image) and
``simclr`` (TensorFlow's sample_distorted_bounding_box as SimCLR calls it: 100 tries, then the
whole image).
RandAugment is timm's (``rand_augment_transform``, the policy string MAE passes as ``--aa``),
run on a PIL image with Python's and NumPy's generators seeded per image and restored after.
Random erasing follows timm's ``RandomErasing`` (DeiT's, MAE's ``--reprob``) on the normalised
batch, drawn from a generator seeded per batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..core.errors import UserError

RATIO = (3 / 4, 4 / 3)


def _uniform(g: torch.Generator) -> float:
    return torch.rand(1, generator=g).item()


def crop_box(hw, scale, g: torch.Generator, ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering a fraction in ``scale`` of the
    image's area, with aspect ratio log-uniform in ``ratio``; after 10 misses (or when the
    scale is 1), the largest centred box whose aspect ratio is within ``ratio``."""
    H, W = int(hw[0]), int(hw[1])
    lo, hi = float(scale[0]), float(scale[-1])
    for _ in range(10 if lo < 1.0 else 0):
        area = H * W * (lo + (hi - lo) * _uniform(g))
        logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _uniform(g)
        w = round(math.sqrt(area * math.exp(logr)))
        h = round(math.sqrt(area / math.exp(logr)))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (1,), generator=g))
            left = int(torch.randint(0, W - w + 1, (1,), generator=g))
            return top, left, h, w
    aspect, (r_lo, r_hi) = W / H, ratio
    if aspect < r_lo:
        w, h = W, min(H, round(W / r_lo))
    elif aspect > r_hi:
        w, h = min(W, round(H * r_hi)), H
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def crop_box_mae(hw, scale, g: torch.Generator, ratio=RATIO) -> tuple[int, int, int, int]:
    """MAE's RandomResizedCrop.get_params: one area and one log-uniform aspect ratio, the
    box's sides clipped to the image's, its corner uniform over the positions that fit."""
    H, W = int(hw[0]), int(hw[1])
    lo, hi = float(scale[0]), float(scale[-1])
    area = H * W * (lo + (hi - lo) * _uniform(g))
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _uniform(g)
    w = min(int(round(math.sqrt(area * math.exp(logr)))), W)
    h = min(int(round(math.sqrt(area / math.exp(logr)))), H)
    top = int(torch.randint(0, H - h + 1, (1,), generator=g))
    left = int(torch.randint(0, W - w + 1, (1,), generator=g))
    return top, left, h, w


def _tf_crop(W: int, H: int, lo, hi, ratio, g: torch.Generator):
    """One try of TensorFlow's GenerateRandomCrop (sample_distorted_bounding_box_op.cc): the
    height uniform over the integers from the one of the smallest area to the one of the
    largest (that fits), the width its rounded multiple by ``ratio``, then the corner; None
    if the rounded box misses the area range or the image. float32 as TF's (lrintf: half to
    even, as np.rint)."""
    f32 = np.float32
    min_area, max_area = f32(lo) * f32(W) * f32(H), f32(hi) * f32(W) * f32(H)
    h = int(np.rint(np.sqrt(min_area / ratio)))
    max_h = int(np.rint(np.sqrt(max_area / ratio)))
    if np.rint(f32(max_h) * ratio) > W:  # the tallest box whose rounded width fits
        max_h = int((W + 0.5 - float(f32(1e-7))) / float(ratio))
        if np.rint(f32(max_h) * ratio) > W:
            max_h -= 1
    max_h = min(max_h, H)
    h = min(h, max_h)
    if h < max_h:
        h += int(torch.randint(0, max_h - h + 1, (1,), generator=g))
    w = int(np.rint(f32(h) * ratio))
    area = f32(w * h)
    if area < min_area:  # rounding: one taller, then one shorter
        h += 1
        w = int(np.rint(f32(h) * ratio))
        area = f32(w * h)
    if area > max_area:
        h -= 1
        w = int(np.rint(f32(h) * ratio))
        area = f32(w * h)
    if area < min_area or area > max_area or not (0 < w <= W and 0 < h <= H):
        return None
    top = int(torch.randint(0, H - h, (1,), generator=g)) if h < H else 0
    left = int(torch.randint(0, W - w, (1,), generator=g)) if w < W else 0
    return top, left, h, w


def crop_box_simclr(hw, scale, g: torch.Generator, ratio=RATIO) -> tuple[int, int, int, int]:
    """SimCLR's crop (google-research/simclr data_util.crop_and_resize): TensorFlow's
    sample_distorted_bounding_box with the whole image as the one bounding box,
    min_object_covered 0.1, area_range ``scale``, aspect_ratio_range ``ratio`` and 100
    attempts: each attempt an aspect ratio uniform (not log-uniform) in the range, then
    :func:`_tf_crop`, kept if it covers at least 10% of the image (so crops under 10% of the
    area are tries lost); after 100 misses the whole image. The corner is uniform over
    [0, H - h) (TF's Uniform(n) excludes n: a box never touches the bottom or right edge
    unless it spans the image)."""
    H, W = int(hw[0]), int(hw[1])
    lo, hi = float(scale[0]), float(scale[-1])
    r_lo, r_hi = np.float32(ratio[0]), np.float32(ratio[1])
    for _ in range(100):
        r = np.float32(_uniform(g)) * (r_hi - r_lo) + r_lo
        box = _tf_crop(W, H, lo, hi, r, g)
        if box is None or box[2] * box[3] < 1:
            continue
        # SatisfiesOverlapConstraints: the share of the image box covered, in float32
        if np.float32(box[2] * box[3]) / np.float32(H * W) >= np.float32(0.1):
            return box
    return 0, 0, H, W


CROPS: dict[str, Callable] = {
    "torchvision": crop_box,
    "mae": crop_box_mae,
    "simclr": crop_box_simclr,
}


def check_crop(where: str, crop: str, scale) -> None:
    """One-line refusals of an unknown crop rule or a bad area range."""
    if crop not in CROPS:
        raise UserError(f"{where}: crop is one of {sorted(CROPS)}, not {crop!r}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise UserError(
            f"{where}: crop_scale is [min, max] with 0 < min <= max <= 1, not {list(scale)}"
        )


def rand_augment(policy: str, pre) -> Callable | None:
    """timm's RandAugment for ``policy`` (e.g. 'rand-m9-mstd0.5-inc1'), with the hparams timm's
    create_transform gives it (translate 45% of the input size, fill with the mean colour,
    the backbone's interpolation); None for 'none'."""
    if policy == "none":
        return None
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    size = pre.crop or 224
    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in pre.mean),
        "interpolation": str_to_pil_interp(pre.interpolation),
    }
    try:
        ra = rand_augment_transform(policy, hparams)
    except Exception as e:  # timm asserts on an unknown policy string
        raise UserError(
            f"rand_augment {policy!r} is not a timm RandAugment policy (e.g. rand-m9-mstd0.5-inc1)"
        ) from e
    for op in ra.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return ra


def timm_augment(policy: str, pre) -> Callable | None:
    """The transform timm's create_transform builds for its ``auto_augment`` string: 'rand-*'
    RandAugment (``rand_augment``), any other AutoAugment (``auto_augment_transform``: a
    policy original | originalr | v0 | v0r, e.g. V-JEPA 2's 'original'), with the same
    hparams; None for 'none'."""
    if policy == "none" or policy.startswith("rand"):
        return rand_augment(policy, pre)
    if policy.startswith("augmix"):
        raise UserError(f"auto_augment {policy!r}: timm's AugMix is not supported")
    from timm.data.auto_augment import auto_augment_transform
    from timm.data.transforms import str_to_pil_interp

    hparams = {
        "translate_const": int((pre.crop or 224) * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in pre.mean),
        "interpolation": str_to_pil_interp(pre.interpolation),
    }
    try:
        aa = auto_augment_transform(policy, hparams)
    except Exception as e:  # timm asserts (or raises KeyError) on an unknown policy
        raise UserError(
            f"auto_augment {policy!r} is not a timm AutoAugment or RandAugment policy "
            "(e.g. original, v0, rand-m9-mstd0.5-inc1)"
        ) from e
    for sub in aa.policy:
        for op in sub:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return aa


def _posterize(img, bits_to_keep, **_):
    """timm's posterize with the Pillow the recipes ran on: keeping 0 bits (the top level of
    'inc' policies) makes the image black, where Pillow 10+ refuses 0 bits."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _seeded_call(fn: Callable, img: torch.Tensor, seed: int) -> torch.Tensor:
    """``fn`` on ``img`` (uint8 CHW) as a PIL image, with Python's and NumPy's global
    generators seeded by ``seed`` for the call and restored after (timm draws from both)."""
    from PIL import Image

    py, npy = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % (2**32))
        out = fn(Image.fromarray(img.permute(1, 2, 0).numpy()))
    finally:
        random.setstate(py)
        np.random.set_state(npy)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)


class TrainImages(Dataset):
    """uint8 CHW images of ``split`` at ``indices``, with their labels. Evaluation: the
    backbone's preprocessing (resize, centre crop). Training (``augment``): a random resized
    crop of the full decoded image to the backbone's input size, then a flip, then
    timm's RandAugment (or AutoAugment: ``timm_augment``) if given; set ``epoch`` before each
    epoch for new draws."""

    def __init__(
        self,
        split,
        indices,
        pre,
        seed: int,
        augment: bool,
        crop_scale=(0.08, 1.0),
        hflip: bool = True,
        crop: str = "torchvision",
        rand_augment: str = "none",
    ):
        self.split, self.indices, self.pre = split, indices, pre
        self.seed, self.augment, self.epoch = seed, augment, 0
        self.crop_scale, self.hflip, self.box = crop_scale, hflip, CROPS[crop]
        self.rand_augment = rand_augment  # the policy; the transform is built per process
        self._ra = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = int(self.indices[i])
        full = torch.from_numpy(np.ascontiguousarray(self.split.load(j))).permute(2, 0, 1)
        label = int(self.split.labels[j])
        if not self.augment:
            return self.pre.geometric(full).contiguous(), label
        draw, (top, left, h, w), flip = self._draws(j, full.shape[-2:])
        # the input size is what evaluation feeds the backbone
        size = [self.pre.crop] * 2 if self.pre.crop else list(self.pre.geometric(full).shape[-2:])
        interp = InterpolationMode(self.pre.interpolation)
        img = TF.resized_crop(full, top, left, h, w, size, interpolation=interp, antialias=True)
        return self._finish(TF.horizontal_flip(img) if flip else img, draw), label

    def _draws(self, j: int, hw) -> tuple[int, tuple[int, int, int, int], bool]:
        """Image ``j``'s draws this epoch, from its own generator: the seed it was made from
        (RandAugment's too), the crop box (top, left, height, width) and the flip."""
        draw = (self.seed * 1_000_003 + self.epoch * 10_007 + j) % (2**31)
        g = torch.Generator().manual_seed(draw)
        box = self.box(hw, self.crop_scale, g)
        return draw, box, bool(self.hflip and torch.rand(1, generator=g).item() < 0.5)

    def _finish(self, img: torch.Tensor, draw: int) -> torch.Tensor:
        if self.rand_augment != "none":
            if self._ra is None:  # a timm policy: RandAugment's rand-* or an AutoAugment
                self._ra = timm_augment(self.rand_augment, self.pre)
            img = _seeded_call(self._ra, img, draw)
        return img.contiguous()

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, int]]:
        """``[self[i] for i in items]``, the same bytes (the DataLoader fetches a batch with
        it): each image's draws are ``_draws``, as one by one, but the images
        that need the same resize (the same decoded shape, and while training the same crop
        box size) are resized in one call, in a single image's memory layout (channels last,
        as decoded). Without a fixed crop size the training crops' sizes follow each image: one
        by one. (Fine-tuning's loader on the suite's 16-px shapes: 81 against 40 us an image.)"""
        if self.augment and not self.pre.crop:
            return [self[i] for i in items]
        js = [int(self.indices[i]) for i in items]
        arrays = [np.ascontiguousarray(self.split.load(j)) for j in js]
        out: list[torch.Tensor | None] = [None] * len(js)
        groups: dict[tuple, list[tuple[int, np.ndarray]]] = {}
        draws, flips = [0] * len(js), [False] * len(js)
        for k, (j, a) in enumerate(zip(js, arrays, strict=True)):
            if not self.augment:
                groups.setdefault(a.shape, []).append((k, a))
                continue
            draws[k], (top, left, h, w), flips[k] = self._draws(j, a.shape[:2])
            groups.setdefault((a.shape, h, w), []).append((k, a[top : top + h, left : left + w]))
        interp = InterpolationMode(self.pre.interpolation)
        for members in groups.values():
            # N x H x W x C stacked, viewed N x C x H x W: channels last, as one decoded image
            x = torch.from_numpy(np.stack([a for _, a in members])).permute(0, 3, 1, 2)
            if not self.augment:
                y = self.pre.geometric(x)
            else:
                size = [self.pre.crop] * 2
                y = TF.resize(x, size, interpolation=interp, antialias=True)
            for (k, _), img in zip(members, y, strict=True):
                if not self.augment:
                    out[k] = img.contiguous()
                    continue
                out[k] = self._finish(TF.horizontal_flip(img) if flips[k] else img, draws[k])
        return [(img, int(self.split.labels[j])) for img, j in zip(out, js, strict=True)]


def random_erase(x: torch.Tensor, prob: float, rng: np.random.Generator) -> torch.Tensor:
    """timm's RandomErasing(prob, mode='pixel', max_count=1) on a normalised NCHW batch, in
    place: per image, with probability ``prob``, one box of 2%-33% of the area and aspect
    ratio log-uniform in [0.3, 1/0.3] (10 tries to fit strictly inside) gets standard normal
    noise per pixel."""
    if prob <= 0:
        return x
    _, C, H, W = x.shape
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    for n in range(len(x)):
        if rng.random() > prob:
            continue
        for _ in range(10):
            area = rng.uniform(0.02, 1 / 3) * H * W
            aspect = math.exp(rng.uniform(lo, hi))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < W and h < H:
                top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                noise = torch.from_numpy(rng.standard_normal((C, h, w)).astype(np.float32))
                x[n, :, top : top + h, left : left + w] = noise.to(x.device, x.dtype)
                break
    return x
