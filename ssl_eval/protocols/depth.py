"""Linear monocular depth on frozen patch tokens (DINOv2/DINOv3's NYU linear head).

The head (DINOv3 eval/depth/models/linear_head.py and models/__init__.py, DINOv2's
dinov2/eval/depth/models/decode_heads/linear_head.py): BatchNorm over the patch tokens,
optionally with the class token concatenated to every patch (DINOv2's "lin. 1"; DINOv3's NYU
config leaves it out), a 1x1 convolution to 256 depth bins spread linearly over
[min_depth, max_depth]; the bin scores go through ReLU + 0.1 and are normalised ("linear"
norm), the depth is their weighted sum of the bins (AdaBins' classification into bins);
``bins: 1`` regresses the depth instead (ReLU + min_depth). Loss: the scale-invariant log loss
(SigLoss, eps 1e-3: sqrt(var(g) + 0.15 mean(g)^2), g = log(pred) - log(gt), over the pixels
with a depth (gt != 0, as the official trainer's mask), the variance term off for the first
100 iterations); ``sigloss_group`` 2 takes it per pair of images and averages (the trainer's
8 GPUs of 2 images each compute their own SigLoss, DDP averaging the gradients: a pooled loss
over 16 images is another loss, the log-error's variance and mean being those of the pool).
Recipe of DINOv3's depth trainer (eval/depth/train.py) with config-nyu.yaml: AdamW over the
head's parameters in one group (lr 3e-4, beta2 0.99, weight decay 1e-4), gradient clip 35,
38,400 iterations of 16 (full batches: ``drop_last``), WarmupOneCycleLR with 12,800 warm-up
iterations, final_div_factor 1000 and use_beta1 left at its default (true): the scheduler sets Adam's
beta1 every step, 0 during the warm-up, then a cosine from 0.85 to 0.95 (the config's beta1
0.9 is never used); the lr ramps as lr/1000 + lr (1 + cos(pi s/T))/2 x s/W (about 0.75 lr at
the end of the warm-up, W = T/3), then a cosine to lr/25,000; the scheduler steps after every
iteration. Test (eval/depth/eval.py): each test image whole at its native resolution, one
forward, averaged with its mirror image's flipped-back output (use_tta), the depth upsampled
bilinearly to the target, clamped to the evaluation range and scored on the valid pixels
(eval/depth/metrics.py: depths strictly inside the range, inside the dataset's evaluation
box, NYU's Eigen crop): RMSE, AbsRel, delta<1.25. Training views: with ``augment: none``
the cached tokens of one centre crop per image (shorter side ``size``); with ``augment:
dinov3`` DINOv3's random NYU views (NYU crop, rotation, flip, a random ``train_crop`` at the
native resolution, colour changes), drawn and embedded online at every step
(dense/augment.py), the loss at the view's resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from ..core.errors import UserError
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType
from .dense.common import PADS, center_padded, dense_targets, score_test
from .dense.metrics import DepthScorer
from .dense_seg import DenseTrainParams, _token_dim, geometry, train_head


@dataclass(frozen=True)
class LindepthParams(DenseTrainParams):
    size: int = 480  # NYU's native shorter side: training crops at the test images' scale
    mode: str = "whole"
    flip: bool = True
    samples: int = 614_400
    lr: float = 3e-4
    weight_decay: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.99)
    warmup_samples: int = 204_800
    use_beta1: bool = True
    grad_clip: float = 35.0
    bins: int = 256  # 1: regression
    min_depth: float = 1e-3
    max_depth: float = 10.0
    use_cls_token: bool = False
    sigloss_warmup_samples: int = 1600  # 100 iterations of 16: the variance term off
    train_crop: tuple[int, ...] = ()  # augment dinov3: the random crop (h, w), native scale
    # images per SigLoss: the batch's loss is the mean of the SigLoss of each group of this
    # many images (DINOv3's NYU trainer: 2 per GPU on 8 GPUs, each GPU's loss on its own 2
    # images, DDP averaging the gradients); 0: one SigLoss over the whole batch
    sigloss_group: int = 0
    # PADS: "center" zero-pads every input (training views or crops, test images or windows)
    # to multiples of the ViT's patch, as DINOv3's depth wrapper does (a ViT/14 at 480x640
    # reads 490x644); "none" feeds them as they are (a side the ViT cannot take is refused)
    pad: str = "none"

    NEUTRAL: ClassVar[dict] = DenseTrainParams.NEUTRAL | {
        "train_crop": (),
        "sigloss_group": 0,
        "pad": "none",
    }

    def __post_init__(self):
        self._check("lindepth")
        if self.augment == "none" and self.train_crop:
            raise UserError("lindepth: train_crop is the augmented views' crop; set augment")
        if self.augment != "none" and (len(self.train_crop) != 2 or min(self.train_crop) < 1):
            raise UserError(
                f"lindepth: augment {self.augment} needs train_crop [h, w] "
                "(DINOv3's NYU: [416, 544])"
            )
        if self.bins < 1 or not 0 < self.min_depth < self.max_depth:
            raise UserError("lindepth: bins >= 1 and 0 < min_depth < max_depth")
        if self.sigloss_warmup_samples < 0:
            raise UserError("lindepth: sigloss_warmup_samples must be >= 0")
        if self.pad not in PADS:
            raise UserError(f"lindepth: pad is one of {', '.join(PADS)}, not {self.pad!r}")
        if self.sigloss_group < 0 or (self.sigloss_group and self.batch_size % self.sigloss_group):
            raise UserError(
                f"lindepth: sigloss_group {self.sigloss_group} must divide batch_size "
                f"{self.batch_size} (0: one loss over the whole batch)"
            )


class LinearDepthHead(nn.Module):
    """(N, h, w, D) tokens [+ (N, P, D) prefix] -> (N, 1, h, w) depth in metres."""

    def __init__(self, dim: int, p: LindepthParams):
        super().__init__()
        self.use_cls = p.use_cls_token
        width = dim * (2 if p.use_cls_token else 1)
        self.bn = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, p.bins, 1)
        nn.init.normal_(self.conv.weight, 0, 0.01)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("centres", torch.linspace(p.min_depth, p.max_depth, p.bins))
        self.min_depth = p.min_depth

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        x = tokens.permute(0, 3, 1, 2).contiguous()  # BatchNorm on a permuted view: 20x slower
        if self.use_cls:
            if prefix is None:
                raise UserError("lindepth: use_cls_token needs a backbone with a class token")
            x = torch.cat([x, prefix[:, 0, :, None, None].expand_as(x)], 1)
        out = self.conv(self.bn(x))
        if out.shape[1] == 1:
            return torch.relu(out) + self.min_depth
        w = torch.relu(out) + 0.1
        w = w / w.sum(1, keepdim=True)
        return torch.einsum("nkhw,k->nhw", w, self.centres)[:, None]


def sigloss(pred, target, valid, variance: bool, eps: float = 1e-3) -> torch.Tensor:
    """The scale-invariant log loss over the valid pixels (SigLoss)."""
    g = torch.log(pred[valid] + eps) - torch.log(target[valid] + eps)
    if g.numel() == 0:
        return pred.sum() * 0.0
    d = 0.15 * g.mean() ** 2
    if variance and g.numel() > 1:
        d = d + g.var()
    return torch.sqrt(d.clamp_min(1e-12))


def batch_sigloss(pred, target, variance: bool, group: int = 0) -> torch.Tensor:
    """A batch's loss (N, H, W): SigLoss on every pixel with a depth (target != 0, the
    official trainer's mask), over the whole batch (``group`` 0) or the mean of the SigLoss
    of each ``group`` images (DINOv3's GPUs each take their own images' SigLoss and DDP
    averages the gradients: the gradient of this mean)."""
    valid = target != 0
    if not group:
        return sigloss(pred, target, valid, variance=variance)
    parts = zip(*(x.split(group) for x in (pred, target, valid)), strict=True)
    return torch.stack([sigloss(o, t, v, variance=variance) for o, t, v in parts]).mean()


def run_lindepth(inp: ImageInputs, p: LindepthParams) -> ProtocolOutput:
    dense = dense_targets(inp, "depth")
    padding = {}
    if p.pad == "center":
        inp = replace(inp, backbone=center_padded(inp.backbone))
        m = getattr(inp.backbone, "pad_multiple", 0)
        padding = {
            "input_padding": f"centre-padded with zeros to multiples of {m} (DINOv3's depth "
            "wrapper, CenterPadding)"
            if m
            else "none: the model has no timm patch embedding to pad to (inputs fed as they are)"
        }
    view = tuple(p.train_crop) if p.augment != "none" else None
    dim = _token_dim(inp, p, "lindepth", view)
    torch.manual_seed(inp.seed)  # the head's initialisation: the run's seed, not the process's
    head = LinearDepthHead(dim, p)
    warm_steps = p.sigloss_warmup_samples // p.batch_size

    def loss_fn(out, target, step):
        return batch_sigloss(out[:, 0], target, step >= warm_steps, p.sigloss_group)

    record, losses = train_head(inp, p, head, loss_fn, "depth", crop=view)
    _, size, crop, stride = geometry(inp, p)
    scorer = DepthScorer(dense.depth_range or (p.min_depth, p.max_depth), dense.eval_box)

    def one(r: int, out: torch.Tensor):
        return scorer.row(out[0].cpu().numpy(), dense.test.load(r))

    for _, row in score_test(inp, head, size, crop, stride, one, p.flip):
        scorer.add_row(row)
    res = scorer.results(inp.bootstrap_resamples, inp.seed)
    n_valid = len(res["per_image"]["rmse"])
    return ProtocolOutput(
        metrics={k: res[k] for k in ("rmse", "abs_rel", "delta1")},
        details=record
        | padding
        | {
            "final_loss": losses[-1],
            "geometry": {"size": size, "crop": crop, "stride": stride, "flip": p.flip},
            "scored_at": "each test image's original resolution, valid pixels only",
            "depth_range": list(scorer.depth_range),
            "scored_images": n_valid,
            "eval_box": dense.eval_box,
        },
        per_sample={k: v for k, v in res["per_image"].items()},
    )


PROTOCOL_TYPES.register(
    "lindepth",
    ProtocolType("lindepth", LindepthParams, run_lindepth, inputs="images", dense="depth"),
)
