"""Linear semantic segmentation on frozen patch tokens (DINOv2/DINOv3's linear head).

The head is BatchNorm over the token width, dropout and a 1x1 convolution to the classes,
applied to the last block's patch-token grid; its logits are upsampled bilinearly to the
label's resolution for the cross-entropy (ignore index 255) and, at test, to each image's
original resolution, where mIoU, pixel accuracy and per-class IoU are computed
(dense/metrics.py). Optimiser and schedule are DINOv3's config-ade20k-linear-training.yaml:
AdamW (lr 1e-3, betas 0.9/0.999, weight decay 1e-3), a linear warm-up of 1,500 iterations
then a cosine to 0 at 40,000 iterations of 16 images (2 per GPU x 8), counted here in samples;
test images by sliding windows (crop 512, stride 341 on images resized to a 512 shorter side).
Training reads cached tokens of one centre crop per image (dense/common.py explains why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.runtime import log
from ..data.dense import IGNORE
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType
from .dense.common import (
    TargetBank,
    dense_size,
    dense_targets,
    epoch_orders,
    image_png,
    lr_at,
    mask_png,
    score_test,
    train_tokens,
)
from .dense.metrics import SegmentationScorer


@dataclass(frozen=True)
class DenseTrainParams:
    """What the linear dense probes share (sizes in pixels, schedules in samples)."""

    size: int = 0  # shorter side images are resized to; 0: the backbone's input size
    crop: int = 0  # test window side; 0: ``size``
    stride: int = 0  # test window stride; 0: two thirds of the window
    samples: int = 640_000  # training samples (iterations x batch)
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_samples: int = 24_000
    final_lr_fraction: float = 0.0  # the cosine ends at lr x this
    grad_clip: float = 0.0  # max gradient norm; 0: none
    token_budget_mb: int = 2048  # cache the training tokens when their float16 bank fits
    target_budget_mb: int = 1024  # hold the training targets in memory when they fit
    examples: int = 3  # test images whose predicted masks the record keeps for the report

    def _check(self, name: str) -> None:
        sizes = (self.size, self.crop, self.stride, self.token_budget_mb, self.target_budget_mb)
        if min(sizes) < 0 or self.examples < 0:
            raise UserError(f"{name}: sizes, budgets and examples must be >= 0")
        if self.samples < 1 or self.batch_size < 1:
            raise UserError(f"{name}: samples and batch_size must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError(f"{name}: lr > 0, weight_decay and grad_clip >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"{name}: betas are two values in [0, 1)")
        if not 0 <= self.warmup_samples < self.samples or not 0 <= self.final_lr_fraction <= 1:
            raise UserError(f"{name}: 0 <= warmup_samples < samples, final_lr_fraction in [0, 1]")


@dataclass(frozen=True)
class LinsegParams(DenseTrainParams):
    dropout: float = 0.1

    def __post_init__(self):
        self._check("linseg")
        if not 0 <= self.dropout < 1:
            raise UserError("linseg: dropout is in [0, 1)")


class LinearSegHead(nn.Module):
    """(N, h, w, D) tokens -> (N, C, h, w) logits: BatchNorm, dropout, 1x1 convolution."""

    def __init__(self, dim: int, classes: int, dropout: float):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(dim, classes, 1)
        nn.init.normal_(self.conv.weight, 0, 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.permute(0, 3, 1, 2).contiguous()  # BatchNorm on a permuted view: 20x slower
        return self.conv(self.drop(self.bn(x)))


def geometry(inp: ImageInputs, p: DenseTrainParams) -> tuple[int, int, int]:
    size = dense_size(inp.backbone, p.size)
    crop = p.crop or size
    return size, crop, p.stride or max(1, round(crop * 2 / 3))


def train_head(inp: ImageInputs, p: DenseTrainParams, head: nn.Module, loss_fn, task: str):
    """Train ``head`` on the cached crop tokens of the training rows (train minus val);
    ``loss_fn(output at label size, targets)``. Returns (token record, last losses)."""
    dense = dense_targets(inp, task)
    size, _, _ = geometry(inp, p)
    rows = np.sort(np.asarray(inp.train_idx, dtype=np.int64))
    src = train_tokens(inp, size, rows, p.token_budget_mb)
    targets = TargetBank(dense.train, rows, size, task == "depth", p.target_budget_mb * 2**20)
    device = inp.device
    torch.manual_seed(inp.seed)
    head.to(device).train()
    decay = [q for q in head.parameters() if q.ndim > 1]
    rest = [q for q in head.parameters() if q.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": rest, "weight_decay": 0.0}],
        lr=p.lr,
        betas=tuple(p.betas),
        weight_decay=p.weight_decay,
    )
    steps = math.ceil(p.samples / p.batch_size)
    warm = round(p.warmup_samples / p.batch_size)
    step, losses = 0, []
    for order in epoch_orders(rows, steps, p.batch_size, inp.seed):
        for take, tokens, prefix in src.batches(order, p.batch_size, shared=True):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, warm, p.lr, p.final_lr_fraction)
            out = head(tokens.to(device), None if prefix is None else prefix.to(device))
            out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
            loss = loss_fn(out, targets.get(take).to(device), step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if p.grad_clip:
                nn.utils.clip_grad_norm_(head.parameters(), p.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
    head.eval()
    log(f"{task} head: {step} steps of {p.batch_size}, last loss {np.mean(losses[-20:]):.4f}")
    return src.record(), losses


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
    head = _WithPrefix(LinearSegHead(_token_dim(inp), classes, p.dropout))

    def loss_fn(out, target, step):
        return F.cross_entropy(out, target, ignore_index=IGNORE)

    record, losses = train_head(inp, p, head, loss_fn, "segmentation")
    return score_segmentation(inp, p, dense, head, record | {"final_loss": losses[-1]})


def _token_dim(inp: ImageInputs) -> int:
    size = dense_size(inp.backbone, 0)
    p = next(inp.backbone.model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    x = torch.zeros(1, 3, size, size, device=device)
    return int(inp.backbone.patch_grid(x).tokens.shape[-1])


def score_segmentation(inp, p, dense, head, details: dict) -> ProtocolOutput:
    """Slide ``head`` over every test image, score at the original resolution."""
    size, crop, stride = geometry(inp, p)
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

    for _, (areas, example) in score_test(inp, head, size, crop, stride, one):
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
