"""Training views drawn online, as DINOv3's dense trainers draw them (``augment: dinov3``).

A cache of frozen tokens holds one fixed crop per image; the official recipes draw a new
random view of every image at every step. With ``augment`` other than "none" the linear dense
probes read no cache: each step's batch is decoded from the dataset's full-resolution images
and targets, put through the recipe's random transforms, and embedded by the frozen backbone
(no gradient; bf16 autocast on a GPU, the token source's own choice), so memory holds a
few batches of images, views and tokens (a thread draws the next batches while the backbone
embeds one). The transforms, read from facebookresearch/dinov3 @ 6876159
(own code, the same rules):

Segmentation (eval/segmentation/transforms.py ``make_segmentation_train_transforms`` with
configs/config-ade20k-linear-training.yaml: img_size 512, random_img_size_ratio_range
[0.5, 2.0], crop_size [512, 512], flip_prob 0.5):

1. FixedSideResize with a random ratio: the shorter side becomes int(size x r), r uniform in
   [0.5, 2.0), the longer one rounded half up; the image bilinear (here the backbone's own
   interpolation, which the test windows use too), the label nearest neighbour;
2. RandomCropWithLabel (cat_max_ratio 0.75, ignore 255): a crop of ``size`` x ``size`` (of
   what there is along a side shorter than that) at a uniform offset, redrawn up to 10 times
   while one class holds 75% or more of the crop's labelled pixels or it holds fewer than two
   classes; the last draw is kept;
3. a horizontal flip of image and label with probability 0.5;
4. PhotoMetricDistortion on the uint8 image, each step with probability 0.5: brightness +
   uniform(-32, 32), then (in a random order with the rest) contrast x uniform(0.5, 1.5),
   both clipped to 0..255 and truncated to uint8, saturation x uniform(0.5, 1.5) and hue +
   uniform(-0.5, 0.5) (torchvision's adjust_saturation / adjust_hue);
5. normalisation, then padding to ``size`` x ``size`` at the bottom and right: the image with
   0 (after normalisation), the label with 255 (ignored).

Depth (eval/depth/transforms.py ``make_depth_train_transforms`` with configs/config-nyu.yaml:
fixed_crop NYU, random_crop [416, 544], brightness_range [0.75, 1.25], rotation 2.5 degrees):

1. NYUCrop: the box x 43..608, y 45..472 of a 640 x 480 image, scaled to the image (int());
2. the image as float in [0, 1]; with probability 0.5 a rotation by uniform(-2.5, 2.5)
   degrees about the centre, the image bilinear, the depth nearest neighbour, both filled
   with 0 (a depth of 0 is no measurement: the loss leaves it out);
3. a horizontal flip of both with probability 0.5;
4. a random crop of ``train_crop`` (h, w) at a uniform offset (the official RandomCrop has no
   padding: a smaller image is refused);
5. ColorAug with probability 0.5: x 255, to the power uniform(0.9, 1.1), x uniform(0.75,
   1.25) (brightness), x uniform(0.9, 1.1) per channel (colour), clipped to 0..255, / 255;
6. normalisation. The depth is kept at the crop's resolution (no resize).

The draws come from one numpy generator seeded by the run's seed: the same seed gives the
same views. Under torchrun every rank draws every batch's views (the one generator's sequence,
so each rank's views are the single process's), but embeds only its share: in round k of W
batches rank r embeds batch kW + r, and the round's tokens (float16, the values a single
process trains on) are gathered to every rank, which then runs the same head steps.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as Fv
from torchvision.transforms import InterpolationMode

from ...core import distributed
from ...core.errors import UserError
from ...core.provenance import autocast_dtype
from ...data.dense import IGNORE

AUGMENTS = ("none", "dinov3")


@dataclass(frozen=True)
class SegAugment:
    """DINOv3's ADE20K linear training transforms (config-ade20k-linear-training.yaml and
    transforms.py's defaults)."""

    ratio_range: tuple[float, float] = (0.5, 2.0)  # random_img_size_ratio_range
    cat_max_ratio: float = 0.75  # RandomCropWithLabel's default
    crop_tries: int = 10
    flip_prob: float = 0.5
    brightness_delta: float = 32.0  # PhotoMetricDistortion's defaults
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_range: tuple[float, float] = (-0.5, 0.5)


@dataclass(frozen=True)
class DepthAugment:
    """DINOv3's NYU training transforms (config-nyu.yaml and make_depth_train_transforms)."""

    nyu_box: tuple[int, int, int, int] = (43, 45, 608, 472)  # NYUCrop: x1, y1, x2, y2 of 640x480
    rotate_prob: float = 0.5  # MaybeApply's threshold
    rotation: float = 2.5  # degrees (rotation_angle)
    flip_prob: float = 0.5  # v2.RandomHorizontalFlip
    color_prob: float = 0.5  # ColorAugV2(prob=0.5)
    gamma_range: tuple[float, float] = (0.9, 1.1)
    brightness_range: tuple[float, float] = (0.75, 1.25)  # config-nyu.yaml
    color_range: tuple[float, float] = (0.9, 1.1)


SEG_RECIPES = {"dinov3": SegAugment()}
DEPTH_RECIPES = {"dinov3": DepthAugment()}


def _interp(name: str) -> InterpolationMode:
    return getattr(InterpolationMode, name.upper())


def _normalised(x: torch.Tensor, pre, scale: float) -> torch.Tensor:
    """float CHW of values in [0, ``scale``] -> normalised with the backbone's mean and std."""
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (x / scale - mean) / std


def random_resize(img: torch.Tensor, label: torch.Tensor, size: int, rng, aug, interpolation):
    """Step 1 of the segmentation views: uint8 (3, H, W) and (H, W) labels resized so the
    shorter side is int(size x ratio), ratio uniform in ``aug.ratio_range``."""
    from .common import shorter_side

    lo, hi = aug.ratio_range
    small = int(size * (rng.random() * (hi - lo) + lo))
    out = list(shorter_side(img.shape[1], img.shape[2], small))
    img = Fv.resize(img, out, interpolation=_interp(interpolation), antialias=True)
    label = Fv.resize(label[None], out, interpolation=InterpolationMode.NEAREST)[0]
    return img, label


def crop_with_label(label: torch.Tensor, crop: int, rng, aug) -> tuple[int, int, int, int]:
    """Step 2: (y1, y2, x1, x2) of RandomCropWithLabel's crop of ``label``."""
    h, w = label.shape

    def draw():
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        x = int(rng.integers(0, max(w - crop, 0) + 1))
        return y, y + crop, x, x + crop

    box = draw()
    if aug.cat_max_ratio < 1:
        for _ in range(aug.crop_tries):
            y1, y2, x1, x2 = box
            ids, counts = np.unique(label[y1:y2, x1:x2].numpy(), return_counts=True)
            counts = counts[ids != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < aug.cat_max_ratio:
                break
            box = draw()
    return box


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric(img: torch.Tensor, rng, aug) -> torch.Tensor:
    """Step 4: PhotoMetricDistortion of a uint8 (3, H, W) image; float32 of uint8 values."""
    x = img.permute(1, 2, 0).numpy()
    if rng.integers(2):
        x = _convert(x, beta=rng.uniform(-aug.brightness_delta, aug.brightness_delta))
    contrast_first = bool(rng.integers(2))

    def contrast(x):
        if rng.integers(2):
            return _convert(x, alpha=rng.uniform(*aug.contrast_range))
        return x

    if contrast_first:
        x = contrast(x)
    if rng.integers(2):
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
        x = Fv.adjust_saturation(t, rng.uniform(*aug.saturation_range)).permute(1, 2, 0).numpy()
    if rng.integers(2):
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
        x = Fv.adjust_hue(t, rng.uniform(*aug.hue_range)).permute(1, 2, 0).numpy()
    if not contrast_first:
        x = contrast(x)
    return torch.from_numpy(x.astype(np.float32)).permute(2, 0, 1)


def seg_view(image: np.ndarray, label: np.ndarray, size: int, pre, rng, aug: SegAugment):
    """One training view of a uint8 (H, W, 3) image and its (H, W) class ids: (normalised
    float32 (3, size, size), int64 (size, size) labels, 255 on the padding)."""
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    lab = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
    img, lab = random_resize(img, lab, size, rng, aug, pre.interpolation)
    y1, y2, x1, x2 = crop_with_label(lab, size, rng, aug)
    img, lab = img[:, y1:y2, x1:x2], lab[y1:y2, x1:x2]
    if rng.random() < aug.flip_prob:
        img, lab = img.flip(-1), lab.flip(-1)
    x = _normalised(photometric(img.contiguous(), rng, aug), pre, 255.0)
    h, w = lab.shape
    out = torch.zeros(3, size, size)
    out[:, :h, :w] = x
    target = torch.full((size, size), IGNORE, dtype=torch.int64)
    target[:h, :w] = lab
    return out, target


def nyu_crop(h: int, w: int, aug: DepthAugment) -> tuple[int, int, int, int]:
    """NYUCrop's box scaled to an (h, w) image: (y1, y2, x1, x2)."""
    x1, y1, x2, y2 = aug.nyu_box
    return int(y1 / 480 * h), int(y2 / 480 * h), int(x1 / 640 * w), int(x2 / 640 * w)


def depth_view(image: np.ndarray, depth: np.ndarray, crop: tuple[int, int], pre, rng, aug):
    """One training view of a uint8 (H, W, 3) image and its (H, W) depth in metres:
    (normalised float32 (3, h, w), float32 (h, w) depth, 0 where unmeasured), (h, w) =
    ``crop``."""
    y1, y2, x1, x2 = nyu_crop(*depth.shape, aug)
    img = torch.from_numpy(np.ascontiguousarray(image[y1:y2, x1:x2])).permute(2, 0, 1)
    img = img.float() / 255.0
    d = torch.from_numpy(np.ascontiguousarray(depth[y1:y2, x1:x2], dtype=np.float32))[None]
    if rng.random() < aug.rotate_prob:
        angle = float(rng.uniform(-aug.rotation, aug.rotation))
        img = Fv.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        d = Fv.rotate(d, angle, interpolation=InterpolationMode.NEAREST, fill=0.0)
    if rng.random() < aug.flip_prob:
        img, d = img.flip(-1), d.flip(-1)
    th, tw = crop
    h, w = d.shape[1:]
    if h < th or w < tw:
        raise UserError(
            f"lindepth: a training image is {h}x{w} after the NYU crop, smaller than "
            f"train_crop {th}x{tw}; set train_crop (--set train_crop=[h,w]) to at most "
            f"{h}x{w}, or train on cached crops without the views (--set augment=none "
            "--set 'train_crop=[]')"
        )
    top, left = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
    img, d = img[:, top : top + th, left : left + tw], d[0, top : top + th, left : left + tw]
    if rng.random() < aug.color_prob:
        x = img * 255.0
        x = x ** rng.uniform(*aug.gamma_range)
        x = x * rng.uniform(*aug.brightness_range)
        x = x * torch.tensor(rng.uniform(*aug.color_range, size=3), dtype=x.dtype).view(3, 1, 1)
        img = x.clamp(0, 255) / 255.0
    return _normalised(img, pre, 1.0), d.contiguous()


class OnlineViews:
    """The training batches of ``rows`` as augmented views, embedded per batch: ``batches``
    yields (rows, tokens float32 (B, h, w, D), prefix or None, targets) like a token source
    with its targets. ``task`` "segmentation" (views of ``size``) or "depth" (views of
    ``crop``)."""

    def __init__(self, inp, dense, task: str, recipe: str, size: int, crop=None):
        self.inp, self.dense, self.task = inp, dense, task
        self.size, self.crop, self.recipe = size, crop, recipe
        self.aug = (SEG_RECIPES if task == "segmentation" else DEPTH_RECIPES)[recipe]
        self.rng = np.random.default_rng([int(inp.seed), 0xA06])
        self.grid: list[int] = []
        self.dim = 0

    def views(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The (normalised images, targets) of ``rows``, one fresh draw each."""
        pre = self.inp.backbone.preprocessing
        train = self.inp.bundle.train
        xs, ts = [], []
        for r in rows:
            image, target = train.load(int(r)), self.dense.train.load(int(r))
            if self.task == "segmentation":
                if target.max(initial=0) > 255:
                    raise UserError(f"target {int(r)} holds class id {int(target.max())} > 255")
                x, t = seg_view(image, target, self.size, pre, self.rng, self.aug)
            else:
                x, t = depth_view(image, target, self.crop, pre, self.rng, self.aug)
            xs.append(x)
            ts.append(t)
        return torch.stack(xs), torch.stack(ts)

    def batches(self, order, batch_size: int) -> Iterator[tuple]:
        """The batches of ``order``, each drawn by a thread one or two batches ahead of the
        backbone's forward (decoding and transforms overlap the embedding; the draws stay in
        order, one generator, so the views are the same as drawn in line); memory holds at
        most three batches of views and one of tokens (under torchrun: a round's targets and
        tokens, one batch of views embedded by each rank)."""
        self.inp.backbone.model.to(self.inp.device).eval()
        cuts = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        drawn = self._drawn(cuts)
        try:
            if distributed.world() == 1:
                for take, (x, t) in drawn:
                    tokens, prefix = self._embed(x)
                    yield take, tokens, prefix, t
                return
            w, r = distributed.world(), distributed.rank()
            for start in range(0, len(cuts), w):
                part = [next(drawn) for _ in range(start, min(start + w, len(cuts)))]
                mine, error = None, None
                if r < len(part):
                    try:
                        mine = tuple(
                            v if v is None else v.half().cpu() for v in self._embed(part[r][1][0])
                        )
                    except UserError as e:
                        error = str(e)
                part = [(take, t) for take, (_, t) in part]  # the views: embedded or not ours
                distributed.agree(error)
                for (take, t), (tokens, prefix) in zip(
                    part, distributed.all_gather(mine)[: len(part)], strict=True
                ):
                    yield take, tokens.float(), None if prefix is None else prefix.float(), t
        finally:
            drawn.close()

    def _drawn(self, cuts) -> Iterator[tuple]:
        """(rows, (views, targets)) of each cut in order, drawn by a thread at most two cuts
        ahead of the consumer."""
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce():
            try:
                for take in cuts:
                    if stop.is_set():
                        return
                    ready.put((take, self.views(take)))
            except BaseException as e:  # noqa: BLE001  (raised again by the consumer)
                ready.put(e)
                return
            ready.put(None)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while worker.is_alive():  # a producer blocked on a full queue: let it finish
                with contextlib.suppress(queue.Empty):
                    ready.get_nowait()
                worker.join(0.01)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen backbone's (tokens, prefix) of a batch of views, float32 holding
        float16 values (the values the test windows give)."""
        device = self.inp.device
        amp = autocast_dtype(device) == "bfloat16"
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            g = self.inp.backbone.patch_grid(x.to(device))
        tokens = g.tokens.float().half().float()
        prefix = None if g.prefix is None else g.prefix.float().half().float()
        self.grid, self.dim = list(tokens.shape[1:3]), int(tokens.shape[-1])
        return tokens, prefix

    def record(self) -> dict:
        side = [self.size, self.size] if self.crop is None else list(self.crop)
        return {
            "tokens": "online",
            "train_views": f"augmented online per batch ({self.recipe}: DINOv3's "
            + ("ADE20K" if self.task == "segmentation" else "NYU")
            + " training transforms)",
            "train_view_size": side,
            "grid": self.grid,
            "token_dim": self.dim,
        }
