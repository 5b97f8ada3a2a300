"""What one epoch of augmented (online) linear probing costs against one feature-extraction
pass over the same images, measured in the same run (target: at most 1.2x per image).

Both read the decode cache, as a run with --decode-cache does: the extraction pass
(``features.extract(decode_cache=True)``, from an empty feature cache each time) reads images
already resized and centre-cropped to the backbone's input; the augmented epoch
(``protocols.augmented``, its ``history[e].seconds``) reads the decoded full-size images
(``native_bundle``), draws a random resized crop and a flip of each, embeds them and takes one
optimiser step of every head of the grid per batch, then scores every head on validation. The
epochs' time excludes the one-off embedding of the validation and test images. Wall and CPU
seconds are both given: on a shared machine the CPU seconds are the steadier figure.

Usage:
  mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C /tmp/cifar10
  python benchmarks/bench_augmented.py --data /tmp/cifar10 --per-class 100
  # on a GPU (bf16 autocast; crops drawn by 8 DataLoader workers unless --num-workers says):
  python benchmarks/bench_augmented.py --data /tmp/cifar10 --device cuda --channels-last \
      --backbone random:vit_small_patch16_224 --per-class 500 --out $OUT/augmented
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.core.files import atomic_write_json, atomic_write_text
from ssl_eval.core.provenance import cpu_model, package_versions
from ssl_eval.data.datasets import DatasetOptions, ImageSplit, get_dataset
from ssl_eval.features.accel import Accel
from ssl_eval.features.decode_cache import native_bundle
from ssl_eval.features.extraction import extract
from ssl_eval.protocols import augmented
from ssl_eval.protocols.base import ImageInputs

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet56": "resnet56-4bfd9763.th"}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _subset(bundle, per_class: int, test_per_class: int):
    """The first ``per_class`` train and ``test_per_class`` test images of every class."""

    def cut(src: ImageSplit, k: int) -> ImageSplit:
        keep = np.concatenate([np.flatnonzero(src.labels == c)[:k] for c in np.unique(src.labels)])
        return ImageSplit(src.labels[keep], paths=[src.paths[i] for i in keep])

    fp = {**bundle.fingerprint, "subset": f"first {per_class} / {test_per_class} per class"}
    return dataclasses.replace(
        bundle,
        train=cut(bundle.train, per_class),
        test=cut(bundle.test, test_per_class),
        fingerprint=fp,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="unpacked CIFAR-10 JPEG folder")
    ap.add_argument("--weights-dir", type=Path, default=ROOT.parent / "shared" / "weights")
    ap.add_argument("--backbone", default="cifar_resnet56")
    ap.add_argument("--per-class", type=int, default=200, help="train images per class")
    ap.add_argument("--batch-size", type=int, default=256, help="extraction and forward batch")
    ap.add_argument("--epochs", type=int, default=3, help="augmented epochs timed per rep")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    ap.add_argument("--channels-last", action="store_true", help="as the CLI's --channels-last")
    ap.add_argument(
        "--num-workers", type=int, default=None, help="crop workers (default: 0 on CPU, 8 on GPU)"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "augmented")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev, accel = torch.device(a.device), Accel(channels_last=a.channels_last)
    kw = {"device": dev, "batch_size": a.batch_size, "accel": accel, "progress": False}
    w = a.weights_dir / WEIGHTS[a.backbone] if a.backbone in WEIGHTS else None
    bb = build_backbone(a.backbone, BuildOptions(weights=w, offline=True))
    bundle = _subset(get_dataset(f"folder:{a.data}", DatasetOptions()), a.per_class, 10)
    n = len(bundle.train)
    val = np.arange(n)[::10]  # every tenth image: validation; the rest train
    train = np.setdiff1d(np.arange(n), val)
    p = augmented.AugmentedParams(
        base_lrs=(0.01, 0.1, 1.0, 10.0),  # a grid of 8 heads, as the linear card's
        weight_decays=(0.0, 1e-4),
        epochs=a.epochs,
        warmup_epochs=1.0,
        batch_size=a.batch_size,
        forward_batch=a.batch_size,
    )
    work = Path(tempfile.mkdtemp(prefix="bench_augmented_"))
    try:
        native, how = native_bundle(bundle, cache_dir=work / "dc", num_workers=0, progress=False)
        extract(
            bb,
            bundle,
            "train",
            cache_dir=work / "dc",
            decode_cache=True,
            **kw,
        )  # a warm-up
        ext, epoch = {"wall": [], "cpu": []}, {"wall": [], "cpu": []}
        for r in range(a.reps):
            shutil.rmtree(work / "dc" / "features", ignore_errors=True)
            t0, c0 = time.perf_counter(), _cpu()
            extract(
                bb,
                bundle,
                "train",
                cache_dir=work / "dc",
                decode_cache=True,
                **kw,
            )
            _sync(dev)
            ext["wall"].append((time.perf_counter() - t0) / n)
            ext["cpu"].append((_cpu() - c0) / n)
            marks: list[tuple[float, float]] = []
            augmented._after_epoch = lambda e, heads, m=marks: m.append(
                (time.perf_counter(), _cpu())
            )
            inp = ImageInputs(bb, native, train, val, dev, r, None, a.num_workers, accel)
            t0, c0 = time.perf_counter(), _cpu()
            out = augmented.run_augmented(inp, p)
            hist = out.details["history"]
            for e, h in enumerate(hist):
                epoch["wall"].append(h["seconds"] / len(train))
                prev = c0 if e == 0 else marks[e - 1][1]
                if e > 0:  # the first epoch's CPU span would hold the val / test embedding
                    epoch["cpu"].append((marks[e][1] - prev) / len(train))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in ext.items()}
    emed = {k: statistics.median(v) for k, v in epoch.items()}
    res = {
        "backbone": a.backbone,
        "images": {"extraction": n, "augmented_train": len(train), "val": len(val)},
        "heads": len(p.settings()),
        "batch_size": a.batch_size,
        "image_source": how,
        "extraction_ms_per_img": {k: round(1e3 * v, 4) for k, v in med.items()},
        "augmented_epoch_ms_per_img": {k: round(1e3 * v, 4) for k, v in emed.items()},
        "ratio": {k: round(emed[k] / med[k], 3) for k in med},
        "reps": a.reps,
        "epochs_per_rep": a.epochs,
        "threads": a.threads,
        "device": str(dev),
        "channels_last": a.channels_last,
        "machine": {
            "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
            "python": platform.python_version(),
        },
        "packages": package_versions(),
    }
    print(json.dumps(res, indent=1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out.with_suffix(".json"), res)
    atomic_write_text(
        a.out.with_suffix(".md"),
        f"# One augmented epoch against one extraction pass ({a.backbone}, {n} CIFAR-10 JPEGs)\n\n"
        f"| | extraction | augmented epoch ({res['heads']} heads) | ratio |\n|---|---|---|---|\n"
        + "".join(
            f"| {k} ms / image | {res['extraction_ms_per_img'][k]} | "
            f"{res['augmented_epoch_ms_per_img'][k]} | {res['ratio'][k]} |\n"
            for k in ("wall", "cpu")
        )
        + f"\nMachine: {res['machine']['cpu']}, {a.threads} torch thread(s); "
        f"median of {a.reps} reps x {a.epochs} epochs. Written by benchmarks/bench_augmented.py.\n",
    )


if __name__ == "__main__":
    main()
