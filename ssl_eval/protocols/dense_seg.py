"""Linear semantic segmentation on frozen patch tokens (DINOv3's linear head and recipe).

The head is DINOv3's LinearHead (dinov3/eval/segmentation/models/heads/linear_head.py @
6876159): channel dropout (``nn.Dropout2d``, 0.1, training only), then BatchNorm over the
token width, then a 1x1 convolution to the classes, on the last block's patch-token grid.
(DINOv2's BNHead, dinov2/eval/segmentation/models/decode_heads/linear_head.py @ b8931f7,
puts BatchNorm first and mmseg's ``cls_seg`` dropout after it: not the same order.) The
logits are upsampled bilinearly to the label's resolution for the cross-entropy (ignore index
255, averaged over every pixel, ignored ones counting 0: DINOv3's loss.py) and, at test, to each image's original resolution, where mIoU, pixel accuracy and
per-class IoU are computed (dense/metrics.py). Optimiser and schedule are DINOv3's
segmentation trainer (eval/segmentation/train.py) with config-ade20k-linear-training.yaml:
AdamW over every head parameter in one group (lr 1e-3, betas 0.9/0.999, weight decay 1e-3 on
all of them, BatchNorm and biases included), no gradient clip, WarmupOneCycleLR (1,500
warm-up iterations of warmup_ratio 1e-6, final_div_factor inf: the cosine ends at 0; beta1
left alone) over 40,000 iterations of 16 images (2 per GPU x 8), counted here in samples; every
iteration a full batch (the loaders' drop_last: ``drop_last`` true).
The trainer steps the scheduler after every iteration but the first, so iterations 0 and 1
both run at the scheduler's step 0 (mmcv's inheritance); the same here. Test images by
sliding windows (crop 512, stride 341 on images resized to a 512 shorter side). Training
reads, with ``augment: none``, cached tokens of one centre crop per image (dense/common.py
explains why); with ``augment: dinov3`` the tokens of DINOv3's random training views, drawn
and embedded online at every step (dense/augment.py). Every training image is used: the
recipe chooses nothing on validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.runtime import log
from ..data.dense import IGNORE
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType
from .dense.augment import AUGMENTS, OnlineViews
from .dense.common import (
    OneCycle,
    TargetBank,
    dense_size,
    dense_targets,
    epoch_orders,
    image_png,
    mask_png,
    score_test,
    train_tokens,
)
from .dense.metrics import SegmentationScorer

MODES = ("slide", "whole")


@dataclass(frozen=True)
class DenseTrainParams:
    """What the linear dense probes share (sizes in pixels, schedules in samples). The
    schedule is DINOv3's WarmupOneCycleLR (dense/common.py ``OneCycle``)."""

    # params added after version 2 of the cards; at these values a card trains exactly as
    # before them (the same records), so they stay out of its setting (cards.py)
    NEUTRAL: ClassVar[dict] = {"augment": "none", "drop_last": False}

    size: int = 0  # shorter side images are resized to; 0: the backbone's input size
    crop: int = 0  # test window side; 0: ``size``
    stride: int = 0  # test window stride; 0: two thirds of the window
    mode: str = "slide"  # test: "slide" (windows on the resized image) or "whole" (native)
    flip: bool = False  # test: average with the flipped image's output (DINOv3's use_tta)
    samples: int = 640_000  # training samples (iterations x batch)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-3  # on every head parameter (one AdamW group, as DINOv3's)
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_samples: int = 24_000
    warmup_ratio: float = 0.0  # WarmupOneCycleLR's: > 0 mmcv's linear warm-up form
    div_factor: float = 25.0
    final_div_factor: float = 1000.0  # 0: infinite, DINOv3's .inf (the cosine ends at 0)
    use_beta1: bool = False  # the scheduler sets Adam's beta1 (0 in warm-up, then a cosine)
    momentum: tuple[float, ...] = (0.85, 0.95)  # base_momentum, max_momentum (use_beta1)
    grad_clip: float = 0.0  # max gradient norm; 0: none
    token_budget_mb: int = 2048  # cache the training tokens when their float16 bank fits
    target_budget_mb: int = 1024  # hold the training targets in memory when they fit
    examples: int = 3  # test images whose predicted masks the record keeps for the report
    augment: str = "none"  # training views: "none" (cached centre crops) or "dinov3" (online)
    # whole batches only: each pass over the training images drops its last len % batch_size
    # (DINOv3's loaders: drop_last), so the run is exactly samples / batch_size full steps;
    # false: a pass's last batch is partial, and the run takes one more step per pass
    drop_last: bool = False

    def _check(self, name: str) -> None:
        sizes = (self.size, self.crop, self.stride, self.token_budget_mb, self.target_budget_mb)
        if min(sizes) < 0 or self.examples < 0:
            raise UserError(f"{name}: sizes, budgets and examples must be >= 0")
        if self.mode not in MODES:
            raise UserError(f"{name}: mode is one of {', '.join(MODES)}, not {self.mode!r}")
        if self.augment not in AUGMENTS:
            raise UserError(
                f"{name}: augment is one of {', '.join(AUGMENTS)}, not {self.augment!r}"
            )
        if self.samples < 1 or self.batch_size < 1:
            raise UserError(f"{name}: samples and batch_size must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError(f"{name}: lr > 0, weight_decay and grad_clip >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"{name}: betas are two values in [0, 1)")
        if len(self.momentum) != 2 or not all(0 <= b < 1 for b in self.momentum):
            raise UserError(f"{name}: momentum is two values in [0, 1) (base, max)")
        if not 0 <= self.warmup_samples < self.samples or not 0 <= self.warmup_ratio < 1:
            raise UserError(f"{name}: 0 <= warmup_samples < samples, warmup_ratio in [0, 1)")
        if self.div_factor <= 0 or self.final_div_factor < 0:
            raise UserError(f"{name}: div_factor > 0, final_div_factor > 0 (0: infinite)")

    def schedule(self) -> OneCycle:
        return OneCycle(
            self.lr,
            math.ceil(self.samples / self.batch_size),
            round(self.warmup_samples / self.batch_size),
            self.warmup_ratio,
            self.div_factor,
            self.final_div_factor,
            self.use_beta1,
            (self.momentum[0], self.momentum[1]),
        )


@dataclass(frozen=True)
class LinsegParams(DenseTrainParams):
    size: int = 512
    crop: int = 512
    stride: int = 341
    warmup_ratio: float = 1e-6
    final_div_factor: float = 0.0  # .inf
    dropout: float = 0.1

    def __post_init__(self):
        self._check("linseg")
        if not 0 <= self.dropout < 1:
            raise UserError("linseg: dropout is in [0, 1)")


class LinearSegHead(nn.Module):
    """(N, h, w, D) tokens -> (N, C, h, w) logits: channel dropout, BatchNorm, 1x1
    convolution (DINOv3's LinearHead order; eval mode: no dropout)."""

    def __init__(self, dim: int, classes: int, dropout: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(dim, classes, 1)
        nn.init.normal_(self.conv.weight, 0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.permute(0, 3, 1, 2).contiguous()  # BatchNorm on a permuted view: 20x slower
        return self.conv(self.bn(self.drop(x)))


def geometry(inp: ImageInputs, p: DenseTrainParams) -> tuple[int, int | None, int | None, int]:
    """(training crop side, test resize side or None: native, test window or None: whole
    image, stride)."""
    size = dense_size(inp.backbone, p.size)
    if getattr(p, "mode", "slide") == "whole":  # knnseg's params have no mode: it slides
        return size, None, None, 0
    crop = p.crop or size
    return size, size, crop, p.stride or max(1, round(crop * 2 / 3))


def training_rows(inp: ImageInputs) -> np.ndarray:
    """Every training image (train and val rows together): the linear dense recipes choose
    nothing on validation, so nothing is held out."""
    rows = np.concatenate([np.asarray(inp.train_idx), np.asarray(inp.val_idx)])
    return np.sort(rows.astype(np.int64))


def train_head(
    inp: ImageInputs,
    p: DenseTrainParams,
    head: nn.Module,
    loss_fn,
    task: str,
    lag: int = 0,
    crop: tuple[int, int] | None = None,
):
    """Train ``head`` on every training image (``training_rows``): with ``augment`` "none"
    the cached tokens of each image's centre crop, else the tokens of the recipe's random
    views drawn and embedded at every step (dense/augment.py; ``crop``: the depth views' (h,
    w)); ``loss_fn(output at label size, targets, step)``. Iteration i runs at the schedule's
    step max(0, i - ``lag``) (DINOv3's segmentation trainer: lag 1; its depth trainer: 0), lr
    and, with ``use_beta1``, Adam's beta1 set before each step. Returns (details, last
    losses)."""
    dense = dense_targets(inp, task)
    size = geometry(inp, p)[0]
    rows = training_rows(inp)
    if p.augment == "none":
        src = train_tokens(inp, size, rows, p.token_budget_mb)
        targets = TargetBank(dense.train, rows, size, task == "depth", p.target_budget_mb * 2**20)

        def batches(order):
            for take, tokens, prefix in src.batches(order, p.batch_size, shared=True):
                yield take, tokens, prefix, targets.get(take)

    else:
        src = OnlineViews(inp, dense, task, p.augment, size, crop)

        def batches(order):
            yield from src.batches(order, p.batch_size)

    device = inp.device
    torch.manual_seed(inp.seed)
    head.to(device).train()
    opt = torch.optim.AdamW(
        head.parameters(), lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay
    )
    sched = p.schedule()
    step, losses = 0, []
    for order in epoch_orders(rows, sched.total, p.batch_size, inp.seed, p.drop_last):
        for _, tokens, prefix, target in batches(order):
            lr, beta1 = sched.at(max(0, step - lag))
            for g in opt.param_groups:
                g["lr"] = lr
                if beta1 is not None:
                    g["betas"] = (beta1, g["betas"][1])
            out = head(tokens.to(device), None if prefix is None else prefix.to(device))
            out = F.interpolate(out, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss_fn(out, target.to(device), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                nn.utils.clip_grad_norm_(head.parameters(), p.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
    head.eval()
    log(f"{task} head: {step} steps of {p.batch_size}, last loss {np.mean(losses[-20:]):.4f}")
    details = src.record() | {
        "trained_on": f"all {len(rows)} training images (train and val rows: nothing is "
        "chosen on val)",
        "steps": step,
    }
    return details, losses


class _WithPrefix(nn.Module):
    """Adapts a head of tokens alone to the (tokens, prefix) call train_head makes."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, tokens, prefix=None):
        return self.head(tokens)


def run_linseg(inp: ImageInputs, p: LinsegParams) -> ProtocolOutput:
    dense = dense_targets(inp, "segmentation")
    classes = len(dense.classes)
    dim = _token_dim(inp, p, "linseg")
    torch.manual_seed(inp.seed)  # the head's initialisation: the run's seed, not the process's
    head = _WithPrefix(LinearSegHead(dim, classes, p.dropout))

    def loss_fn(out, target, step):
        return seg_loss(out, target)

    record, losses = train_head(inp, p, head, loss_fn, "segmentation", lag=1)
    return score_segmentation(inp, p, dense, head, record | {"final_loss": losses[-1]})


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DINOv3's segmentation CrossEntropyLoss (eval/segmentation/loss.py, avg_non_ignore
    false): the per-pixel cross-entropy, 0 on pixels of the ignore index, averaged over every
    pixel of the batch, ignored ones included (torch's own mean would divide by the labelled
    pixels only)."""
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none").mean()


# the way out when no training view fits the backbone or the images: the cached crops
NO_VIEWS = "train on cached crops without the views (--set augment=none --set 'train_crop=[]')"


def _token_dim(inp: ImageInputs, p: DenseTrainParams, name: str, view=None) -> int:
    """The token width, read from a forward of one blank training crop (``size`` x ``size``)
    and, when the test slides windows of another side, one blank window, of one blank
    training view of ``view`` (h, w) when given, and, when the test runs each image whole
    (``mode: whole``), one blank input of the first test image's native size: a backbone that
    cannot take them (a ViT of fixed input size) is refused in one line before any work."""
    size, _, crop, _ = geometry(inp, p)
    q = next(inp.backbone.model.parameters(), None)
    device = q.device if q is not None else torch.device("cpu")
    dim = 0
    shapes = [(size, size), (crop or size, crop or size)] + ([tuple(view)] if view else [])
    native = None
    if crop is None and len(inp.bundle.test):  # mode whole: the test images' own sizes
        native = tuple(int(n) for n in inp.bundle.test.load(0).shape[:2])
        shapes.append(native)
    for h, w in dict.fromkeys(shapes):
        try:
            with torch.no_grad():
                x = torch.zeros(1, 3, h, w, device=device)
                dim = int(inp.backbone.patch_grid(x).tokens.shape[-1])
        except (RuntimeError, AssertionError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if view and (h, w) == tuple(view):
                what = f"set train_crop (--set train_crop=[h,w]), or {NO_VIEWS}"
            elif (h, w) == native and native != (size, size):
                what = (
                    "mode whole runs each test image at its native resolution: slide windows "
                    "of the training size over it instead (--set mode=slide)"
                )
            else:
                what = (
                    f"build the backbone at the card's size (--image-size {h}), or set size, "
                    "crop and stride (--set size=0 ...: the backbone's input size)"
                )
            raise UserError(
                f"{name}: {inp.backbone.tag} does not take {h}x{w} inputs ({first}); {what}"
            ) from None
    return dim


def score_segmentation(inp, p, dense, head, details: dict) -> ProtocolOutput:
    """Slide ``head`` over every test image, score at the original resolution."""
    _, size, crop, stride = geometry(inp, p)
    scorer = SegmentationScorer(len(dense.classes), IGNORE)
    examples = []
    test = inp.bundle.test

    def one(r: int, out: torch.Tensor):
        """What is kept of test image ``r``: its areas, and its pictures for the first few."""
        pred = out.argmax(0).cpu().numpy()
        target = dense.test.load(r)
        example = None
        if r < p.examples:
            example = {
                "row": r,
                "image": image_png(test.load(r)),
                "pred": mask_png(pred),
                "truth": mask_png(target),
            }
        return scorer.row(pred, target), example

    channels = len(dense.classes) + 1  # knnseg's pixel vote adds the ignored channel
    for _, (areas, example) in score_test(
        inp, head, size, crop, stride, one, getattr(p, "flip", False), channels
    ):
        scorer.add_row(areas)
        if example is not None:
            examples.append(example)
    res = scorer.results(inp.bootstrap_resamples, inp.seed)
    return ProtocolOutput(
        metrics={"miou": res["miou"], "pixel_acc": res["pixel_acc"]},
        details=details
        | {
            "per_class_iou": dict(zip(dense.classes, res["per_class_iou"], strict=True)),
            "geometry": {"size": size, "crop": crop, "stride": stride},
            "scored_at": "each test image's original resolution",
            "examples": examples,
        },
        intervals=res["intervals"],
    )


PROTOCOL_TYPES.register(
    "linseg",
    ProtocolType("linseg", LinsegParams, run_linseg, inputs="images", dense="segmentation"),
)
