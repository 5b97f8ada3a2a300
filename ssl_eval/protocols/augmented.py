"""Augmented (online) linear probing: linear heads on a frozen backbone that embeds a new
random crop and flip of every training image each epoch, as the papers' headline linear
numbers are trained (MAE's main_linprobe.py, MoCo v3, DINO), instead of one fixed embedding.

Each training batch goes through the backbone once (eval mode, no gradient; bf16 autocast on
a GPU, the channels-last layout and pinned host batches where ``--channels-last`` and
``--pin-memory`` ask; images from the decode cache when it is on), and every head of the
grid (base learning rate x weight decay) trains on those same features: one GEMM gives all
heads' logits. Before the heads, optionally, MAE's
BatchNorm1d(affine=False, eps=1e-6): in training each group of ``bn_rows`` rows is normalised
by its own statistics (MAE's BatchNorm is per GPU, 512 rows, not synchronised) and the running
statistics follow the first group (DDP broadcasts rank 0's buffers); evaluation uses the
running statistics. LARS or SGD (_lars.py), the learning rate base_lr x batch / 256, linear
warmup then half cosine evaluated every step at its fractional epoch (MAE's lr_sched).

Validation and test images get the backbone's deterministic resize and centre crop; they are
embedded once. After every epoch every head is scored on validation; the (epoch, head) with
the best validation top-1 (the first on ties) is the one reported on test. ``details`` also
keeps MAE's own rule for comparison with the paper: the best test top-1 over epochs of the
selected setting (chosen on test, so not ssl-eval's number). The state is saved after every
epoch and a rerun of the unit resumes from it.

Under torchrun the forward passes are shared out (_shared_forward.py): rank r embeds the cuts
r, r + W ... of one process's cuts (the same images in the same batches, so the same feature
bits), the features are gathered round by round to every rank in cut order, and every rank
runs the same head steps on them, so every rank holds the single process's heads. Rank 0
alone holds the state folder's lock and writes the state (_aug_state.py); on a rerun rank 0
decides whether to resume (a damaged or foreign state is discarded) and every rank reads the
file it wrote.

DINOv2's and DINOv3's recipes (linear_aug@dinov2, linear_aug@dinov3; _aug_grid.py) add a grid
over the last n blocks x avgpool: the forward reads the backbone's ``layers:N`` kind (class
token and mean patch token of each of the last N blocks, the cached multi-layer features'
rows) online, and each (n, avgpool) stack of heads trains on its own columns of it, in the
layout of the scripts' ``create_linear_input``; a fixed iteration count under torch's
CosineAnnealingLR (``iterations``), heads drawn as nn.Linear.weight.normal_ (``head_init``),
and the best of the final heads on validation (``select: final``), with the script's own
test-chosen head recorded beside it (``report_test_choice``). DINO's cards read the same row:
linear@dino the last 4 class tokens, linear@dino-vitb the last class token and patch mean in
eval_linear.py's interleaved order (``avgpool_layout``). At their neutral values these params
leave the probe as it was; ``head_init_std`` 0 starts the heads at zero (SimCLR's).

The other recipes' own rules, each neutral by default: ``lr_update: epoch`` sets the schedule
once before each epoch at its integer index (MoCo v3's main_lincls.py adjust_learning_rate,
DINO's eval_linear.py CosineAnnealingLR stepped per epoch); ``nesterov`` is torch's
SGD(nesterov=True), which is TF1's MomentumOptimizer(use_nesterov=True) (SimCLR's);
``crop_interpolation`` and ``eval_interpolation`` resize the training crops and the evaluation
images with the script's interpolation instead of the backbone's; ``stream`` runs SimCLR's
input stream: the passes' permutations one after another, cut into full batches across their
boundaries, for n x epochs // batch + 1 steps under a per-step cosine over that many, the
heads scored when each pass's last batch is done (a row of pass q gets pass q's crop). With
``iterations`` the stream is DINOv2's and DINOv3's infinite sampler (one process: a new
permutation each pass, batches across the passes' boundaries) for exactly that many steps
under CosineAnnealingLR, and ``eval_period`` scores the heads every so many steps and at the
end (the scripts' eval_period_iterations) instead of after each pass. SimCLR's images
(_tf_crops.py): ``crop: simclr`` (TensorFlow's sample_distorted_bounding_box rule),
``tf1_bicubic`` as crop or eval interpolation (TF1's resize_bicubic) and
``eval_crop_fraction`` (data_util.center_crop's centred square, 0.875).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..core import distributed
from ..core.errors import UserError
from ..core.files import file_lock, lock_path, sha256_json
from ..core.provenance import autocast_dtype
from ..features.accel import Accel, prepared
from ._aug_grid import (
    Group,
    LayerInput,
    check_blocks,
    check_layout,
    columns_of,
    grid_settings,
    iteration_lr,
    locate,
    schedule,
    script_choice,
    setting_dict,
    stream_ends,
    stream_rows,
    width,
)
from ._aug_state import HEAD_STATE, resume, save
from ._edges import edge, grid_edges
from ._images import TrainImages, check_crop
from ._lars import OPTIMISERS, mae_lr
from ._shared_forward import SharedForward
from ._tf_crops import ScriptImages
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType, topk_hits

HEAD_INITS = ("trunc_normal", "normal")
SELECTIONS = ("epoch", "final")
LR_UPDATES = ("step", "epoch")
INTERPOLATIONS = ("backbone", "bilinear", "bicubic", "nearest", "tf1_bicubic")


@dataclass(frozen=True)
class AugmentedParams:
    # params added with the multi-layer cards (linear_aug@dinov2, @dinov3); at these values a
    # card trains exactly as before them (linear@mae's records are unchanged), so they stay out
    # of its setting (cards.py)
    NEUTRAL: ClassVar[dict] = {
        "n_last_blocks": (),
        "avgpool": (),
        "iterations": 0,
        "head_init": "trunc_normal",
        "select": "epoch",
        "report_test_choice": False,
        "avgpool_layout": "concat",
        "lr_update": "step",
        "nesterov": False,
        "crop_interpolation": "backbone",
        "eval_interpolation": "backbone",
        "stream": False,
        "eval_period": 0,
        "eval_crop_fraction": 0.0,
    }
    base_lrs: tuple[float, ...] = (0.1,)  # lr = base_lr * batch / 256 with lr_batch_scaling
    weight_decays: tuple[float, ...] = (0.0,)
    optimizer: str = "lars"  # lars | sgd
    momentum: float = 0.9
    trust_coefficient: float = 0.001  # LARS only
    epochs: int = 90
    warmup_epochs: float = 10.0
    min_lr: float = 0.0  # the cosine's floor (absolute)
    batch_size: int = 16384  # rows per optimiser step; min(batch_size, training rows) is used
    lr_batch_scaling: bool = True  # MAE's linear scaling rule over the batch actually used
    drop_last: bool = True  # as MAE's loader: the partial last batch of an epoch is dropped
    batchnorm: bool = True  # BatchNorm1d(affine=False) before the heads
    bn_eps: float = 1e-6
    bn_momentum: float = 0.1
    bn_rows: int = 512  # rows normalised together in training (MAE: 512 per GPU); 0 = the batch
    head_init_std: float = 0.01  # trunc_normal weights, zero biases; 0: zero weights
    crop: str = "mae"  # random-resized-crop rule: mae | torchvision
    crop_scale: tuple[float, ...] = (0.08, 1.0)
    hflip: bool = True
    forward_batch: int = 256  # images per backbone forward (a batch is gathered from these)
    # DINOv2's / DINOv3's grid: heads over the class tokens of the last n blocks (x the last
    # block's mean patch token or not), read from one layers:N forward; () the backbone's own
    n_last_blocks: tuple[int, ...] = ()
    avgpool: tuple[bool, ...] = ()
    # > 0: this many optimiser steps in all (the scripts' epochs x epoch_length), whatever the
    # data size, under torch's CosineAnnealingLR (no warmup, to 0); 0: ``epochs`` passes
    iterations: int = 0
    head_init: str = "trunc_normal"  # trunc_normal (MAE) | normal (nn.Linear.weight.normal_)
    # epoch: the best (epoch, head) on validation over every epoch (ssl-eval's rule for MAE);
    # final: the best head on validation at the end of training (the scripts' reported heads)
    select: str = "epoch"
    # also record the head the official script picks: the best top-1 on the set it reports
    # (the test split here; optimistic, never the reported number)
    report_test_choice: bool = False
    # how a head with avgpool lays out its input (_aug_grid.AVGPOOL_LAYOUTS): concat, DINOv2's
    # create_linear_input; interleave, DINO's eval_linear.py (one block's class token and patch
    # mean alternating value by value)
    avgpool_layout: str = "concat"
    # step: the schedule at each step's fractional epoch (MAE's lr_sched); epoch: set once
    # before each epoch at its integer index, constant within it (MoCo v3's
    # adjust_learning_rate, DINO's CosineAnnealingLR stepped per epoch)
    lr_update: str = "step"
    # SGD's Nesterov form (torch's SGD(nesterov=True), TF1's MomentumOptimizer(use_nesterov))
    nesterov: bool = False
    # the resize of the training crops and of the evaluation images: backbone (its own
    # preprocessing's), or bilinear | bicubic | nearest (the recipe's script's, torchvision's
    # antialiased resize), or tf1_bicubic (TF1's tf.image.resize_bicubic, SimCLR's: _tf_crops)
    crop_interpolation: str = "backbone"
    eval_interpolation: str = "backbone"
    # > 0: evaluation images are SimCLR's center_crop: a centred square of this fraction of
    # the shorter side (0.875: CROP_PROPORTION), resized with eval_interpolation to the input
    # size; 0: the backbone's resize and centre crop
    eval_crop_fraction: float = 0.0
    # SimCLR's input stream (data.py: shuffle, repeat, batch with drop_remainder): each pass's
    # permutation follows the last, cut into full batches across the passes' boundaries, for
    # n x epochs // batch + 1 steps (get_train_steps), the cosine over that many, set every
    # step; the heads are scored when each pass's last batch is done. With ``iterations`` the
    # stream runs that many steps under CosineAnnealingLR (DINOv2's and DINOv3's infinite
    # samplers: a new permutation each pass, batches across the passes' boundaries)
    stream: bool = False
    # with stream: score the heads every this many steps and at the end (the DINO scripts'
    # eval_period_iterations); 0: when each pass's last batch is done
    eval_period: int = 0

    def __post_init__(self):
        if min(self.epochs, self.batch_size, self.forward_batch) < 1 or self.bn_rows < 0:
            raise UserError(
                "linear_aug: epochs, batch_size and forward_batch must be >= 1, bn_rows >= 0"
            )
        if not self.base_lrs or not self.weight_decays:
            raise UserError("linear_aug: base_lrs and weight_decays each list at least one value")
        if min(self.base_lrs) <= 0 or min(self.weight_decays) < 0 or self.min_lr < 0:
            raise UserError("linear_aug: base_lrs must be > 0, weight_decays and min_lr >= 0")
        if self.optimizer not in OPTIMISERS:
            raise UserError(
                f"linear_aug: optimizer is one of {sorted(OPTIMISERS)}, not {self.optimizer!r}"
            )
        if not 0 <= self.momentum < 1 or self.trust_coefficient <= 0:
            raise UserError("linear_aug: momentum is in [0, 1), trust_coefficient > 0")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise UserError(
                f"linear_aug: warmup_epochs is in [0, epochs={self.epochs}), not {self.warmup_epochs}"
            )
        if self.bn_eps <= 0 or not 0 < self.bn_momentum <= 1 or self.head_init_std < 0:
            raise UserError("linear_aug: bn_eps > 0, bn_momentum in (0, 1], head_init_std >= 0")
        check_crop("linear_aug", self.crop, self.crop_scale)
        if bool(self.n_last_blocks) != bool(self.avgpool):
            raise UserError(
                "linear_aug: n_last_blocks and avgpool go together (e.g. n_last_blocks=[1,4] "
                "avgpool=[false,true]), or both empty for the backbone's own feature"
            )
        if self.n_last_blocks and min(self.n_last_blocks) < 1:
            raise UserError(
                f"linear_aug: n_last_blocks must be >= 1, got {list(self.n_last_blocks)}"
            )
        if any(not isinstance(a, bool) for a in self.avgpool):
            raise UserError(f"linear_aug: avgpool lists true/false, got {list(self.avgpool)}")
        if self.iterations < 0:
            raise UserError(f"linear_aug: iterations must be >= 0, got {self.iterations}")
        if self.iterations and (self.warmup_epochs or self.min_lr):
            raise UserError(
                "linear_aug: iterations > 0 schedules as torch's CosineAnnealingLR (no warmup, "
                "down to 0): set warmup_epochs=0 and min_lr=0, or iterations=0"
            )
        if self.head_init not in HEAD_INITS:
            raise UserError(
                f"linear_aug: head_init is one of {list(HEAD_INITS)}, not {self.head_init!r}"
            )
        if self.select not in SELECTIONS:
            raise UserError(f"linear_aug: select is one of {list(SELECTIONS)}, not {self.select!r}")
        check_layout(self.avgpool_layout, self.n_last_blocks, self.avgpool)
        if self.lr_update not in LR_UPDATES:
            raise UserError(
                f"linear_aug: lr_update is one of {list(LR_UPDATES)}, not {self.lr_update!r}"
            )
        if self.lr_update == "epoch" and (self.iterations or self.warmup_epochs):
            raise UserError(
                "linear_aug: lr_update=epoch sets the cosine once per epoch, without warmup and "
                "over epochs: set iterations=0 and warmup_epochs=0, or lr_update=step"
            )
        if not isinstance(self.nesterov, bool) or (self.nesterov and self.optimizer != "sgd"):
            raise UserError("linear_aug: nesterov is true or false, and true only with sgd")
        if not isinstance(self.stream, bool):
            raise UserError(f"linear_aug: stream is true or false, not {self.stream!r}")
        if self.stream and (self.warmup_epochs or self.lr_update != "step" or not self.drop_last):
            raise UserError(
                "linear_aug: stream=true cuts full batches from the repeated passes with a "
                "per-step cosine and no warmup: set warmup_epochs=0, lr_update=step, "
                "drop_last=true"
            )
        if not isinstance(self.eval_period, int) or self.eval_period < 0:
            raise UserError(f"linear_aug: eval_period is an integer >= 0, not {self.eval_period!r}")
        if self.eval_period and not self.stream:
            raise UserError(
                "linear_aug: eval_period scores a stream's heads every so many steps; set "
                "stream=true, or eval_period=0 (scored after each epoch)"
            )
        for name in ("crop_interpolation", "eval_interpolation"):
            if getattr(self, name) not in INTERPOLATIONS:
                raise UserError(
                    f"linear_aug: {name} is one of {list(INTERPOLATIONS)}, "
                    f"not {getattr(self, name)!r}"
                )
        if not 0 <= self.eval_crop_fraction <= 1:
            raise UserError(
                f"linear_aug: eval_crop_fraction is in [0, 1] (0: the backbone's centre crop), "
                f"not {self.eval_crop_fraction}"
            )
        if self.eval_interpolation == "tf1_bicubic" and not self.eval_crop_fraction:
            raise UserError(
                "linear_aug: eval_interpolation=tf1_bicubic resizes SimCLR's centre crop: set "
                "eval_crop_fraction (e.g. 0.875), or another eval_interpolation"
            )

    def settings(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.base_lrs for wd in self.weight_decays]


def plan(n: int, p: AugmentedParams) -> tuple[int, int, float]:
    """(rows per step, steps per epoch, lr scale) for ``n`` training rows. A stream's batches
    are always full (cut from the repeated passes, as the scripts' samplers and SimCLR's
    repeated dataset fill them), other batches hold at most the ``n`` rows."""
    batch = p.batch_size if p.stream else min(p.batch_size, n)
    steps = n // batch if p.drop_last else math.ceil(n / batch)
    return batch, steps, (batch / 256 if p.lr_batch_scaling else 1.0)


def lr_at(
    step: int, steps_per_epoch: int, base_lr: float, scale: float, p: AugmentedParams, total=0
):
    """The learning rate of optimiser step ``step`` (from 0), peak base_lr * scale: MAE's
    schedule at the fractional epoch step / steps_per_epoch (at the epoch's integer index with
    ``lr_update`` epoch), or with ``p.iterations`` torch's CosineAnnealingLR over that many
    steps (DINOv2's and DINOv3's), or with ``p.stream`` the cosine over the stream's ``total``
    steps (SimCLR's tf.train.cosine_decay(peak, step, total), down to min_lr)."""
    if p.iterations:
        return iteration_lr(step, base_lr * scale, p)
    if p.stream:
        if total < 1:
            raise ValueError("lr_at: a stream's lr needs its total steps")
        peak = base_lr * scale
        return p.min_lr + (peak - p.min_lr) * 0.5 * (1 + math.cos(math.pi * step / total))
    epoch = step // steps_per_epoch if p.lr_update == "epoch" else step / steps_per_epoch
    return mae_lr(epoch, base_lr * scale, p.warmup_epochs, p.epochs, p.min_lr)


def pass_order(seed: int, q: int, n: int) -> list[int]:
    """The order of the ``n`` training rows in pass (epoch) ``q``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + q)).tolist()


class PassImages(torch.utils.data.Dataset):
    """A stream's training images: item ``q * n + i`` is row ``i`` with the crop and flip
    draws of pass ``q`` (a batch may hold rows of two passes)."""

    def __init__(self, images: TrainImages, n: int):
        self.images, self.n = images, n

    def __getitem__(self, k: int):
        return self.__getitems__([k])[0]

    def __getitems__(self, ks: list[int]) -> list:
        out = [None] * len(ks)
        by_pass: dict[int, list[int]] = {}
        for j, k in enumerate(ks):
            by_pass.setdefault(k // self.n, []).append(j)
        for q, js in by_pass.items():
            self.images.epoch = q
            got = self.images.__getitems__([ks[j] % self.n for j in js])
            for j, item in zip(js, got, strict=True):
                out[j] = item
        return out


def resampled(pre, interpolation: str):
    """The backbone's preprocessing with the recipe's interpolation (``backbone``: its own;
    ``tf1_bicubic`` is applied by ScriptImages)."""
    if interpolation in ("backbone", "tf1_bicubic"):
        return pre
    return replace(pre, interpolation=interpolation)


def probe_images(split, idx, pre, seed: int, augment: bool, p: AugmentedParams):
    """The training (``augment``) or evaluation images of ``split`` at ``idx``: TrainImages,
    or ScriptImages where the recipe resizes with TF1's bicubic or cuts SimCLR's centre box."""
    kw = {"crop_scale": p.crop_scale, "hflip": p.hflip, "crop": p.crop} if augment else {}
    script = p.crop_interpolation == "tf1_bicubic" if augment else bool(p.eval_crop_fraction)
    if not script:
        return TrainImages(split, idx, pre, seed, augment, **kw)
    if not pre.crop:
        raise UserError(
            "linear_aug: tf1_bicubic and eval_crop_fraction resize to the backbone's input "
            "size, and this backbone's preprocessing has no crop size"
        )
    return ScriptImages(
        split,
        idx,
        pre,
        seed,
        augment,
        train_resize=p.crop_interpolation if augment else "",
        eval_fraction=0.0 if augment else p.eval_crop_fraction,
        eval_resize=pre.interpolation
        if p.eval_interpolation == "backbone"
        else p.eval_interpolation,
        **kw,
    )


def n_groups(p: AugmentedParams) -> int:
    """The head stacks of the grid: one per (n last blocks, avgpool), or one."""
    return len(p.n_last_blocks) * len(p.avgpool) if p.n_last_blocks else 1


class Heads:
    """The grid: weights (H, C, D), biases (H, C), their momentum buffers, and the shared
    BatchNorm's running statistics."""

    def __init__(self, H: int, D: int, C: int, p: AugmentedParams, device):
        self.p = p
        if p.head_init_std == 0:
            # zero weights (SimCLR's zero_init_logits_layer), whatever the kind: no draw
            self.W = torch.zeros(H, C, D, device=device)
        elif p.head_init == "normal":
            # the scripts' LinearClassifier: weight.normal_(0, std) per head in grid order,
            # drawn on the CPU (built there, then moved), bias 0
            self.W = torch.empty(H, C, D)
            for w in self.W:
                w.normal_(0.0, p.head_init_std)
            self.W = self.W.to(device)
        else:
            self.W = torch.empty(H, C, D, device=device)
            torch.nn.init.trunc_normal_(self.W, std=p.head_init_std)
        self.b = torch.zeros(H, C, device=device)
        self.mW, self.mb = torch.zeros_like(self.W), torch.zeros_like(self.b)
        self.rmean, self.rvar = torch.zeros(D, device=device), torch.ones(D, device=device)

    def _train_norm(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p
        if not p.batchnorm:
            return x
        out = []
        for i, g in enumerate(x.split(p.bn_rows or len(x))):
            mean, var = g.mean(0), g.var(0, unbiased=False)
            out.append((g - mean) / torch.sqrt(var + p.bn_eps))
            if i == 0:
                unbiased = var * len(g) / max(len(g) - 1, 1)
                self.rmean.mul_(1 - p.bn_momentum).add_(mean, alpha=p.bn_momentum)
                self.rvar.mul_(1 - p.bn_momentum).add_(unbiased, alpha=p.bn_momentum)
        return torch.cat(out)

    def norm(self, x: torch.Tensor, stats=None) -> torch.Tensor:
        if not self.p.batchnorm:
            return x
        mean, var = stats if stats is not None else (self.rmean, self.rvar)
        return (x - mean) / torch.sqrt(var + self.p.bn_eps)

    def logits(self, z: torch.Tensor, W=None, b=None) -> torch.Tensor:
        """(N, D) normalised -> (N, H, C) (or (N, C) for one head's ``W``, ``b``)."""
        W, b = (self.W, self.b) if W is None else (W, b)
        return (z @ W.reshape(-1, W.shape[-1]).T + b.reshape(-1)).view(len(z), *b.shape)

    def step(self, x, y, lr: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
        """One optimiser step of every head on features ``x``; per-head mean losses."""
        z = self._train_norm(x)
        W, b = self.W.requires_grad_(), self.b.requires_grad_()
        logits = self.logits(z, W, b)
        B, H, C = logits.shape
        per = F.cross_entropy(logits.reshape(B * H, C), y.repeat_interleave(H), reduction="none")
        per_head = per.view(B, H).mean(0)
        W.grad = b.grad = None
        per_head.sum().backward()  # each head's gradient is that of its own mean loss
        self.W, self.b = W.detach(), b.detach()
        upd, p = OPTIMISERS[self.p.optimizer], self.p
        kw = {"nesterov": True} if p.nesterov else {}  # sgd only (checked)
        upd(self.W, W.grad, self.mW, lr, wd, p.momentum, p.trust_coefficient, heads=True, **kw)
        upd(self.b, b.grad, self.mb, lr, wd, p.momentum, p.trust_coefficient, heads=True, **kw)
        return per_head.detach()


@contextlib.contextmanager
def frozen_forward(backbone, device, accel: Accel):
    """uint8 NCHW batch -> float32 features on ``device``: eval mode, no gradient, the layout
    and bf16 autocast of feature extraction."""
    backbone.model.to(device).eval()
    amp = autocast_dtype(device) == "bfloat16"
    pre = backbone.preprocessing
    with prepared(backbone, accel) as forward:

        def embed(batch: torch.Tensor) -> torch.Tensor:
            x = pre.normalise(batch.to(device, non_blocking=True))
            x = x.contiguous(memory_format=accel.memory_format())
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
                return forward(x).float()

        yield embed


def _after_epoch(epoch: int, heads) -> None:
    """Hook called after each epoch's validation (tests look at the heads here): the
    :class:`Heads`, or for a multi-layer grid the list of them, one per (n, avgpool)."""


def run_augmented(inp: ImageInputs, p: AugmentedParams) -> ProtocolOutput:
    """The probe, with the unit's state folder locked; the state is saved after every epoch
    and a rerun of the unit resumes from it, ending where an uninterrupted run ends (every
    draw comes from generators seeded by seed and epoch)."""
    if inp.state_dir is None:
        return _run(inp, p, None)
    state_dir, main = Path(inp.state_dir), distributed.is_main()
    with (
        file_lock(lock_path(state_dir), f"the linear_aug state {state_dir}")
        if main
        else (contextlib.nullcontext())
    ):
        out = _run(inp, p, state_dir / "state.pt")
        distributed.barrier()
        if main:
            (state_dir / "state.pt").unlink(missing_ok=True)  # finished: the result is kept
            with contextlib.suppress(OSError):
                state_dir.rmdir()
    return out


def _run(inp: ImageInputs, p: AugmentedParams, state_path: Path | None) -> ProtocolOutput:
    bb, bundle, dev = inp.backbone, inp.bundle, inp.device
    tr, va = np.asarray(inp.train_idx), np.asarray(inp.val_idx)
    if len(va) == 0 or len(tr) == 0:
        raise UserError("linear_aug: the train or validation split is empty")
    check_blocks(bb.model, p)
    n, C, pre = len(tr), bundle.num_classes, bb.preprocessing
    # crops are drawn from (seed, epoch, index): workers change the speed, never the numbers;
    # on a GPU the per-image crops would starve the forward pass without them
    workers = inp.num_workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else 0
    batch, per_epoch, scale = plan(n, p)
    epochs, total = schedule(per_epoch, p, n, batch)
    ends = stream_ends(p, n, batch) if p.stream else []
    settings = grid_settings(p)
    wd = torch.tensor([s[-1] for s in settings], device=dev)
    pre_train, pre_eval = resampled(pre, p.crop_interpolation), resampled(pre, p.eval_interpolation)
    train_ds = probe_images(bundle.train, tr, pre_train, inp.seed, True, p)
    fb = p.forward_batch
    history, best = [], {"val": -1.0}
    per_epoch_test = []
    accel = inp.accel or Accel()
    # pinned host batches (--pin-memory) travel to the GPU while the previous one computes
    loading = {"num_workers": workers, "pin_memory": accel.pin_memory and dev.type == "cuda"}
    source = LayerInput(p)  # the backbone's own feature, or the kept columns of layers:N
    with frozen_forward(source.reader(bb), dev, accel) as read:

        def embed(batch: torch.Tensor) -> torch.Tensor:
            return source.select(read(batch))

        shared = SharedForward(embed, loading, dev)  # under torchrun: cuts r, r + W ... here
        val_x, val_y = shared.all(probe_images(bundle.train, va, pre_eval, 0, False, p), fb)
        test_ds = probe_images(bundle.test, np.arange(len(bundle.test)), pre_eval, 0, False, p)
        test_x, test_y = shared.all(test_ds, fb)
        val_y, test_y = val_y.to(dev), test_y.to(dev)
        torch.manual_seed(inp.seed)
        groups = source.groups(len(settings))
        stacks = [Heads(g.heads.stop - g.heads.start, width(g, val_x), C, p, dev) for g in groups]
        finite = torch.ones(len(settings), dtype=torch.bool, device=dev)
        step, start = 0, 0
        fingerprint = sha256_json(
            {"params": asdict(p), "seed": inp.seed, "n": n, "backbone": bb.weights.sha256}
        )
        st = resume(state_path, fingerprint, n_groups(p), epochs, dev)
        if st is not None:
            for heads, saved in zip(stacks, st["heads"], strict=True):
                for k in HEAD_STATE:
                    setattr(heads, k, saved[k])
            finite, step, best = st["finite"], st["step"], st["best"]
            history, per_epoch_test, start = st["history"], list(st["test"]), st["epoch"] + 1
            on = f" on rank {distributed.rank()}" if distributed.world() > 1 else ""
            print(
                f"[resume] linear_aug from epoch {start} of {epochs}{on} ({state_path})",
                flush=True,
            )
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            if p.stream:  # the steps up to this scoring (stream_ends)
                rows = stream_rows(
                    step, ends[epoch], batch, n, lambda q: pass_order(inp.seed, q, n)
                )
                images = PassImages(train_ds, n)
            else:
                train_ds.epoch, images = epoch, train_ds
                order = pass_order(inp.seed, epoch, n)[: per_epoch * batch]
                rows = [order[s : s + batch] for s in range(0, len(order), batch)]  # one a step
                rows = rows[: total - step]  # a fixed iteration count ends within the last pass
            # each step's rows, cut into backbone forwards of at most forward_batch images
            cuts = [r[c : c + fb] for r in rows for c in range(0, len(r), fb)]
            feats, labels, losses, want = [], [], [], iter([len(r) for r in rows])
            need = next(want, 0)
            for f, y in shared.cuts(images, cuts):  # every rank: every cut, in order
                feats.append(f)
                labels.append(y)
                if sum(len(f) for f in feats) < need:
                    continue
                lr = torch.tensor(
                    [lr_at(step, per_epoch, s[-2], scale, p, total) for s in settings],
                    device=dev,
                )
                x, yb = torch.cat(feats), torch.cat(labels).to(dev)
                loss = torch.cat(
                    [
                        heads.step(columns_of(x, grp), yb, lr[grp.heads], wd[grp.heads])
                        for grp, heads in zip(groups, stacks, strict=True)
                    ]
                )
                finite &= torch.isfinite(loss)
                losses.append(loss)
                feats, labels, step, need = [], [], step + 1, next(want, 0)
            if not bool(finite.any()):
                raise UserError(
                    f"linear_aug: every head diverged at epoch {epoch} (base_lrs "
                    f"{list(p.base_lrs)}); lower them, e.g. --set base_lrs=[0.01]"
                )
            val_acc = _top1(stacks, groups, val_x, val_y)
            test_acc = _top1(stacks, groups, test_x, test_y)  # details only (MAE's rule)
            sel = torch.where(finite, val_acc, -1.0)
            h = int(torch.argmax(sel))
            # select=final: the heads as training ends, as the DINOv2/v3 scripts report them
            if float(sel[h]) > best["val"] and (p.select == "epoch" or epoch == epochs - 1):
                gi, local = locate(groups, h)
                best = {
                    "val": float(sel[h]),
                    "epoch": epoch,
                    "head": h,
                    "W": stacks[gi].W[local].clone(),
                    "b": stacks[gi].b[local].clone(),
                    "stats": (stacks[gi].rmean.clone(), stacks[gi].rvar.clone()),
                }
            per_epoch_test.append(test_acc.cpu())
            history.append(
                {
                    "epoch": epoch,
                    **({"steps_done": step} if p.stream else {}),
                    "loss": [float(v) for v in torch.stack(losses).mean(0)] if losses else [],
                    "val_top1": [float(v) for v in val_acc],
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            save(
                state_path,
                {
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "heads": [{k: getattr(heads, k) for k in HEAD_STATE} for heads in stacks],
                    "finite": finite,
                    "step": step,
                    "best": best,
                    "history": history,
                    "test": torch.stack(per_epoch_test),
                },
            )
            _after_epoch(epoch, stacks if source.kind else stacks[0])
        by_rank = shared.by_rank()
    h = best["head"]
    gi, _ = locate(groups, h)
    z = stacks[gi].norm(columns_of(test_x, groups[gi]), best["stats"])
    hits = topk_hits(z @ best["W"].T + best["b"], test_y)
    shares = {} if by_rank is None else {"images_embedded_by_rank": by_rank}  # provenance
    tests = torch.stack(per_epoch_test)  # (epochs, heads)
    extra = {}
    if p.select == "epoch":
        extra["mae_rule_test_top1"] = float(tests[:, h].max())
    if p.report_test_choice:
        extra["script_choice"] = script_choice(tests[-1], finite.cpu(), settings, scale)
    if source.kind is not None:
        extra["features_read"] = source.record()
    if p.stream:  # passes of the training rows begun; the heads scored after `scored_at` steps
        extra["stream"] = {"passes": math.ceil(step * batch / n), "scored_at": ends}
    elif p.iterations:
        extra["epochs_run"] = epochs
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "selected": setting_dict(settings[h], scale) | {"epoch": best["epoch"]},
            "best_val_top1": best["val"],
            **grid_edges(
                edge("lrs", [s[-2] for s in settings], [settings[h][-2]]),
                edge("weight_decays", [s[-1] for s in settings], [settings[h][-1]], floor=0.0),
            ),
            "settings": [
                {k: v for k, v in setting_dict(s, scale).items() if k != "lr"} for s in settings
            ],
            "history": history,
            **extra,
            "batch": batch,
            "steps_per_epoch": per_epoch,
            "steps": step,
            "diverged_heads": int((~finite).sum()),
            "train_size": n,
            "val_size": len(va),
            **shares,
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )


def _top1(stacks: list[Heads], groups: list[Group], x: torch.Tensor, y: torch.Tensor):
    """Top-1 of every head of the grid on (x, y), in grid order."""
    return torch.cat(
        [
            (h.logits(h.norm(columns_of(x, g))).argmax(2) == y.view(-1, 1)).float().mean(0)
            for g, h in zip(groups, stacks, strict=True)
        ]
    )


PROTOCOL_TYPES.register(
    "linear_aug",
    ProtocolType("linear_aug", AugmentedParams, run_augmented, inputs="images"),
)
