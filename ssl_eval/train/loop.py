"""The training loop shared by every method: seeded batches and views, a schedule counted in
epochs, a checkpoint every epoch, exact resume, data-parallel under torchrun.

All randomness comes from generators keyed by (seed, epoch, step, rank), so a run killed after
epoch e and resumed draws exactly what an uninterrupted run draws, and ends bitwise equal on
CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..backbones.archs import build_arch
from ..core.errors import UserError
from ..core.files import ensure_writable_dir, sweep_leftovers
from ..core.runtime import log as runtime_log
from ..core.runtime import resolve_device
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from . import dist
from .augment import make_views, step_generator
from .checkpoint import STATE, export_backbone, load_state, make_sidecar, restore, save_state
from .config import TrainConfig
from .data import TrainData, load_train_data
from .determinism import pinned
from .methods import METHODS
from .monitor import monitor_epoch
from .optim import build_optimizer, lr_at


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    data: TrainData | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train ``cfg`` into folder ``out``; returns the sidecar written at the end.
    ``stop_after_epoch`` ends the process early as if killed (for resume tests); ``log``
    receives the progress lines (default: ``[train] ...`` on stderr). With
    ``cfg.deterministic`` the whole training (data included) runs under the pinned CPU kernels
    (``determinism.pinned``), and the sidecar records the pins as read back."""
    if not cfg.deterministic:
        return _train(cfg, out, resume, stop_after_epoch, data, log, None)
    with pinned(resolve_device(cfg.device).type) as pins:
        return _train(cfg, out, resume, stop_after_epoch, data, log, pins)


def _train(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    stop_after_epoch: int | None,
    data: TrainData | None,
    log: Callable[[str], None] | None,
    pins: dict | None,
) -> dict:
    log = log or partial(runtime_log, scope="train")
    out = ensure_writable_dir(Path(out), "training output folder")  # before any work
    spec = METHODS.get(cfg.method)
    device = resolve_device(cfg.device)
    di = dist.setup(device)
    if cfg.batch_size % di.world:
        raise UserError(f"--batch-size {cfg.batch_size} must divide by the {di.world} processes")
    local_bs = cfg.batch_size // di.world
    if di.main:  # a killed run's half-written checkpoint or state (its pid is gone)
        for p in sweep_leftovers(out):
            log(f"removed {p.name}, left by a killed process")
    if (out / STATE).exists() and not resume:
        raise UserError(
            f"{out} already holds a training run; add --resume to continue it or pick another --out"
        )
    arch = cfg.arch or spec.default_arch
    if data is None:
        data = load_train_data(
            cfg.dataset,
            cfg.image_size,
            cfg.seed,
            cfg.train_subset,
            cfg.monitor.knn_bank,
            cfg.monitor.knn_queries,
            cfg.data_root,
            cfg.val_fraction,
            cfg.split_seed,
        )
    split = {k: data.eval_split.get(k) for k in ("val_fraction", "split_seed")}
    if split != {"val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}:
        raise UserError(
            f"the training data avoids the validation split {split}, the config says "
            f"val_fraction={cfg.val_fraction} split_seed={cfg.split_seed}; load the data "
            "with the config's split"
        )
    if di.main and not len(data.query_images):
        log(f"monitor: {data.monitor.get('queries')}")
    n = len(data.images)
    steps = n // cfg.batch_size
    if steps < 1:
        raise UserError(
            f"{n} training images are fewer than one batch of {cfg.batch_size}; lower --batch-size"
        )

    torch.manual_seed(cfg.seed)  # initialisation only; training draws from keyed generators
    backbone = build_arch(arch, cfg.arch_kwargs)
    extra = {"num_classes": data.num_classes} if spec.uses_labels else {}
    method = spec.cls(backbone, spec.make_config(cfg.method_cfg), **extra).to(device)
    model: nn.Module = method
    if di.world > 1:
        if device.type == "cuda":  # PyTorch's SyncBatchNorm runs on GPUs only
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        elif di.main:
            log(
                "CPU data-parallel: BatchNorm statistics stay per process (SyncBatchNorm needs GPUs)"
            )
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[di.local_rank] if device.type == "cuda" else None
        )
    opt = build_optimizer(method, cfg.optim)
    base_lr = cfg.optim.base_lr * cfg.batch_size / 256
    start, history = 0, []
    # a damaged state is reported and removed by load_state/restore: training starts over
    st = load_state(out) if resume and (out / STATE).exists() else None
    if st is not None:
        if st["config"] != cfg.to_dict():
            raise UserError(
                f"{out} was trained with another config; resume with the same settings "
                "(see its backbone.json) or pick another --out"
            )
        if restore(method, opt, st, out / STATE):
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
            views = make_views(
                data.images[idx], cfg.aug, step_generator(cfg.seed, epoch, step, di.rank), mean, std
            )
            views = [v.to(device, non_blocking=True) for v in views]
            pos = epoch + step / steps
            progress = pos / cfg.epochs
            for gr in opt.param_groups:
                gr["lr"] = lr_at(cfg.optim, base_lr, pos, cfg.epochs)
            method.rng = step_generator(cfg.seed, epoch, step, di.rank, stream=1)
            if spec.uses_labels:  # the supervised reference only
                loss = model(views, progress, data.labels[idx].to(device))
            else:
                loss = model(views, progress)
            if not torch.isfinite(loss):
                raise UserError(
                    f"loss became {float(loss)} at epoch {epoch + 1} step {step}; lower --lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            method.before_step(progress)
            opt.step()
            method.after_step((epoch + (step + 1) / steps) / cfg.epochs)
            total += float(loss.detach())
        ep_loss = float(dist.all_reduce_mean(torch.tensor(total / steps)))
        wall = time.time() - t0
        if di.main:
            rec = {
                "epoch": epoch + 1,
                "loss": ep_loss,
                "lr": lr_at(cfg.optim, base_lr, epoch + 1, cfg.epochs),
                "images_per_s": steps * cfg.batch_size / wall,
                "wall_s": wall,
            }
            rec.update(monitor_epoch(method.backbone, data, cfg, epoch, device, spec.feature_kind))
            history.append(rec)
            flag = "  COLLAPSED" if rec["collapsed"] else ""
            knn = f" knn@{cfg.monitor.knn_k}={rec['knn_top1']:.4f}" if "knn_top1" in rec else ""
            log(
                f"epoch {epoch + 1}/{cfg.epochs} loss={ep_loss:.4f}{knn} std={rec['std']:.4f}"
                f"(ref {rec['std_ref']:.4f}) rank={rec['rank']:.1f} align={rec['alignment']:.3f} "
                f"unif={rec['uniformity']:.3f} {rec['images_per_s']:.0f} img/s{flag}"
            )
            sidecar = make_sidecar(cfg, arch, spec, data, epoch + 1, history, pins)
            export_backbone(out, method.backbone, sidecar)
            save_state(
                out,
                {
                    "model": method.state_dict(),
                    "optimizer": opt.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "config": cfg.to_dict(),
                    "rng": torch.get_rng_state(),
                },
            )
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    if di.world > 1:
        torch.distributed.barrier()
    return make_sidecar(cfg, arch, spec, data, len(history), history, pins)
