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

The cases (``--cases``, default all): the real CIFAR ResNet-56 at 32 px (1,000 images, 8 heads
on its pooled feature); a random ViT-Tiny/16 at 224 px (250 images upscaled from 32 px, the
same 8-head grid on its own feature); and that ViT under linear_aug@dinov2's grid (52 heads
over the last 1 or 4 blocks' class tokens x avgpool, one ``layers:4`` forward a batch), whose
extraction pass extracts the same ``layers:4`` rows. ``--backbone`` runs one case of your own.

Usage:
  mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C /tmp/cifar10
  python benchmarks/bench_augmented.py --data /tmp/cifar10
  # on a GPU (bf16 autocast; crops drawn by 8 DataLoader workers unless --num-workers says):
  python benchmarks/bench_augmented.py --data /tmp/cifar10 --device cuda --channels-last \
      --backbone random:vit_small_patch16_224 --per-class 500 --out $OUT/augmented
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
from ssl_eval.protocols.cards import load_card

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


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    backbone: str
    per_class: int  # training images per class (a tenth of them validation)
    epochs: int  # augmented epochs timed per rep
    grid: str = "plain"  # plain: 8 heads on the backbone's feature | dinov2: linear_aug@dinov2


CASES = {
    c.name: c
    for c in (
        Case("resnet56-32px", "cifar_resnet56", 100, 3),
        Case("vit-tiny-224px", "random:vit_tiny_patch16_224", 25, 2),
        Case("vit-tiny-224px-dinov2-grid", "random:vit_tiny_patch16_224", 25, 2, "dinov2"),
    )
}


def _params(case: Case, batch: int):
    if case.grid == "dinov2":  # the card's grid, over epochs instead of 12,500 iterations
        card = load_card("linear_aug@dinov2").params
        return dataclasses.replace(
            card, iterations=0, epochs=case.epochs, batch_size=batch, forward_batch=batch
        )
    return augmented.AugmentedParams(
        base_lrs=(0.01, 0.1, 1.0, 10.0),  # a grid of 8 heads, as the linear card's
        weight_decays=(0.0, 1e-4),
        epochs=case.epochs,
        warmup_epochs=1.0,
        batch_size=batch,
        forward_batch=batch,
    )


def run_case(case: Case, a, data) -> dict:
    """One case: ``a.reps`` alternations of an extraction pass and an augmented run."""
    dev, accel = torch.device(a.device), Accel(channels_last=a.channels_last)
    kw = {"device": dev, "batch_size": a.batch_size, "accel": accel, "progress": False}
    w = a.weights_dir / WEIGHTS[case.backbone] if case.backbone in WEIGHTS else None
    bb = build_backbone(case.backbone, BuildOptions(weights=w, offline=True))
    p = _params(case, a.batch_size)
    # the extraction pass reads what the heads read: layers:4 rows for the multi-layer grid
    reader = bb if not p.n_last_blocks else dataclasses.replace(bb, feature_kind="layers:4")
    bundle = _subset(data, case.per_class, 10)
    n = len(bundle.train)
    val = np.arange(n)[::10]  # every tenth image: validation; the rest train
    train = np.setdiff1d(np.arange(n), val)
    work = Path(tempfile.mkdtemp(prefix="bench_augmented_"))
    hook = augmented._after_epoch
    try:
        native, how = native_bundle(bundle, cache_dir=work / "dc", num_workers=0, progress=False)
        extract(reader, bundle, "train", cache_dir=work / "dc", decode_cache=True, **kw)  # warm-up
        ext, epoch = {"wall": [], "cpu": []}, {"wall": [], "cpu": []}
        for r in range(a.reps):
            shutil.rmtree(work / "dc" / "features", ignore_errors=True)
            t0, c0 = time.perf_counter(), _cpu()
            extract(reader, bundle, "train", cache_dir=work / "dc", decode_cache=True, **kw)
            _sync(dev)
            ext["wall"].append((time.perf_counter() - t0) / n)
            ext["cpu"].append((_cpu() - c0) / n)
            marks: list[tuple[float, float]] = []
            augmented._after_epoch = lambda e, heads, m=marks: m.append(
                (time.perf_counter(), _cpu())
            )
            inp = ImageInputs(bb, native, train, val, dev, r, None, a.num_workers, accel)
            c0 = _cpu()
            out = augmented.run_augmented(inp, p)
            for e, h in enumerate(out.details["history"]):
                epoch["wall"].append(h["seconds"] / len(train))
                if e > 0:  # the first epoch's CPU span would hold the val / test embedding
                    epoch["cpu"].append((marks[e][1] - marks[e - 1][1]) / len(train))
    finally:
        augmented._after_epoch = hook
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in ext.items()}
    emed = {k: statistics.median(v) for k, v in epoch.items()}
    return {
        "case": case.name,
        "backbone": case.backbone,
        "input_px": bb.preprocessing.crop,
        "grid": case.grid,
        "feature_kind": reader.feature_kind,
        "images": {"extraction": n, "augmented_train": len(train), "val": len(val)},
        "heads": len(out.details["settings"]),
        "image_source": how,
        "extraction_ms_per_img": {k: round(1e3 * v, 4) for k, v in med.items()},
        "augmented_epoch_ms_per_img": {k: round(1e3 * v, 4) for k, v in emed.items()},
        "ratio": {k: round(emed[k] / med[k], 3) for k in med},
        "epochs_per_rep": case.epochs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="unpacked CIFAR-10 JPEG folder")
    ap.add_argument("--weights-dir", type=Path, default=ROOT.parent / "shared" / "weights")
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--backbone", help="one case of your own instead of --cases")
    ap.add_argument("--per-class", type=int, default=200, help="with --backbone: train images")
    ap.add_argument("--epochs", type=int, default=3, help="with --backbone: epochs per rep")
    ap.add_argument("--batch-size", type=int, default=256, help="extraction and forward batch")
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
    cases = [CASES[c] for c in a.cases]
    if a.backbone:
        cases = [Case(a.backbone, a.backbone, a.per_class, a.epochs)]
    data = get_dataset(f"folder:{a.data}", DatasetOptions())
    dev = torch.device(a.device)
    rows = []
    for case in cases:
        rows.append(run_case(case, a, data))
        print(json.dumps(rows[-1], indent=1), flush=True)
    res = {
        "cases": rows,
        "batch_size": a.batch_size,
        "reps": a.reps,
        "threads": a.threads,
        "device": str(dev),
        "channels_last": a.channels_last,
        "machine": {
            "cpu": cpu_model(),
            "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "packages": package_versions(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out.with_suffix(".json"), res)
    atomic_write_text(a.out.with_suffix(".md"), _markdown(res, a))


def _markdown(res: dict, a) -> str:
    ms = lambda r, k: (  # noqa: E731
        f"{r['extraction_ms_per_img'][k]} | {r['augmented_epoch_ms_per_img'][k]} | "
        f"**{r['ratio'][k]}**"
    )
    rows = "".join(
        f"| {r['case']}: {r['backbone']}, {r['input_px']} px | {r['images']['extraction']} | "
        f"{r['heads']} on {r['feature_kind']} | {ms(r, 'wall')} | {ms(r, 'cpu')} |\n"
        for r in res["cases"]
    )
    epochs = ", ".join(f"{r['case']} {r['epochs_per_rep']}" for r in res["cases"])
    m = res["machine"]
    return (
        "# One augmented epoch against one extraction pass (CIFAR-10 JPEGs; target <= 1.2x)\n\n"
        "ms per image. wall: extraction | augmented epoch | ratio, then the same in CPU time "
        "(user + system).\n\n"
        "| case | images | heads | wall extraction | wall epoch | wall ratio | CPU extraction "
        "| CPU epoch | CPU ratio |\n|---|---|---|---|---|---|---|---|---|\n"
        + rows
        + f"\nMachine: {m['cpu']}, {a.threads} torch thread(s), load average "
        f"{m['load_average_at_start'][0]} at the start; median of {a.reps} reps (epochs per "
        f"rep: {epochs}). Written by benchmarks/bench_augmented.py.\n"
    )


if __name__ == "__main__":
    main()
