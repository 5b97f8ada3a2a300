#!/usr/bin/env python
"""What one augmented training step of the linear segmentation probe costs against one step
on cached tokens (issue 21, points 2/3: ``augment: dinov3``).

    python benchmarks/bench_dense_aug.py              # ViT-S/14 at 224, batches of 16 (~1 min)
    python benchmarks/bench_dense_aug.py --size 448   # the 448 grid of bench_dense.py

Both steps train ``linseg@dinov3``'s head (LinearSegHead, 21 classes) with its loss and
optimiser on batches of 16: the cached step reads a batch of float32 tokens already in
memory (what a cache hit hands the loop) and runs the head, the bilinear upsampling of the
logits to the crop, ``seg_loss``, backward and AdamW; the augmented step first draws the
batch's views (``OnlineViews.views``: DINOv3's random resize 0.5-2.0, crop with
cat_max_ratio, flip, photometric distortion, padding) from 16 in-memory 500x375 images with
VOC-like labels (21 classes, 255 borders; no JPEG decoding, which a real set adds), then
embeds them with the frozen backbone (``random:vit_small_patch14_dinov2``, seeded random
weights, no gradient; float32 on a CPU, bf16 autocast on a GPU), then the same head step.
Medians over ``--steps`` timed steps after one warm-up, one thread (``--threads``). Writes
``results/benchmarks/bench_dense_aug.{json,md}``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKBONE = "random:vit_small_patch14_dinov2"


def scenes(n: int, seed: int = 0):
    """``n`` 375x500 images of coloured rectangles on noise, their 21-class labels with 255
    borders one pixel wide."""
    g = np.random.default_rng(seed)
    imgs = g.integers(0, 256, (n, 375, 500, 3)).astype(np.uint8)
    labs = np.zeros((n, 375, 500), np.int64)
    for i in range(n):
        for _ in range(6):
            y, x = g.integers(0, 300), g.integers(0, 420)
            h, w, c = g.integers(30, 75), g.integers(30, 80), g.integers(1, 21)
            labs[i, y : y + h, x : x + w] = c
            labs[i, y, x : x + w] = labs[i, y + h - 1, x : x + w] = 255
            imgs[i, y : y + h, x : x + w] = (c * 12) % 256
    return imgs, labs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks")
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from ssl_eval.backbones.base import BuildOptions
    from ssl_eval.backbones.catalog import build_backbone
    from ssl_eval.core.files import atomic_write_json, atomic_write_text
    from ssl_eval.data.datasets import DatasetBundle, ImageSplit
    from ssl_eval.data.dense import DenseSplit, DenseTargets
    from ssl_eval.protocols.base import ImageInputs
    from ssl_eval.protocols.dense.augment import OnlineViews
    from ssl_eval.protocols.dense_seg import LinearSegHead, seg_loss

    torch.set_num_threads(a.threads)
    cpu = torch.device("cpu")
    bs = 16
    imgs, labs = scenes(bs)
    classes = tuple(f"c{i}" for i in range(21))
    dense = DenseTargets("segmentation", DenseSplit(labs), DenseSplit(labs[:1]), classes=classes)
    bundle = DatasetBundle(
        "bench", ["x"], ImageSplit(np.zeros(bs, np.int64), imgs),
        ImageSplit(np.zeros(1, np.int64), imgs[:1]), {"bench": 1}, dense=dense,
    )  # fmt: skip
    bb = build_backbone(BACKBONE, BuildOptions(image_size=a.size))
    inp = ImageInputs(bb, bundle, np.arange(bs), np.arange(0), cpu, 0, Path("."), 0)
    views = OnlineViews(inp, dense, "segmentation", "dinov3", a.size)
    rows = np.arange(bs)

    with torch.no_grad():  # the cached batch: centre crops' tokens, as a cache hit gives them
        x0, t0 = views.views(rows)
        cached = bb.patch_grid(x0).tokens.float().half().float()
    head = LinearSegHead(cached.shape[-1], 21, 0.1).train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)

    def head_step(tokens, target):
        out = F.interpolate(head(tokens), size=target.shape[-2:], mode="bilinear")
        loss = seg_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn):
        t = time.perf_counter()
        r = fn()
        return r, time.perf_counter() - t

    cached_s, view_s, fwd_s, aug_head_s = [], [], [], []
    for k in range(a.steps + 1):  # the first of each: warm-up, not counted
        _, dt = timed(lambda: head_step(cached, t0))
        (x, t), dv = timed(lambda: views.views(rows))

        def forward(x=x):
            with torch.no_grad():
                return bb.patch_grid(x).tokens.float().half().float()

        tokens, df = timed(forward)
        _, dh = timed(lambda tokens=tokens, t=t: head_step(tokens, t))
        if k:
            cached_s.append(dt)
            view_s.append(dv)
            fwd_s.append(df)
            aug_head_s.append(dh)

    def med(v):
        return round(float(np.median(v)), 4)

    res = {
        "backbone": BACKBONE,
        "size": a.size,
        "grid": list(cached.shape[1:3]),
        "batch": bs,
        "threads": a.threads,
        "steps_timed": a.steps,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "cached_step_s": med(cached_s),
        "views_s": med(view_s),
        "forward_s": med(fwd_s),
        "augmented_head_s": med(aug_head_s),
    }
    res["augmented_step_s"] = round(res["views_s"] + res["forward_s"] + res["augmented_head_s"], 4)
    res["ratio"] = round(res["augmented_step_s"] / res["cached_step_s"], 1)
    cmd = f"python benchmarks/bench_dense_aug.py --size {a.size} --steps {a.steps}"
    md = "\n".join([
        "# Augmented against cached-token steps (linseg, `augment: dinov3`)",
        "",
        f"`{cmd}` ({res['machine']}, {a.threads} thread(s), CPU). {BACKBONE} at {a.size} px "
        f"({res['grid'][0]}x{res['grid'][1]} tokens), batches of {bs}, 21 classes; medians "
        f"of {a.steps} steps after a warm-up.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| cached tokens: head, upsampling, loss, backward, AdamW | {res['cached_step_s']} |",
        f"| augmented: the 16 views drawn (500x375 images in memory) | {res['views_s']} |",
        f"| augmented: the frozen backbone's forward | {res['forward_s']} |",
        f"| augmented: the same head step | {res['augmented_head_s']} |",
        f"| augmented step, in all | {res['augmented_step_s']} ({res['ratio']}x the cached step) |",
        "",
    ])  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / "bench_dense_aug.json", res)
    atomic_write_text(a.out / "bench_dense_aug.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
