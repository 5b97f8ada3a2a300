"""Attentive probing: a pooler (protocols/_poolers.py) and a linear classifier trained on the
frozen backbone's patch tokens, a grid of learning rates x weight decays at once.

Every step reads one batch of tokens (from the token cache when the bank fits the card's
budget, computed from the images otherwise: features/tokens.py) and trains every head of the
grid on it: the heads' losses are summed, so each head gets exactly the gradient it would get
alone, and each has its own optimiser (tests/test_attentive.py trains a grid and its heads one
by one). Each head starts from its own seeded initialisation, a function of (seed, lr, weight
decay). The head with the best top-1 on the validation rows (the first on ties) alone is
scored on test, with per-image hits for bootstrap intervals. The learning-rate schedules are
those of the official scripts (``SCHEDULES``), the step counted from 0.

The training state (heads, optimiser, step, the shuffling generator) is saved at the end of an
epoch, at most every total / 20 steps, in the unit's state folder (atomically, behind a length
and crc32 header); a rerun of a killed unit resumes from it and ends where an uninterrupted run
ends (tests/test_kill.py). The folder is removed when the unit finishes.

Under torchrun (docs/distributed.md, protocols/_grid_share.py) the grid is shared out: each
rank trains a contiguous share of the heads on every batch (the same heads, bit for bit, as
one process trains), streamed tokens are computed one batch per rank and round and gathered
to every rank, the validation scores are gathered in grid order, the selected head is sent
from the rank that trained it and each rank scores a share of the test batches. Rank 0 writes
the state, every head of the grid in it (gathered first); every rank resumes its share of it.
The record is one process's, but for the provenance that names the processes
(tests/test_attentive_dist.py).

Training views (``train_crop`` and the params after it; neutral by default, when the training
tokens are the backbone's resize and centre crop, cached as above): the scripts' training
transforms, a random resized crop (``_images.CROPS``: torchvision's rule or MAE's), a flip,
timm's AutoAugment or RandAugment and timm's random erasing. Each training image then gets a
new random view every epoch, drawn from (seed, epoch, image index) (``_images.TrainImages``;
the erasing from (seed, epoch, batch number)), and its tokens are computed online, batch by
batch (never cached: memory stays bounded by a batch; bf16 autocast on a GPU, as the token
cache embeds), every head of the grid trained on that one forward. Under torchrun rank r
embeds batches r, r + W ... of the one process's batches, gathered to every rank in batch
order (as ``shared`` streamed tokens). Validation and test tokens stay the deterministic ones
(the validation rows' own token source, cached when it fits the budget). The record says
which (``tokens_train``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import distributed
from ..core.errors import UserError
from ..core.files import file_lock, lock_path, sha256_json
from ..core.provenance import autocast_dtype
from ..core.registry import Registry
from ..data.transforms import Preprocessing
from ..features.extraction import default_cache_dir
from ..features.loading import loader, worker_errors
from ..features.tokens import token_source
from . import _grid_share
from ._edges import edge, grid_edges
from ._images import CROPS, TrainImages, check_crop, random_erase, timm_augment
from ._poolers import POOLERS
from .augmented import INTERPOLATIONS, resampled
from .base import PROTOCOL_TYPES, ImageInputs, ProtocolOutput, ProtocolType, topk_hits

# ------------------------------------------------------------------ the official schedules


def _capi(i: int, total: int, warm: float, peak: float, p) -> float:
    """CAPI eval_classification.py: linspace(0, 1, W) then (cos(linspace(0, pi, T - W)) + 1) / 2
    times the peak, indexed by the iteration (from 0)."""
    w = int(warm)
    if i < w:
        return peak * (i / (w - 1) if w > 1 else 0.0)
    rest = total - w
    return peak * ((math.cos(math.pi * (i - w) / (rest - 1)) + 1) / 2 if rest > 1 else 1.0)


def _vjepa2(i: int, total: int, warm: float, peak: float, p) -> float:
    """V-JEPA 2 WarmupCosineLRSchedule, stepped before each iteration (step = i + 1): linear
    from start_lr over int(warmup x iterations per epoch) steps, then cosine to final_lr."""
    w, step = int(warm), i + 1
    if step < w:
        return p.start_lr + step / max(1, w) * (peak - p.start_lr)
    progress = (step - w) / max(1, total - w)
    return max(
        p.final_lr, p.final_lr + (peak - p.final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def _mae(i: int, total: int, warm: float, peak: float, p) -> float:
    """MAE util/lr_sched.py (efficient probing): at the fractional epoch e = i / iterations per
    epoch, linear warmup to the peak, then half-cycle cosine to final_lr (min_lr)."""
    if i < warm:
        return peak * i / warm
    return p.final_lr + (peak - p.final_lr) * 0.5 * (
        1 + math.cos(math.pi * (i - warm) / (total - warm))
    )


SCHEDULES: Registry[Callable] = Registry("attentive schedule")
SCHEDULES.register("capi", _capi)
SCHEDULES.register("vjepa2", _vjepa2)
SCHEDULES.register("mae", _mae)
LR_SCALING = {"none": lambda batch: 1.0, "batch/256": lambda batch: batch / 256}
# What each schedule's official script reports, which decides the epoch ssl-eval scores:
# ``last`` (CAPI: the head chosen on its held-out split at the last iteration, ssl-eval's own
# rule; V-JEPA 2: every epoch's best head on its test set is logged, the run ends at the last
# epoch, no epoch is chosen) scores the last step; ``best_epoch`` (efficient probing's
# main_linprobe.py, MAE's: max_accuracy, the best epoch on its test set) is followed on the
# validation split: the (epoch, head) with the best validation top-1 is scored on test.
SCRIPT_RULES = {"capi": "last", "vjepa2": "last", "mae": "best_epoch"}
# the training views' resize: linear_aug's but tf1_bicubic, which only its ScriptImages
# applies (resampled() leaves the backbone's own for it)
VIEW_INTERPOLATIONS = tuple(i for i in INTERPOLATIONS if i != "tf1_bicubic")


@dataclass(frozen=True)
class AttentiveParams:
    # the training views, added after the suites' references were made: at these values the
    # heads train on the backbone's resize and centre crop as before (the same numbers), so
    # they stay out of the cards' settings (cards.py)
    NEUTRAL: ClassVar[dict] = {
        "train_crop": "none",
        "crop_scale": (0.08, 1.0),
        "hflip": False,
        "crop_interpolation": "backbone",
        "auto_augment": "none",
        "random_erase": 0.0,
        # added later too: true (every script before V-JEPA 2's) drops the last partial batch
        "drop_last": True,
    }
    pooler: str = "capi"  # POOLERS: capi | ep | vjepa2
    heads: int = 0  # attention heads (0: width / 64, CAPI's rule)
    depth: int = 1  # vjepa2: depth - 1 self-attention blocks + the cross-attention block
    queries: int = 32  # ep: learned queries
    with_prefix: bool = False  # class and register tokens join the patch tokens
    lrs: tuple[float, ...] = (1e-4, 1e-3)
    weight_decays: tuple[float, ...] = (0.0,)
    lr_scaling: str = "batch/256"  # the peak lr is lr x this of the batch: none | batch/256
    optimizer: str = "adamw"  # adamw | lars
    betas: tuple[float, ...] = (0.9, 0.999)  # adamw
    momentum: float = 0.9  # lars
    no_decay: str = "none"  # adamw: which parameters skip weight decay: none | bias
    schedule: str = "capi"  # SCHEDULES: capi | vjepa2 | mae
    epochs: float = 0.0  # the length: epochs over the training rows, or
    iterations: int = 0  # a number of steps (exactly one of the two is set)
    warmup: float = 0.0  # in the unit of the length (epochs or iterations)
    start_lr: float = 0.0  # vjepa2: the warmup starts here (absolute)
    final_lr: float = 0.0  # vjepa2 / mae: the cosine ends here (absolute)
    batch_size: int = 128
    eval_batch_size: int = 256
    token_budget_gb: float = 4.0  # cache the float16 tokens when they fit, stream otherwise
    reference: str = ""  # the official script this card follows
    # the training views: none, the backbone's resize and centre crop (tokens cached within
    # the budget); torchvision | mae (_images.CROPS), a random resized crop of each training
    # image, new every epoch, its tokens computed online
    train_crop: str = "none"
    crop_scale: tuple[float, ...] = (0.08, 1.0)  # the crop's share of the image's area
    hflip: bool = False  # a horizontal flip with probability 0.5
    # the crop's resize: backbone (its preprocessing's) | bilinear | bicubic | nearest
    crop_interpolation: str = "backbone"
    # timm's policy string, as create_transform's auto_augment: rand-* RandAugment, any other
    # AutoAugment (original, v0 ...); none
    auto_augment: str = "none"
    random_erase: float = 0.0  # timm's RandomErasing probability (pixel mode, one box)
    # an epoch's last partial batch: dropped (CAPI's and efficient probing's loaders,
    # drop_last=True), or trained on as a step of its own (V-JEPA 2's make_dataloader,
    # drop_last=False: len(loader) = ceil(rows / batch) steps an epoch, every row each epoch)
    drop_last: bool = True

    def __post_init__(self):
        POOLERS.get(self.pooler)
        SCHEDULES.get(self.schedule)
        bad = []
        if (self.epochs > 0) == (self.iterations > 0) or self.epochs < 0 or self.iterations < 0:
            bad.append("exactly one of epochs and iterations must be > 0")
        length = self.epochs or self.iterations
        if not 0 <= self.warmup < max(length, 1e-12):
            unit = "epochs" if self.epochs > 0 else "iterations"
            bad.append(
                f"warmup {self.warmup:g} must be >= 0 and shorter than the run ({length:g} "
                f"{unit}): set it with the length (--set warmup=N, in {unit})"
            )
        if not self.lrs or not self.weight_decays or min(self.lrs) <= 0:
            bad.append("lrs (each > 0) and weight_decays must list at least one value")
        if self.weight_decays and min(self.weight_decays) < 0:
            bad.append("weight decays must be >= 0")
        if min(self.batch_size, self.eval_batch_size, self.depth, self.queries) < 1:
            bad.append("batch sizes, depth and queries must be at least 1")
        if self.heads < 0 or self.token_budget_gb < 0 or min(self.start_lr, self.final_lr) < 0:
            bad.append("heads, token_budget_gb, start_lr and final_lr must be >= 0")
        if self.lr_scaling not in LR_SCALING:
            bad.append(f"lr_scaling must be one of {sorted(LR_SCALING)}")
        if self.optimizer not in ("adamw", "lars") or self.no_decay not in ("none", "bias"):
            bad.append("optimizer must be adamw or lars, no_decay none or bias")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in (*self.betas, self.momentum)):
            bad.append("betas must be two values in [0, 1), momentum in [0, 1)")
        if not isinstance(self.drop_last, bool):
            bad.append(f"drop_last is true or false, not {self.drop_last!r}")
        if bad:
            raise UserError(f"attentive: {bad[0]}")
        self._check_views()

    def _check_views(self) -> None:
        if self.train_crop not in ("none", *CROPS):
            raise UserError(
                f"attentive: train_crop is one of {['none', *sorted(CROPS)]}, not {self.train_crop!r}"
            )
        if not isinstance(self.hflip, bool):
            raise UserError(f"attentive: hflip is true or false, not {self.hflip!r}")
        if self.crop_interpolation not in VIEW_INTERPOLATIONS:
            raise UserError(
                f"attentive: crop_interpolation is one of {list(VIEW_INTERPOLATIONS)}, "
                f"not {self.crop_interpolation!r}"
            )
        if not 0 <= self.random_erase <= 1:
            raise UserError(f"attentive: random_erase is in [0, 1], not {self.random_erase}")
        if not self.augmented:
            moved = [
                k
                for k, v in self.NEUTRAL.items()
                if k not in ("train_crop", "drop_last")
                and (
                    list(getattr(self, k)) != list(v)
                    if isinstance(v, tuple)
                    else getattr(self, k) != v
                )
            ]
            if moved:

                def value(v: object) -> str:  # as --set reads it back
                    if isinstance(v, bool):
                        return str(v).lower()
                    return f"[{','.join(map(str, v))}]" if isinstance(v, tuple) else str(v)

                neutral = " ".join(f"--set {k}={value(self.NEUTRAL[k])}" for k in moved)
                raise UserError(
                    f"attentive: {', '.join(moved)} shape the random training views: set "
                    f"train_crop (one of {sorted(CROPS)}) with them, or set them back to no "
                    f"views ({neutral})"
                )
            return
        check_crop("attentive", self.train_crop, self.crop_scale)
        timm_augment(self.auto_augment, Preprocessing())  # an unknown policy: one line

    @property
    def augmented(self) -> bool:
        """Whether the training tokens come from random views computed online."""
        return self.train_crop != "none"

    def settings(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]


@dataclass(frozen=True)
class Plan:
    """The schedule of a run on ``n`` training rows: batch, steps per epoch, total, warmup."""

    batch: int
    per_epoch: int
    total: int
    warmup: float  # in steps (a float: the schedules round it as their script does)
    scale: float  # the lr multiplier of the batch rule
    rows: int = 0  # training rows an epoch reads (per_epoch x batch, or all with a partial)

    def lr(self, i: int, peak: float, p: AttentiveParams) -> float:
        return SCHEDULES.get(p.schedule)(i, self.total, self.warmup, peak * self.scale, p)

    def rows_read(self) -> int:
        """Training rows the heads read in the ``total`` steps (steps x batch without a
        partial batch; an epoch's last batch counts its own rows)."""
        epochs, rest = divmod(self.total, self.per_epoch)
        return epochs * self.rows + min(rest * self.batch, self.rows)


def plan(n: int, p: AttentiveParams) -> Plan:
    """Full batches only where the script drops the last partial batch (``drop_last``: CAPI,
    efficient probing), else ceil(n / batch) steps an epoch, the last one partial (V-JEPA 2);
    a batch larger than the training rows shrinks to them (tiny data), and the lr rule follows
    the batch used."""
    batch = min(p.batch_size, n)
    per_epoch = n // batch if p.drop_last else math.ceil(n / batch)
    if p.iterations:
        total, warm = p.iterations, float(p.warmup)
    else:
        total, warm = int(p.epochs * per_epoch), p.warmup * per_epoch
    if total < 1:
        raise UserError(f"attentive: {p.epochs} epochs of {n} rows is no step; raise epochs")
    rows = min(per_epoch * batch, n)
    return Plan(batch, per_epoch, total, warm, LR_SCALING[p.lr_scaling](batch), rows)


class _Lars(torch.optim.Optimizer):
    """LARS as MAE's util/lars.py: on parameters of 2+ dims, weight decay added to the gradient
    and the update scaled by 0.001 |w| / |update|; momentum on every parameter."""

    def __init__(self, groups, momentum: float):
        super().__init__(groups, {"lr": 0.0, "weight_decay": 0.0, "momentum": momentum})

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for w in g["params"]:
                if w.grad is None:
                    continue
                d = w.grad
                if w.ndim > 1:
                    d = d.add(w, alpha=g["weight_decay"])
                    wn, dn = torch.norm(w), torch.norm(d)
                    one = torch.ones_like(wn)
                    d = d * torch.where(wn > 0, torch.where(dn > 0, 0.001 * wn / dn, one), one)
                mu = self.state[w].setdefault("mu", torch.zeros_like(w))
                mu.mul_(g["momentum"]).add_(d)
                w.add_(mu, alpha=-g["lr"])


def _head(dim: int, classes: int, setting, seed: int, p: AttentiveParams) -> nn.Module:
    """A head initialised from (seed, lr, wd): the same head alone or in any grid."""
    tag = hashlib.sha256(f"{seed}:{setting[0]!r}:{setting[1]!r}".encode()).hexdigest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(tag[:8], 16))
        return POOLERS.get(p.pooler).build(dim, classes, p)


def _optimizer(heads, settings, p: AttentiveParams):
    groups = []
    for h, (lr, wd) in zip(heads, settings, strict=True):
        named = list(h.named_parameters())
        skip = [w for n, w in named if p.no_decay == "bias" and n.endswith("bias")]
        keep = [w for n, w in named if not (p.no_decay == "bias" and n.endswith("bias"))]
        groups += [{"params": keep, "weight_decay": wd, "peak": lr}]
        if skip:
            groups += [{"params": skip, "weight_decay": 0.0, "peak": lr}]
    if p.optimizer == "lars":
        return _Lars(groups, p.momentum)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(p.betas))


# images per backbone call of the online views (a batch's tokens are the calls' together)
FORWARD_CHUNK = 256


class OnlineViews:
    """The training tokens of the random views (``p.train_crop`` ...): ``batches`` as a token
    source's, each batch's images drawn for ``epoch`` (set it before each epoch), loaded,
    normalised, randomly erased and embedded (no gradient, bf16 autocast where the device runs
    it), never cached. Under torchrun rank r embeds batches r, r + W ... and every rank gets
    every batch, in order."""

    def __init__(self, bb, split, p: AttentiveParams, seed: int, device, workers, pin, dim):
        self.bb, self.p, self.seed, self.device, self.dim = bb, p, seed, device, dim
        pre = resampled(bb.preprocessing, p.crop_interpolation)
        everything = np.arange(len(split))  # item i is row i: a batch of rows is a cut
        self.views = TrainImages(
            split, everything, pre, seed, True, p.crop_scale, p.hflip, p.train_crop, p.auto_augment
        )
        self.loading = {"num_workers": workers, "pin_memory": pin}
        self.epoch = 0

    def batches(self, order, batch_size: int, *, shared: bool = True):
        """(rows, tokens (B, h, w, D), prefix (B, P, D) or None) of ``order`` cut in batches."""
        order = np.asarray(order, dtype=np.int64)
        cuts = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        self.views.epoch = self.epoch
        W, r = distributed.world(), distributed.rank()
        self.bb.model.to(self.device).eval()

        def mine():
            mine = [c.tolist() for c in cuts[r::W]]
            batches = loader(self.views, batch_sampler=mine, **self.loading)
            for k, (x, _) in zip(range(r, len(cuts), W), worker_errors(batches), strict=True):
                t, pre = self._embed(x, k)
                yield (t, pre) if W == 1 else (t.cpu(), None if pre is None else pre.cpu())

        for take, (t, pre) in zip(cuts, distributed.in_rounds(len(cuts), mine()), strict=True):
            yield take, t, pre

    @torch.no_grad()
    def _embed(self, x: torch.Tensor, k: int):
        """Batch number ``k``'s uint8 views -> tokens and prefix on the device, a chunk of
        images at a time (the float images and the forward's activations bounded by a chunk)."""
        dev, p = self.device, self.p
        amp = autocast_dtype(dev) == "bfloat16"
        # timm's erasing after the normalisation, as its loader erases; drawn image by image
        # in batch order, so the chunks erase as the whole batch would
        rng = np.random.default_rng([self.seed, self.epoch, k])
        grids = []
        for chunk in x.split(FORWARD_CHUNK):
            z = self.bb.preprocessing.normalise(chunk.to(dev, non_blocking=True))
            if p.random_erase:
                random_erase(z, p.random_erase, rng)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                grids.append(self.bb.patch_grid(z))
        t = torch.cat([g.tokens.float() for g in grids])
        pre = None if grids[0].prefix is None else torch.cat([g.prefix.float() for g in grids])
        return t, pre

    def record(self, views: int) -> dict:
        """The views' transform, for the result record; ``views``: how many the heads read
        (steps x batch: the same in one process, under torchrun and after a resume)."""
        p = self.p
        return {
            "tokens": "augmented online",
            "train_crop": p.train_crop,
            "crop_scale": list(p.crop_scale),
            "hflip": p.hflip,
            "crop_interpolation": p.crop_interpolation,
            "auto_augment": p.auto_augment,
            "random_erase": p.random_erase,
            "views": views,
            "token_dim": self.dim,
        }


def _token_set(t: torch.Tensor, pre: torch.Tensor | None, p: AttentiveParams, device):
    x = t.reshape(t.shape[0], -1, t.shape[-1])
    if p.with_prefix and pre is not None:
        x = torch.cat([pre, x], dim=1)
    return x.to(device)


def train_heads(
    src,
    rows,
    labels: dict,
    classes: int,
    p: AttentiveParams,
    settings,
    seed,
    device,
    state_path: Path | None = None,
    tracker=None,
):
    """The grid's heads trained together on ``rows`` of ``src``; ``labels`` maps row -> class.
    Returns this rank's share of the heads (all of them in one process: ``_grid_share``).
    With ``state_path``, the state is saved there after an epoch (at most every total / 20
    steps) and a saved state of the same run is resumed. ``tracker`` (``_EpochTracker``) is
    called after every epoch (the last, partial one included) and its state saved with the
    heads'."""
    pl = plan(len(rows), p)
    part = _grid_share.share(len(settings))
    heads = [_head(src.dim, classes, s, seed, p).to(device).train() for s in settings[part]]
    opts = [_optimizer([h], [s], p) for h, s in zip(heads, settings[part], strict=True)]
    g = torch.Generator().manual_seed(seed)
    step = saved = 0
    fingerprint = sha256_json(
        {
            "params": asdict(p),
            "settings": settings,
            "seed": seed,
            "classes": classes,
            "rows": hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest(),
            "labels": [labels[int(r)] for r in rows],
            "dim": src.dim,
            "layout": _grid_share.STATE_LAYOUT,
            "epoch_rule": None if tracker is None else SCRIPT_RULES[p.schedule],
        }
    )
    st = _grid_share.load(state_path, fingerprint, pl.total, len(settings))
    if st is not None:
        for h, w, o, s in zip(heads, st["heads"], opts, st["opt"], strict=True):
            h.load_state_dict(w)
            o.load_state_dict(s)
        g.set_state(st["generator"])
        torch.set_rng_state(st["rng"])
        step = saved = st["step"]
        if tracker is not None:
            tracker.restore(st.get("tracker"))
        if distributed.is_main():
            print(f"[resume] attentive from step {step} of {pl.total} ({state_path})", flush=True)
    while step < pl.total:
        if isinstance(src, OnlineViews):  # the epoch's random views (a resumed run's too)
            src.epoch = step // pl.per_epoch
        perm = np.asarray(rows)[torch.randperm(len(rows), generator=g).numpy()]
        order = perm[: pl.rows]
        for take, t, pre in src.batches(order, pl.batch, shared=True):
            if heads:  # a rank with no head (more ranks than heads) still computes its tokens
                for opt in opts:
                    for group in opt.param_groups:
                        group["lr"] = pl.lr(step, group["peak"], p)
                x = _token_set(t, pre, p, device)
                y = torch.as_tensor([labels[int(r)] for r in take], device=device)
                loss = sum(F.cross_entropy(h(x), y) for h in heads)
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                loss.backward()
                for opt in opts:
                    opt.step()
            step += 1
            if step == pl.total:
                break
        if tracker is not None:
            tracker.after_epoch(heads)
        if step < pl.total and step - saved >= pl.total / 20:
            state = {"fingerprint": fingerprint, "step": step, "generator": g.get_state()}
            if tracker is not None:
                state["tracker"] = tracker.state()
            _grid_share.save(state_path, state | {"rng": torch.get_rng_state()}, heads, opts)
            saved = step
    return [h.eval() for h in heads], pl


@torch.no_grad()
def _logits(heads, src, rows, p: AttentiveParams, device, **which) -> list[list[torch.Tensor]]:
    """Each head's logits, batch by batch (``which``: the batches' numbers, shared)."""
    out = [[] for _ in heads]
    for _, t, pre in src.batches(rows, p.eval_batch_size, **which):
        x = _token_set(t, pre, p, device)
        for o, h in zip(out, heads, strict=True):
            o.append(h(x).float().cpu())
    return out


def _val_top1(heads, src, rows, y: torch.Tensor, p: AttentiveParams, device) -> list[float]:
    """Each head of the grid's top-1 (argmax, the first class on ties) on ``rows``."""
    return _grid_share.in_grid_order(
        [
            float((torch.cat(s).argmax(1) == y).float().mean())
            for s in _logits(heads, src, rows, p, device, shared=True)
        ]
    )


def _test_hits(heads, te, y: torch.Tensor, p: AttentiveParams, device) -> list[dict]:
    """This rank's heads' top-1 / top-5 hits on every test row."""
    return [
        topk_hits(torch.cat(s), y, (1, 5)) for s in _logits(heads, te, None, p, device, shared=True)
    ]


class _EpochTracker:
    """The ``best_epoch`` rule, after every epoch: every head's validation top-1 (the
    (epoch, head) with the best one, the first on ties, is the one ssl-eval reports, its test
    hits kept from that epoch) and every head's test top-1 (for the script's own number, the
    best epoch on test, recorded beside ssl-eval's, never in its place)."""

    def __init__(self, tr, te, val_idx, y_val, y_test, p: AttentiveParams, device):
        self.tr, self.te, self.val_idx, self.p, self.device = tr, te, val_idx, p, device
        self.y_val, self.y_test = y_val, y_test
        self.epoch = 0
        self.best = {"val": -1.0, "epoch": -1, "head": -1, "hits": None, "grid": None}
        self.history: list[dict] = []  # per epoch: every head's validation and test top-1

    def after_epoch(self, heads) -> None:
        for h in heads:  # scored as the final heads are: BatchNorm on its running statistics
            h.eval()
        val = _val_top1(heads, self.tr, self.val_idx, self.y_val, self.p, self.device)
        mine = _test_hits(heads, self.te, self.y_test, self.p, self.device)
        for h in heads:
            h.train()
        test = _grid_share.in_grid_order([float(x[1].mean()) for x in mine])
        h = int(np.argmax(val))  # the first of equal scores
        if val[h] > self.best["val"]:  # an equal score later keeps the earlier epoch
            first = _grid_share.share(len(val)).start
            hits = _grid_share.in_grid_order(
                [x if first + i == h else None for i, x in enumerate(mine)]
            )[h]
            hits = {k: torch.from_numpy(v) for k, v in hits.items()}  # a state holds tensors
            self.best = {"val": val[h], "epoch": self.epoch, "head": h, "hits": hits, "grid": val}
        self.history.append({"epoch": self.epoch, "val_top1": val, "test_top1": test})
        self.epoch += 1

    def state(self) -> dict:
        return {"epoch": self.epoch, "best": self.best, "history": self.history}

    def restore(self, st: dict | None) -> None:
        if st is None:  # the fingerprint holds the rule: a state of this run has its scores
            raise UserError("attentive: a saved state without its per-epoch scores")
        self.epoch, self.best, self.history = st["epoch"], st["best"], st["history"]


def _script_choice(rule: str, settings, tests: list[float], epoch: int) -> dict:
    """The number the card's official script reports by its own rule: the best test top-1."""
    h = int(np.argmax(tests))
    return {
        "rule": rule + "; chosen on test, so optimistic: not the reported number (chosen on "
        "validation)",
        "selected": {"lr": settings[h][0], "weight_decay": settings[h][1], "epoch": epoch},
        "top1": tests[h],
    }


def run_attentive(inp: ImageInputs, p: AttentiveParams) -> ProtocolOutput:
    """The probe, with the unit's state folder locked (rank 0) while it trains; the folder is
    removed when the unit finishes."""
    if inp.state_dir is None:
        return _run(inp, p, None)
    state_dir, main = Path(inp.state_dir), distributed.is_main()
    lock = file_lock(lock_path(state_dir), f"the attentive state {state_dir}")
    with lock if main else contextlib.nullcontext():
        out = _run(inp, p, state_dir / "state.pt")
        distributed.barrier()
        if main:
            (state_dir / "state.pt").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                state_dir.rmdir()
    return out


def _run(inp: ImageInputs, p: AttentiveParams, state_path: Path | None) -> ProtocolOutput:
    bb, bundle, device = inp.backbone, inp.bundle, inp.device
    budget = int(p.token_budget_gb * 2**30)
    # the deterministic tokens: the training and validation rows', or the validation rows'
    # alone where the training rows' come from random views computed online
    rows = np.sort(inp.val_idx if p.augmented else np.concatenate([inp.train_idx, inp.val_idx]))
    cache = inp.cache_dir or default_cache_dir()
    kw = {"device": device, "batch_size": 64, "cache_dir": cache, "num_workers": inp.num_workers}
    try:
        tr = token_source(bb, bundle, "train", rows, budget_bytes=budget, **kw)
    except UserError as e:
        raise UserError(f"the attentive probe reads patch tokens: {e}") from None
    te = token_source(bb, bundle, "test", None, budget_bytes=budget - tr.nbytes * tr.cached, **kw)
    labels = {int(r): int(bundle.train.labels[r]) for r in rows}
    settings = p.settings()
    classes, seed = bundle.num_classes, inp.seed
    y_val = torch.as_tensor(bundle.train.labels[inp.val_idx])
    y_test = torch.as_tensor(bundle.test.labels)
    rule = SCRIPT_RULES[p.schedule]
    tracker = None
    if rule == "best_epoch":
        tracker = _EpochTracker(tr, te, inp.val_idx, y_val, y_test, p, device)
    src = tr
    if p.augmented:
        labels |= {int(r): int(bundle.train.labels[r]) for r in inp.train_idx}
        workers = inp.num_workers
        if workers is None:  # the views are drawn per image (seeded): workers change no number
            workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        pin = bool(getattr(inp.accel, "pin_memory", False)) and device.type == "cuda"
        src = OnlineViews(bb, bundle.train, p, seed, device, workers, pin, tr.dim)
    mine, pl = train_heads(
        src, inp.train_idx, labels, classes, p, settings, seed, device, state_path, tracker
    )
    extra = {}
    if tracker is not None:  # the (epoch, head) chosen on validation, scored at that epoch
        b = tracker.best
        best, val, hits = b["head"], b["grid"], {k: v.numpy() for k, v in b["hits"].items()}
        head = _head(tr.dim, classes, settings[best], seed, p)  # its size, for the record
        per_head = [[e["test_top1"][k] for e in tracker.history] for k in range(len(settings))]
        e = int(np.argmax(per_head[best]))
        extra = {
            "best_epoch": b["epoch"],
            "epochs_run": len(tracker.history),
            "history": [{"epoch": h["epoch"], "val_top1": h["val_top1"]} for h in tracker.history],
            # efficient probing's main_linprobe.py: the best epoch's test top-1 of the run
            # (its one head; here the setting chosen on validation)
            "script_choice": {
                "rule": "the best epoch's test top-1 of the selected setting (main_linprobe.py's "
                "max_accuracy); chosen on test, so optimistic: not the reported number (chosen "
                "on validation)",
                "selected": {
                    "lr": settings[best][0],
                    "weight_decay": settings[best][1],
                    "epoch": e,
                },
                "top1": per_head[best][e],
            },
        }
    else:
        val = _val_top1(mine, tr, inp.val_idx, y_val, p, device)
        best = int(np.argmax(val))  # the first of equal scores
        head = _grid_share.selected_head(
            best,
            len(settings),
            mine,
            lambda: _head(tr.dim, classes, settings[best], seed, p).to(device),
        )
        test_scores = _grid_share.batch_shares(
            lambda numbers: _logits([head], te, None, p, device, numbers=numbers)[0],
            _grid_share.batch_count(len(te.rows), p.eval_batch_size),
        )
        hits = topk_hits(test_scores, y_test, (1, 5))
        if p.schedule == "vjepa2":  # every head's last-epoch test top-1: the script logs the best
            mine_test = _test_hits(mine, te, y_test, p, device)
            tests = _grid_share.in_grid_order([float(x[1].mean()) for x in mine_test])
            extra["script_choice"] = _script_choice(
                "the last epoch's best head on test (eval.py logs max over its classifiers of "
                "the test top-1 every epoch)",
                settings,
                tests,
                math.ceil(pl.total / pl.per_epoch) - 1,
            )
    lr, wd = settings[best]
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "best_lr": lr,
            "best_weight_decay": wd,
            **grid_edges(
                edge("lrs", p.lrs, [lr]), edge("weight_decays", p.weight_decays, [wd], floor=0.0)
            ),
            "peak_lr": lr * pl.scale,
            "best_val_top1": val[best],
            "grid": [
                {"lr": s[0], "weight_decay": s[1], "val_top1": v}
                for s, v in zip(settings, val, strict=True)
            ],
            "pooler": p.pooler,
            "steps": pl.total,
            "steps_per_epoch": pl.per_epoch,
            "batch_size": pl.batch,
            "head_params": sum(w.numel() for w in head.parameters()),
            **(
                {"tokens_train": src.record(pl.rows_read()), "tokens_val": tr.record()}
                if p.augmented
                else {"tokens_train": tr.record()}
            ),
            "tokens_test": te.record(),
            "train_size": len(inp.train_idx),
            "val_size": len(inp.val_idx),
            **extra,
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )


PROTOCOL_TYPES.register(
    "attentive",
    ProtocolType("attentive", AttentiveParams, run_attentive, inputs="images", tokens=True),
)
