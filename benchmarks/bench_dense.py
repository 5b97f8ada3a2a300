#!/usr/bin/env python
"""Speed and memory of the dense probes (docs/dense.md), each as a ratio against a reference
measured in the same run.

    python benchmarks/bench_dense.py            # VOC size: 1,464 images at 448 px, ViT-S/14
    python benchmarks/bench_dense.py --quick    # smoke run: 48 images

1. Step: one training step of the linear segmentation head (linseg@dinov3's: BatchNorm,
   dropout, 1x1 convolution, bilinear upsampling of the logits to the 448x448 label,
   cross-entropy, AdamW) on a batch of 16 cached ViT-S/14 token grids (32x32x384), against the
   matmul of its head alone (the (16*32*32, 384) @ (384, 21) product): the ratio says how much
   of a step the head's arithmetic is (the rest: the upsampling and loss at label size).
2. Memory: the peak resident memory added by a pass of the token source over the set (random
   ViT-S/14 at 448 px, synthetic images, batches of 16), each pass in its own process, with
   the bank over the budget (streamed) and within it (cached: written to a memory-mapped
   entry), against the float16 bank's own size. Bound stated and checked: the streamed pass
   over n images adds at most 1.25x what the pass over n/4 (at least one batch) adds (it holds
   one batch, not the set: its memory does not grow with the set).
3. Full-resolution scoring: per test image of VOC's typical 500x375, upsampling the 21-class
   output to the original size, argmax and the confusion counts, against the same at the
   token grid's resolution (32x32, what downsampled scoring would cost): the ratio is the
   price of scoring what the masks say.

Timings are the best of ``--reps``; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssl_eval.backbones.base import Backbone  # noqa: E402
from ssl_eval.data.datasets import DatasetBundle, ImageSplit  # noqa: E402
from ssl_eval.data.transforms import Preprocessing  # noqa: E402
from ssl_eval.features.tokens import token_source  # noqa: E402
from ssl_eval.protocols.dense.metrics import SegmentationScorer  # noqa: E402
from ssl_eval.protocols.dense_seg import LinearSegHead  # noqa: E402


def best(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def rss_mb() -> float:
    """The current resident size (MiB), from /proc (the peak since process start would hide a
    pass below the model's own construction peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """The highest resident size seen while the block runs, polled every 2 ms."""

    def __enter__(self):
        import threading

        self.start = self.peak = rss_mb()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, rss_mb())

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def added(self) -> float:
        return self.peak - self.start


def bench_step(reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    b, h, d, c, size = 16, 32, 384, 21, 448
    tokens = torch.randn(b, h, h, d, generator=g)
    target = torch.randint(0, c, (b, size, size), generator=g)
    head = LinearSegHead(d, c, 0.1)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)

    def step():
        out = F.interpolate(head(tokens), size=(size, size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(out, target, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()

    x, w = tokens.reshape(-1, d), torch.randn(d, c, generator=g)
    step()
    t_step, t_mm = best(step, reps), best(lambda: x @ w, reps * 5)
    return {"step_ms": 1e3 * t_step, "head_matmul_ms": 1e3 * t_mm, "ratio": t_step / t_mm}


def _pass(n: int, batch: int, budget_frac: float, cache: str) -> tuple[float, float]:
    """In a fresh process: the peak resident memory a token-source pass adds, and its time."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=448)
    bb = Backbone("random-vits14", model, Preprocessing(crop=448))
    images = np.random.default_rng(0).integers(0, 256, (n, 448, 448, 3), dtype=np.uint8)
    split = ImageSplit(np.zeros(n, np.int64), images)
    bundle = DatasetBundle("voc-size", ["x"], split, split, {"bench": n})
    budget = int(budget_frac * n * (32 * 32 + 1) * 384 * 2)
    t = time.perf_counter()
    with PeakRss() as peak:
        src = token_source(bb, bundle, "train", budget_bytes=budget, device=torch.device("cpu"),
                           batch_size=batch, cache_dir=Path(cache), num_workers=0)  # fmt: skip
        for _ in src.batches():
            pass
    return peak.added, time.perf_counter() - t


def bench_memory(n: int, batch: int) -> dict:
    """Each pass in its own process (the peak resident size only grows within one)."""
    import multiprocessing as mp

    bank = n * (32 * 32 + 1) * 384 * 2 / 2**20
    out = {"images": n, "bank_mb": bank}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as cache:
        for mode, m, frac in (("streamed", n, 0.0), ("streamed_quarter", max(batch, n // 4), 0.0),
                              ("cached", n, 1.0)):  # fmt: skip
            with ctx.Pool(1) as pool:
                added, secs = pool.apply(_pass, (m, batch, frac, cache))
            out[mode] = {"images": m, "added_peak_mb": added, "seconds": secs}
            # each pass as it ends: at VOC size on a 2-core CPU a pass takes half an hour
            print(f"   ({mode} pass done: {m} images, +{added:.0f} MiB, {secs:.0f} s)", flush=True)
    # bounded memory: the streamed pass over n images adds at most 1.25x what the pass over
    # n/4 (at least one batch) adds: its memory does not grow with the set (at VOC size the
    # 1,464-image bank alone, 1.1 GiB, is far past that)
    out["bound_mb"] = 1.25 * out["streamed_quarter"]["added_peak_mb"]
    out["streamed_within_bound"] = out["streamed"]["added_peak_mb"] <= out["bound_mb"]
    return out


def bench_scoring(reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(21, 32, 32, generator=g)
    target = np.random.default_rng(0).integers(0, 21, (375, 500))
    small = target[:: 375 // 32 + 1, :: 500 // 32 + 1][:32, :32]

    def score(shape, tg):
        s = SegmentationScorer(21)
        up = F.interpolate(logits[None], size=shape, mode="bilinear", align_corners=False)
        s.add(up[0].argmax(0).numpy(), tg)

    full = best(lambda: score((375, 500), target), reps)
    grid = best(lambda: score((32, 32), small), reps)
    return {"full_ms": 1e3 * full, "grid_ms": 1e3 * grid, "ratio": full / grid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    n = a.images or (48 if a.quick else 1464)
    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    s = bench_step(a.reps)
    print(f"1. linseg step (16 x 32x32x384 -> 21 classes at 448x448): {s['step_ms']:.1f} ms; "
          f"head matmul {s['head_matmul_ms']:.2f} ms; step / matmul = {s['ratio']:.0f}x")  # fmt: skip
    c = bench_scoring(a.reps)
    print(f"3. scoring one 500x375 image: full resolution {c['full_ms']:.2f} ms, at the 32x32 "
          f"grid {c['grid_ms']:.2f} ms: {c['ratio']:.1f}x")  # fmt: skip
    m = bench_memory(n, a.batch)
    print(f"2. token pass at 448 px, the {n}-image bank {m['bank_mb']:.0f} MiB float16:")
    for mode in ("streamed", "streamed_quarter", "cached"):
        r = m[mode]
        print(f"   {mode}: {r['images']} images, peak RSS added {r['added_peak_mb']:.0f} MiB "
              f"in {r['seconds']:.1f} s")  # fmt: skip
    verdict = "within" if m["streamed_within_bound"] else "OVER"
    print(f"   bound (streamed(n) <= 1.25 x streamed(n/4) = {m['bound_mb']:.0f} MiB): {verdict}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
