"""``ssl-eval train``: train a backbone with the bundled trainer."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NAME = "train"
HELP = "train a backbone with a self-supervised method (or supervised, the reference)"
ORDER = 30


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--method",
        required=True,
        help="simclr, mocov3, byol, simsiam, barlowtwins, swav, mae, dino, or supervised (the reference)",
    )
    t.add_argument(
        "--arch", help="architecture (default per method: cifar_resnet18 or vit_tiny_p4 at 32x32)"
    )
    t.add_argument("--dataset", help="training dataset (default shapes)")
    t.add_argument("--data-root", type=Path, help="root folder of torchvision datasets")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size, split across processes")
    t.add_argument("--lr", type=float, help="base learning rate (scaled by batch/256)")
    t.add_argument("--seed", type=int)
    t.add_argument("--image-size", type=int, default=32)
    t.add_argument("--train-subset", type=int, help="train on a seeded subset of N images")
    t.add_argument("--device", help="auto, cpu, cuda (default auto)")
    t.add_argument(
        "--deterministic",
        action="store_true",
        help="pin the CPU kernels (AVX2, MKL's compatible branch, one thread, oneDNN off) so "
        "the weights are the same on any x86-64 CPU with AVX2; about 4x slower steps; "
        "recorded in the sidecar and the records",
    )
    t.add_argument(
        "--config", type=Path, help="YAML training config (method defaults fill the rest)"
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. method_cfg.temperature=0.5 or aug.local_views=4",
    )
    t.add_argument(
        "--out", type=Path, required=True, help="output folder (checkpoint + sidecar + state)"
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )


def run(a: argparse.Namespace) -> int:
    from ..train.loop import train
    from ..train.resolve import dump_yaml, resolve_config

    settings = {
        "arch": a.arch,
        "dataset": a.dataset,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "seed": a.seed,
        "train_subset": a.train_subset,
        "device": a.device,
        "data_root": str(a.data_root) if a.data_root else None,
    }
    if a.deterministic:
        settings["deterministic"] = True
    if a.lr is not None:
        settings["optim"] = {"base_lr": a.lr}
    cfg = resolve_config(a.method, a.image_size, a.config, settings, a.set or [])
    if a.print_config:
        print(dump_yaml(cfg))
        return 0
    side = train(cfg, a.out, resume=a.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the first process reports
        return 0
    d = side.get("final_diagnostics", {})
    flag = "  (COLLAPSED)" if side.get("collapsed") else ""
    print(
        f"{a.out}: {cfg.method} {side['architecture']['name']} {side['epochs_done']} epochs, "
        f"loss={d.get('loss', float('nan')):.4f} knn_top1={d.get('knn_top1', float('nan')):.4f}{flag}"
    )
    return 0
