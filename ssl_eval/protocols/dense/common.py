"""What the dense probes share: the geometry, the training tokens, the targets and the
sliding-window prediction at each test image's full resolution.

Geometry (DINOv3's eval/segmentation and eval/depth: images resized so their shorter side is
``size``; test images covered by ``crop`` x ``crop`` windows every ``stride`` pixels, each
window's per-pixel output upsampled bilinearly to the window, overlaps averaged, and the
average upsampled bilinearly to the image's original size, where it is scored):

* training reads the backbone's patch tokens of each training image resized to ``size`` and
  centre-cropped to ``size`` x ``size`` (the token source: cached as float16 when the bank
  fits the byte budget, streamed otherwise), with its target put through the same geometry
  (nearest neighbour); the official recipes draw random scaled crops and flips instead, which
  a cache of frozen tokens cannot hold: ssl-eval's dense probes train on one fixed crop per
  image and say so in their cards;
* test images are never cropped: the windows cover the resized image, and scores are
  computed against the original target (metrics.py refuses any other shape). ``size`` None
  keeps each test image at its native resolution and ``crop`` None makes the whole image one
  window (DINOv3's depth evaluation: one forward of the full image); ``flip`` averages each
  window's output with the flipped-back output of its mirror image (DINOv3's depth
  ``use_tta``: LeftRightFlipAug, averaged before the upsampling).
"""

from __future__ import annotations

import base64
import io
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from ...backbones.base import Backbone
from ...backbones.tokens import PatchGrid
from ...core import distributed
from ...core.errors import UserError
from ...core.provenance import autocast_dtype
from ...data.transforms import Preprocessing

T = TypeVar("T")
# what a forward batch's upsampled window outputs may hold (slide_predict with ``channels``)
WINDOW_OUTPUT_MB = 1024


def dense_targets(inp, task: str):
    """The bundle's per-pixel targets of ``task`` (checked again here for direct callers)."""
    dense = getattr(inp.bundle, "dense", None)
    if dense is None or dense.task != task:
        raise UserError(f"dataset {inp.bundle.name} has no per-pixel {task} targets")
    return dense


def cache_of(inp):
    """The run's cache folder (a direct caller without one: the default cache)."""
    if inp.cache_dir is not None:
        return inp.cache_dir
    from ...features.extraction import default_cache_dir

    return default_cache_dir()


def train_tokens(inp, size: int, rows, budget_mb: float):
    """The token source of the training ``rows`` at ``size`` (the run's cache, batch and
    workers), cached within ``budget_mb``, streamed beyond."""
    from ...features.tokens import token_source

    return token_source(
        crop_backbone(inp.backbone, size),
        inp.bundle,
        "train",
        rows,
        budget_bytes=budget_mb * 2**20,
        device=inp.device,
        batch_size=inp.batch_size,
        cache_dir=cache_of(inp),
        num_workers=inp.num_workers,
    )


def dense_size(backbone, size: int) -> int:
    """The shorter side images are resized to: the card's ``size``, else the backbone's crop."""
    s = size or backbone.preprocessing.crop or backbone.preprocessing.resize
    if not s:
        raise UserError(f"{backbone.tag} has no input size; set the probe's size (--set size=N)")
    return int(s)


def crop_backbone(backbone, size: int):
    """``backbone`` whose preprocessing resizes the shorter side to ``size`` and centre-crops
    ``size`` x ``size`` (its own mean, std and interpolation kept)."""
    pre = backbone.preprocessing
    return replace(
        backbone, preprocessing=Preprocessing(size, size, pre.mean, pre.std, pre.interpolation)
    )


PADS = ("none", "center")


def patch_multiple(backbone) -> int:
    """The patch side a ViT's input sides must be multiples of (timm's ``patch_embed``, or a
    Hugging Face tower's ``config.patch_size``: transformers' DINOv2 floors a side the patch
    does not divide, dropping its last pixels), 0 for a model without one (a CNN takes any
    size)."""
    pe = getattr(backbone.model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:  # a Hugging Face tower (families/hf.py HFImageTower)
        ps = getattr(
            getattr(getattr(backbone.model, "hf", None), "config", None), "patch_size", None
        )
    if ps is None:
        return 0
    ps = tuple(ps) if isinstance(ps, (tuple, list)) else (ps, ps)
    if ps[0] != ps[1]:
        raise UserError(f"{backbone.tag}: centre padding needs a square patch, not {ps}")
    return int(ps[0])


@dataclass
class PaddedBackbone(Backbone):
    """``backbone`` whose inputs are centre-padded with zeros (after normalisation) to
    multiples of ``pad_multiple`` before its patch grid is read: DINOv3's depth wrapper
    (eval/depth/models/encoder.py with embed.py ``CenterPadding``, the default
    ``PatchSizeAdaptationStrategy``): the left and top pads are half the padding, rounded
    down. The grid covers the padded image; the head's output is stretched to the target, as
    the official evaluation stretches it (eval.py: one bilinear resize to the ground truth)."""

    pad_multiple: int = 0

    def patch_grid(self, x: torch.Tensor) -> PatchGrid:
        return super().patch_grid(center_pad(x, self.pad_multiple))


def center_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """(N, C, H, W) zero-padded to sides that are multiples of ``multiple``, the extra split
    as CenterPadding splits it (left = pad // 2, right = the rest)."""
    if multiple <= 1:
        return x
    pads = []
    for side in (x.shape[-1], x.shape[-2]):  # F.pad's order: last dimension first
        extra = math.ceil(side / multiple) * multiple - side
        pads += [extra // 2, extra - extra // 2]
    return F.pad(x, pads) if any(pads) else x


def center_padded(backbone):
    """``backbone`` with DINOv3's depth wrapper's centre padding to its patch (a
    ``PaddedBackbone``), or itself when it has no patch (a CNN)."""
    m = patch_multiple(backbone)
    if m <= 1:
        return backbone
    return PaddedBackbone(**{f.name: getattr(backbone, f.name) for f in fields(backbone)},
                          pad_multiple=m)  # fmt: skip


def crop_target(target: np.ndarray, size: int) -> np.ndarray:
    """A target through the training geometry (shorter side ``size``, nearest neighbour,
    centre crop), aligned with the image's crop because the same functions compute both."""
    t = torch.from_numpy(np.ascontiguousarray(target))[None]
    t = TF.resize(t, [size], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)
    return TF.center_crop(t, [size, size])[0].numpy()


class TargetBank:
    """Training targets through ``crop_target``, held in memory when they fit ``budget_bytes``
    (uint8 class ids or float32 depth), else decoded per batch."""

    def __init__(self, split, rows: np.ndarray, size: int, depth: bool, budget_bytes: int):
        self.split, self.size, self.depth = split, size, depth
        self.dtype = np.float32 if depth else np.uint8
        nbytes = len(rows) * size * size * np.dtype(self.dtype).itemsize
        self.held: dict[int, int] | None = None
        if nbytes <= budget_bytes:
            self.bank = np.stack([self._one(int(r)) for r in rows])
            self.held = {int(r): i for i, r in enumerate(rows)}

    def _one(self, r: int) -> np.ndarray:
        t = crop_target(self.split.load(r), self.size)
        if not self.depth and t.max(initial=0) > 255:
            raise UserError(f"target {r} holds class id {int(t.max())} > 255")
        return t.astype(self.dtype)

    def get(self, rows) -> torch.Tensor:
        if self.held is not None:
            out = self.bank[[self.held[int(r)] for r in rows]]
        else:
            out = np.stack([self._one(int(r)) for r in rows])
        t = torch.from_numpy(out)
        return t.float() if self.depth else t.long()


def windows(length: int, crop: int, stride: int) -> list[int]:
    """Window starts along one side: every ``stride``, the last flush with the end (mmseg)."""
    if length <= crop:
        return [0]
    n = math.ceil((length - crop) / stride) + 1
    return [min(i * stride, length - crop) for i in range(n)]


def shorter_side(h: int, w: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side ``size`` and the longer one rounded half up, as DINOv3's
    FixedSideResize computes it (eval/segmentation/transforms.py: a 300x400 image at 512 is
    512x683; torchvision's own [size] would truncate to 682)."""
    if h > w:
        return int(size * h / w + 0.5), size
    return size, int(size * w / h + 0.5)


def _resized(img: np.ndarray, size: int | None, interpolation: str) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    if size is None:  # the native resolution
        return x
    mode = getattr(InterpolationMode, interpolation.upper())
    out = list(shorter_side(x.shape[1], x.shape[2], size))
    return TF.resize(x, out, interpolation=mode, antialias=True)


def chunks_of(rows: list[int], batch_size: int) -> list[list[int]]:
    """The images ``slide_predict`` slides over together: consecutive ``batch_size`` rows (the
    windows of one chunk are batched across its images)."""
    per = max(1, batch_size)
    return [rows[c : c + per] for c in range(0, len(rows), per)]


def slide_predict(
    backbone,
    split,
    rows,
    *,
    size: int | None,
    crop: int | None,
    stride: int,
    head: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    device: torch.device,
    batch_size: int,
    flip: bool = False,
    channels: int = 0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(row, (C, H, W) float32 output at the image's original size) for each of ``rows``:
    the image's shorter side resized to ``size`` (None: kept), windows of ``crop`` (None: the
    whole image) every ``stride``, the patch tokens (rounded through float16, the values the
    training cache holds) of each window through ``head`` ((n, h, w, D), prefix -> (n, C, h,
    w)); ``flip``: averaged with the head's output on the mirrored window, mirrored back; each
    window's output upsampled bilinearly to the window, overlaps averaged, upsampled to the
    original size.

    Memory: each image is yielded as soon as its last window is done (its canvas freed), and
    with ``channels`` (the head's output channels) a forward batch holds at most as many
    windows as keep their upsampled outputs within WINDOW_OUTPUT_MB (ADE20K's 150 classes
    at 512 px: 157 MB a window), never more than ``batch_size``; below that bound the batches
    are ``batch_size`` windows, as before."""
    pre = backbone.preprocessing
    backbone.model.to(device).eval()
    amp = autocast_dtype(device) == "bfloat16"  # as the token source embeds
    rows = [int(r) for r in rows]
    for chunk in chunks_of(rows, batch_size):
        images = {r: split.load(r) for r in chunk}
        resized = {r: _resized(images[r], size, pre.interpolation) for r in chunk}
        jobs = []  # (row, y, x, window)
        for r in chunk:
            _, h, w = resized[r].shape
            cy, cx = (h, w) if crop is None else (min(crop, h), min(crop, w))
            for y in windows(h, cy, stride):
                for x in windows(w, cx, stride):
                    jobs.append((r, y, x, resized[r][:, y : y + cy, x : x + cx]))
        canvas: dict[int, torch.Tensor] = {}
        count: dict[int, torch.Tensor] = {}
        left = Counter(j[0] for j in jobs)  # windows still to do, per image
        pending = list(chunk)  # images not yet yielded, in row order
        step = batch_size
        if channels:
            largest = max(j[3].shape[1] * j[3].shape[2] for j in jobs)
            per = channels * largest * 4 * (2 if flip else 1)
            step = max(1, min(batch_size, int(WINDOW_OUTPUT_MB * 2**20 // per)))
        for s in range(0, len(jobs), step):
            part = jobs[s : s + step]
            shapes = {tuple(j[3].shape) for j in part}
            groups = [[j for j in part if tuple(j[3].shape) == sh] for sh in shapes]
            for group in groups:
                batch = torch.stack([j[3] for j in group]).to(device)
                out = _window_output(backbone, pre.normalise(batch), head, amp)
                if flip:
                    mirrored = _window_output(backbone, pre.normalise(batch.flip(-1)), head, amp)
                    out = (out + mirrored.flip(-1)) / 2
                out = F.interpolate(
                    out, size=batch.shape[-2:], mode="bilinear", align_corners=False
                )
                for (r, y, x, win), o in zip(group, out, strict=True):
                    if r not in canvas:
                        _, h, w = resized[r].shape
                        canvas[r] = torch.zeros(o.shape[0], h, w, device=o.device)
                        count[r] = torch.zeros(1, h, w, device=o.device)
                    canvas[r][:, y : y + win.shape[1], x : x + win.shape[2]] += o
                    count[r][:, y : y + win.shape[1], x : x + win.shape[2]] += 1
                    left[r] -= 1
                del out
            while pending and left[pending[0]] == 0:  # done images, in row order
                r = pending.pop(0)
                avg = (canvas.pop(r) / count.pop(r))[None]
                h0, w0 = images.pop(r).shape[:2]
                resized.pop(r)
                yield r, F.interpolate(avg, size=(h0, w0), mode="bilinear", align_corners=False)[0]


def _window_output(backbone, x: torch.Tensor, head, amp: bool) -> torch.Tensor:
    """``head`` on the patch tokens of a batch of normalised windows, (n, C, h, w) float32."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        g = backbone.patch_grid(x)
    tokens = g.tokens.float().half().float()
    prefix = None if g.prefix is None else g.prefix.float().half().float()
    with torch.no_grad():
        return head(tokens, prefix).float()


def score_test(
    inp,
    head,
    size: int | None,
    crop: int | None,
    stride: int,
    score: Callable[[int, torch.Tensor], T],
    flip: bool = False,
    channels: int = 0,
) -> Iterator[tuple[int, T]]:
    """(row, ``score(row, output)``) for every test image in row order, ``output`` being
    ``head`` slid over the image at the given geometry (``slide_predict``).

    Under torchrun the test images are shared out by chunks, the ``batch_size`` images one
    process slides over together: rank r predicts chunks r, r + W, r + 2W ... and each round
    of W chunks' scores (small: what the scorer keeps of an image) is gathered to every rank
    (``distributed.in_rounds``). A chunk's windows are batched as one process batches them,
    so each image's output, and its score, is the single process's to the bit."""
    test = inp.bundle.test
    chunks = chunks_of(list(range(len(test))), inp.batch_size)  # slide_predict's own chunks
    w, r = distributed.world(), distributed.rank()

    def mine():
        for chunk in chunks[r::w]:
            outputs = slide_predict(
                inp.backbone,
                test,
                chunk,
                size=size,
                crop=crop,
                stride=stride,
                head=head,
                device=inp.device,
                batch_size=inp.batch_size,
                flip=flip,
                channels=channels,
            )
            yield [(row, score(row, out)) for row, out in outputs]

    for part in distributed.in_rounds(len(chunks), mine()):
        yield from part


@dataclass(frozen=True)
class OneCycle:
    """DINOv3's ``WarmupOneCycleLR`` (dinov3/eval/segmentation/schedulers.py, the same in
    eval/depth/schedulers.py @ 6876159) for one parameter group of peak ``lr``, ``total``
    scheduler steps and ``warmup`` warm-up steps; ``final_div_factor`` 0 stands for the
    segmentation config's ``.inf`` (a card cannot hold an infinite number). ``at(s)`` is (lr, beta1) at scheduler step ``s``; beta1 is
    None unless ``use_beta1``, when the scheduler sets Adam's beta1 itself: 0 during the
    warm-up (its momentum starts at 0 and only the annealing phase sets it), then a cosine
    from ``momentum[0]`` (base_momentum) to ``momentum[1]`` (max_momentum).

    Warm-up (s < warmup): with ``warmup_ratio`` > 0 (mmcv's form), lr x (1 - k) x (1 - s/T),
    k = (1 - s/warmup)(1 - warmup_ratio); with 0, lr/final_div + lr (1 + cos(pi s/T))/2 x
    s/warmup. Afterwards a cosine over the whole run from lr to lr/div/final_div at
    (s + 1)/T."""

    lr: float
    total: int
    warmup: int
    warmup_ratio: float = 0.0
    div_factor: float = 25.0
    final_div_factor: float = 1000.0  # 0: infinite
    use_beta1: bool = False
    momentum: tuple[float, float] = (0.85, 0.95)

    def at(self, s: int) -> tuple[float, float | None]:
        lr, total, warm = self.lr, self.total, self.warmup
        inf = self.final_div_factor == 0
        min_lr = 0.0 if inf else lr / self.div_factor / self.final_div_factor
        beta1 = 0.0
        if s < warm:
            if self.warmup_ratio:
                k = (1 - s / warm) * (1 - self.warmup_ratio)
                out = lr * (1 - k) * (1 - s / total)
            else:
                start = 0.0 if inf else lr / self.final_div_factor
                out = start + lr * (1 + math.cos(math.pi * s / total)) / 2 * s / warm
        else:
            pct = (s - warm) / (total - warm)
            lo, hi = self.momentum
            beta1 = hi + (lo - hi) / 2 * (math.cos(math.pi * pct) + 1)
            out = min_lr + (lr - min_lr) / 2 * (math.cos(math.pi * (s + 1) / total) + 1)
        return out, (beta1 if self.use_beta1 else None)


def epoch_orders(
    rows: np.ndarray, steps: int, batch: int, seed: int, drop_last: bool = False
) -> Iterator[np.ndarray]:
    """Shuffled passes over ``rows`` (seeded) holding ``steps`` x ``batch`` samples in all.
    ``drop_last`` (DINOv3's dense trainers: their loaders' drop_last): each pass is cut to
    whole batches, its last len(rows) % batch rows left out, so the run is exactly ``steps``
    full batches; without it a pass keeps every row and its last batch is a partial one (more
    batches than ``steps`` when len(rows) % batch is not 0). The generator's draws are the
    same either way."""
    if drop_last and len(rows) < batch:
        raise UserError(
            f"drop_last keeps whole batches of {batch}, and there are {len(rows)} training "
            "images; set batch_size lower or drop_last=false"
        )
    rng = np.random.default_rng(seed)
    need = steps * batch
    while need > 0:
        order = rng.permutation(rows)
        if drop_last:
            order = order[: len(order) // batch * batch]
        order = order[: min(len(order), need)]
        need -= len(order)
        yield order


def mask_png(mask: np.ndarray, longest: int = 256) -> str:
    """A class-id mask as a base64 greyscale PNG of ids (255 stays 255), for the report's
    pictures only (nearest-neighbour thumbnail, longer side at most ``longest``)."""
    from PIL import Image

    im = Image.fromarray(mask.astype(np.uint8), "L")
    im.thumbnail((longest, longest), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def image_png(img: np.ndarray, longest: int = 256) -> str:
    """An RGB image as a base64 PNG, its longer side at most ``longest``."""
    from PIL import Image

    im = Image.fromarray(img)
    im.thumbnail((longest, longest))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()
