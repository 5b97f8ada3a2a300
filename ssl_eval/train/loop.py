"""The training loop shared by every method: seeded batches and views, a schedule counted in
epochs, a checkpoint every epoch, exact resume, data-parallel under torchrun.

All randomness comes from generators keyed by (seed, epoch, step, rank), so a run killed after
epoch e and resumed draws exactly what an uninterrupted run draws, and ends bitwise equal on
CPU.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..backbones.archs import build_arch
from ..backbones.base import FEATURE_KINDS
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..errors import UserError
from . import dist
from .augment import make_views, step_generator
from .checkpoint import STATE, export_backbone, load_state, save_state
from .config import OptimConfig, TrainConfig
from .data import TrainData, load_train_data
from .methods import METHODS
from .monitor import diagnostics, knn_accuracy


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_at(o: OptimConfig, base: float, epoch_pos: float, epochs: int) -> float:
    """Linear warmup over ``warmup_epochs``, then half-cosine to ``min_lr_ratio * base``."""
    if epoch_pos < o.warmup_epochs:
        return base * epoch_pos / o.warmup_epochs
    span = max(epochs - o.warmup_epochs, 1e-8)
    t = min((epoch_pos - o.warmup_epochs) / span, 1.0)
    return base * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """Weight decay on weight matrices and kernels only, not on biases, norms or tokens."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum)
    raise UserError(f"unknown optimiser {o.name!r}; use 'adamw' or 'sgd'")


@torch.no_grad()
def embed(backbone: nn.Module, images: torch.Tensor, device: torch.device, bs: int = 512,
          kind: str = "model") -> torch.Tensor:
    """Eval-mode embeddings of uint8 images, normalised as in training, read as the evaluator
    will read them (``kind``: the method's feature kind)."""
    read = FEATURE_KINDS.get(kind)
    was = backbone.training
    backbone.eval()
    m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = [read(backbone, ((images[i : i + bs].float() / 255 - m) / s).to(device)).float().cpu()
           for i in range(0, len(images), bs)]
    backbone.train(was)
    return torch.cat(out)


def monitor_epoch(backbone: nn.Module, data: TrainData, cfg: TrainConfig, epoch: int, device, kind: str) -> dict:
    mc = cfg.monitor
    read = FEATURE_KINDS.get(kind)
    bank = embed(backbone, data.bank_images, device, kind=kind)
    sub = data.bank_images[:512]
    g = step_generator(cfg.seed, epoch, 0, stream=7)
    one = dataclasses.replace(cfg.aug, global_views=cfg.aug.global_views[:1], local_views=0)
    v1 = make_views(sub, one, g, IMAGENET_MEAN, IMAGENET_STD)[0]  # two independent draws of view 1,
    v2 = make_views(sub, one, g, IMAGENET_MEAN, IMAGENET_STD)[0]  # so one-view methods (MAE) work too
    was = backbone.training
    backbone.eval()
    with torch.no_grad():
        z1, z2 = read(backbone, v1.to(device)).float().cpu(), read(backbone, v2.to(device)).float().cpu()
    backbone.train(was)
    out = diagnostics(bank, z1, z2, mc.collapse_std_ratio)
    if mc.every > 0 and ((epoch + 1) % mc.every == 0 or epoch + 1 == cfg.epochs):
        q = embed(backbone, data.query_images, device, kind=kind)
        out["knn_top1"] = knn_accuracy(bank, data.bank_labels, q, data.query_labels,
                                       mc.knn_k, mc.knn_temperature, data.num_classes)
    return out


def train(
    cfg: TrainConfig, out: Path, *, resume: bool = False, stop_after_epoch: int | None = None,
    data: TrainData | None = None, log: Callable[[str], None] = _log,
) -> dict:
    """Train ``cfg`` into folder ``out``; returns the sidecar written at the end.
    ``stop_after_epoch`` ends the process early as if killed (for resume tests)."""
    out = Path(out)
    spec = METHODS.get(cfg.method)
    device = resolve_device(cfg.device)
    di = dist.setup(device)
    if cfg.batch_size % di.world:
        raise UserError(f"--batch-size {cfg.batch_size} must divide by the {di.world} processes")
    local_bs = cfg.batch_size // di.world
    if (out / STATE).exists() and not resume:
        raise UserError(f"{out} already holds a training run; add --resume to continue it or pick another --out")
    arch = cfg.arch or spec.default_arch
    if data is None:
        data = load_train_data(cfg.dataset, cfg.image_size, cfg.seed, cfg.train_subset,
                               cfg.monitor.knn_bank, cfg.monitor.knn_queries, cfg.data_root)
    n = len(data.images)
    steps = n // cfg.batch_size
    if steps < 1:
        raise UserError(f"{n} training images are fewer than one batch of {cfg.batch_size}; lower --batch-size")

    torch.manual_seed(cfg.seed)  # initialisation only; training draws from keyed generators
    backbone = build_arch(arch, cfg.arch_kwargs)
    method = spec.cls(backbone, spec.make_config(cfg.method_cfg)).to(device)
    model: nn.Module = method
    if di.world > 1:
        if device.type == "cuda":  # PyTorch's SyncBatchNorm runs on GPUs only
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        elif di.main:
            log("CPU data-parallel: BatchNorm statistics stay per process (SyncBatchNorm needs GPUs)")
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[di.local_rank] if device.type == "cuda" else None)
    opt = build_optimizer(method, cfg.optim)
    base_lr = cfg.optim.base_lr * cfg.batch_size / 256
    start, history = 0, []
    if resume and (out / STATE).exists():
        st = load_state(out)
        if st["config"] != cfg.to_dict():
            raise UserError(f"{out} was trained with another config; resume with the same settings "
                            "(see its backbone.json) or pick another --out")
        method.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start, history = st["epoch"], st["history"]
        log(f"resuming {out} after epoch {start}/{cfg.epochs}")

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(n, generator=step_generator(cfg.seed, epoch, -1))
        total = 0.0
        for step in range(steps):
            glob = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            idx = glob[di.rank * local_bs : (di.rank + 1) * local_bs]
            views = make_views(data.images[idx], cfg.aug, step_generator(cfg.seed, epoch, step, di.rank), mean, std)
            views = [v.to(device, non_blocking=True) for v in views]
            pos = epoch + step / steps
            progress = pos / cfg.epochs
            for gr in opt.param_groups:
                gr["lr"] = lr_at(cfg.optim, base_lr, pos, cfg.epochs)
            method.rng = step_generator(cfg.seed, epoch, step, di.rank, stream=1)
            loss = model(views, progress)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {float(loss)} at epoch {epoch + 1} step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.before_step(progress)
            opt.step()
            method.after_step((epoch + (step + 1) / steps) / cfg.epochs)
            total += float(loss.detach())
        ep_loss = float(dist.all_reduce_mean(torch.tensor(total / steps)))
        wall = time.time() - t0
        if di.main:
            rec = {"epoch": epoch + 1, "loss": ep_loss, "lr": lr_at(cfg.optim, base_lr, epoch + 1, cfg.epochs),
                   "images_per_s": steps * cfg.batch_size / wall, "wall_s": wall}
            rec.update(monitor_epoch(method.backbone, data, cfg, epoch, device, spec.feature_kind))
            history.append(rec)
            flag = "  COLLAPSED" if rec["collapsed"] else ""
            knn = f" knn@{cfg.monitor.knn_k}={rec['knn_top1']:.4f}" if "knn_top1" in rec else ""
            log(f"epoch {epoch + 1}/{cfg.epochs} loss={ep_loss:.4f}{knn} std={rec['std']:.4f}"
                f"(ref {rec['std_ref']:.4f}) rank={rec['rank']:.1f} align={rec['alignment']:.3f} "
                f"unif={rec['uniformity']:.3f} {rec['images_per_s']:.0f} img/s{flag}")
            sidecar = make_sidecar(cfg, arch, spec, data, epoch + 1, history)
            export_backbone(out, method.backbone, sidecar)
            save_state(out, {"model": method.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                             "history": history, "config": cfg.to_dict(), "rng": torch.get_rng_state()})
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if di.world > 1:
        torch.distributed.barrier()
    return make_sidecar(cfg, arch, spec, data, len(history), history)


def make_sidecar(cfg: TrainConfig, arch: str, spec, data: TrainData, epochs_done: int, history: list) -> dict:
    last = history[-1] if history else {}
    return {
        "method": cfg.method,
        "architecture": {"name": arch, "kwargs": cfg.arch_kwargs},
        "preprocessing": Preprocessing(resize=cfg.image_size, crop=cfg.image_size, mean=IMAGENET_MEAN,
                                       std=IMAGENET_STD).to_dict(),
        "feature_kind": spec.feature_kind,
        "train_config": cfg.to_dict(),
        "dataset": {"name": data.name, "fingerprint": data.fingerprint},
        "epochs": cfg.epochs,
        "epochs_done": epochs_done,
        "complete": epochs_done >= cfg.epochs,
        "seed": cfg.seed,
        "code_version": __version__,
        "collapsed": bool(last.get("collapsed", False)),
        "final_diagnostics": last,
        "history": history,
    }
