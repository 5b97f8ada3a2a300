#!/usr/bin/env python
"""The default suite's per-pixel column, chosen on the VALIDATION split: does DINOv3's linear
segmentation head (``linseg@dinov3``) tell the suite's models apart on shapes-seg at the suite's
16 px, at any learning rate or budget? (Test images are never read here.)

    python benchmarks/suite_dense.py --ckpt mae=RUN/checkpoints/mae-s0-... \\
        --ckpt simclr=RUN/checkpoints/simclr-s0-... [--lrs 1e-3,1e-2,1e-1] [--samples 18000]

For each backbone (the checkpoints a suite trained, and ``random:cifar_resnet_tiny``), each
learning rate and each sample budget, the head is trained as ``linseg@dinov3`` trains it (on
the cached patch tokens of the training rows minus the validation rows, one centre crop per
image, AdamW, warm-up and cosine) and scored on the validation rows' crops at the crop's
resolution: mIoU and the per-class IoU (background first). A head that predicts the background
everywhere scores the background's IoU over 7 classes (about 12%), whatever the backbone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_eval.backbones.base import BuildOptions  # noqa: E402
from ssl_eval.backbones.catalog import build_backbone  # noqa: E402
from ssl_eval.core.config import RunConfig  # noqa: E402
from ssl_eval.data.datasets import DatasetOptions, get_dataset  # noqa: E402
from ssl_eval.data.dense import IGNORE  # noqa: E402
from ssl_eval.data.splits import stratified_val_split  # noqa: E402
from ssl_eval.features.tokens import token_source  # noqa: E402
from ssl_eval.protocols.base import ImageInputs  # noqa: E402
from ssl_eval.protocols.dense.common import TargetBank, crop_backbone  # noqa: E402
from ssl_eval.protocols.dense.metrics import SegmentationScorer  # noqa: E402
from ssl_eval.protocols.dense_seg import (  # noqa: E402
    LinearSegHead,
    LinsegParams,
    _token_dim,
    _WithPrefix,
    train_head,
)


def val_scores(head, src, rows, targets, classes: int) -> dict:
    scorer = SegmentationScorer(classes, IGNORE)
    for take, tokens, _ in src.batches(rows):
        with torch.no_grad():
            out = head(tokens, None)
        t = targets.get(take)
        up = F.interpolate(out, size=t.shape[-2:], mode="bilinear", align_corners=False)
        for pred, truth in zip(up.argmax(1).numpy(), t.numpy(), strict=True):
            scorer.add(pred, truth)
    return scorer.results(resamples=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", action="append", default=[], help="LABEL=PATH of a trained model")
    ap.add_argument("--lrs", default="1e-3,1e-2,1e-1")
    ap.add_argument("--samples", default="18000", help="training samples, comma-separated")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("runs/suite-dense"))
    args = ap.parse_args()
    cache = args.work / "cache"
    bundle = get_dataset("shapes-seg", DatasetOptions(None, False, cache / "manifests"))
    train_idx, val_idx = stratified_val_split(
        bundle.train.labels, RunConfig.val_fraction, RunConfig.split_seed
    )
    classes = len(bundle.dense.classes)
    size = args.image_size
    names = [c.split("=", 1) for c in args.ckpt] + [["random", "random:cifar_resnet_tiny"]]
    print(f"linseg on shapes-seg at {size} px, validation rows {len(val_idx)} (crop resolution)")
    print("| backbone | samples | lr | last loss | val mIoU (%) | per-class IoU (bg first) | s |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for label, name in names:
        tag = f"ckpt:{name}" if not name.startswith(("random:", "ckpt:")) else name
        bb = build_backbone(tag, BuildOptions(image_size=size))
        inp = ImageInputs(
            bb, bundle, train_idx, val_idx, torch.device("cpu"), 0, args.work / "state",
            cache_dir=cache, batch_size=256,
        )  # fmt: skip
        rows = np.sort(np.asarray(val_idx))
        src = token_source(
            crop_backbone(bb, size), bundle, "train", rows, budget_bytes=2**30,
            device=inp.device, batch_size=256, cache_dir=cache,
        )  # fmt: skip
        targets = TargetBank(bundle.dense.train, rows, size, False, 2**30)
        for samples in (int(s) for s in args.samples.split(",")):
            for lr in (float(x) for x in args.lrs.split(",")):
                p = LinsegParams(samples=samples, warmup_samples=samples // 20, lr=lr)
                head = _WithPrefix(LinearSegHead(_token_dim(inp), classes, p.dropout))
                t0 = time.perf_counter()
                _, losses = train_head(
                    inp, p, head,
                    lambda out, t, step: F.cross_entropy(out, t, ignore_index=IGNORE),
                    "segmentation",
                )  # fmt: skip
                r = val_scores(head, src, rows, targets, classes)
                iou = ", ".join(f"{v:.2f}" for v in r["per_class_iou"])
                print(
                    f"| {label} | {samples} | {lr:g} | {np.mean(losses[-50:]):.3f} | "
                    f"{100 * r['miou']:.2f} | {iou} | {time.perf_counter() - t0:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
