#!/usr/bin/env python
"""Speed and memory of the linear segmentation probe (issue 21, point 7) on a VOC-size set.

    python benchmarks/bench_dense.py --depth 1 --streamed-steps 2   # VOC 2012 size (~8 min)
    python benchmarks/bench_dense.py                # the same through the whole ViT (~40 min)
    python benchmarks/bench_dense.py --quick        # smoke run: 48 train images
    python benchmarks/bench_dense.py --images 200 --test-images 2 --steps 8

The set is a synthetic Pascal VOC 2012 folder in the official layout (``VOCdevkit/VOC2012``:
``JPEGImages/*.jpg`` of 500x375, palette ``SegmentationClass/*.png`` of 21 classes with 255
borders, ``ImageSets/Segmentation/{train,val}.txt``), read by ssl-eval's own ``voc2012-seg``
loader, and the backbone ``random:vit_small_patch14_dinov2`` at 448 px (a ViT-S/14 with seeded
random weights: a 32x32 grid of 384-wide tokens). The probe is the shipped ``linseg@dinov3``
card with its schedule shortened (``--set`` of ``samples`` and ``warmup_samples``), run through
the protocol's own entry point. Every measurement runs in a fresh process of this script
(``--child``), with no loader workers (all the work, and its memory, in that one process):

1. ``tokens``: the token pass the probe makes before training, as ``train_tokens`` makes it
   (the training rows: every train image, resized to 448 and centre-cropped, batches of 16):
   their float16 bank fits the card's ``token_budget_mb``, so it is written into the token
   cache's memory-mapped entry.
2. ``step``: the probe's training loop (``train_head``, the card's head) reading that on-disk
   entry, timed per step (batch read from the memory map, head, bilinear upsampling of the
   logits to 448x448, the probe's loss ``seg_loss``, backward, AdamW) against the matmul of
   the head on the same batch, ``(16*32*32, 384) @ (384, 21)``, timed just before that step
   (median of 3):
   the ratio per step, and its median, quartiles and range over the measured steps.
3. ``probe``: a whole ``linseg@dinov3`` run (``card.protocol.run``): the token source (the
   entry of 1., now a cache hit), the training targets held in memory, ``--probe-steps``
   training steps, and every test image scored by sliding windows at its full resolution.
4. ``probe_streamed``: the same with ``token_budget_mb=0``: every training batch's tokens
   computed from the images (nothing cached), ``--streamed-steps`` steps.
5. ``scoring``: what scoring at full resolution costs per 500x375 test image, 21 classes:
   the protocol's ``slide_predict`` and the scorer's confusion counts, (a) with a stand-in
   backbone that returns its tokens at once (the cost of the upsampling, overlap averaging,
   argmax and counting alone) and (b) with the ViT-S/14 (the whole per-image cost), against
   the same head output scored at the 32x32 token grid; projected over VOC 2012's 1,449
   validation images.

Memory: the peak resident size a pass adds (``VmHWM`` of /proc/self/status, reset by
``clear_refs`` once the backbone and data are loaded, minus ``VmRSS`` at that moment), and the
peak of its anonymous part (``RssAnon``, polled every 5 ms; the rest are file pages: the
memory map's). Each pass has a stated bound in MiB, the sum of what it must hold, computed
from the shapes (``bounds``); the script exits 1 when a pass adds more than its bound.
Writes ``results/benchmarks/bench_dense{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKBONE = "random:vit_small_patch14_dinov2"
SIZE, PATCH, DIM, HEADS, PREFIX = 448, 14, 384, 6, 1  # ViT-S/14 at 448: 32x32 + class token
IMAGE_W, IMAGE_H = 500, 375  # VOC's typical image
CLASSES = 21
STRIDE = round(SIZE * 2 / 3)  # test windows every 2/3 of the window, as DINOv3's 341 of 512
BATCH = 16  # the token pass's and the scoring's batch (the run's batch size)
VOC_VAL = 1_449  # VOC 2012 segmentation val images: the projection of the scoring cost
STEP_WARM = 2  # training steps before the timed ones
SLACK_MB = 256  # allocator arenas, BLAS/oneDNN workspaces, PIL decoders: stated, not fitted
CHILDREN = ("tokens", "step", "probe", "probe_streamed", "scoring")
FORWARDS = ("forward_whole", "forward_cut")  # the cut model's memory against the whole one's
FORWARD_ROWS = 2 * BATCH
MIB = 2**20


# ---------------------------------------------------------------- the synthetic VOC folder


def make_voc(root: Path, train: int, test: int, seed: int = 0) -> None:
    """A VOCdevkit/VOC2012 folder: ``train`` + ``test`` JPEGs of 500x375 (a gradient with a
    few filled shapes) and their palette masks (the shapes' classes, 255 on their outlines)."""
    from PIL import Image, ImageDraw

    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, 768).astype(np.uint8).tolist()
    yy, xx = np.mgrid[0:IMAGE_H, 0:IMAGE_W]
    ids = {"train": [f"2008_{i:06d}" for i in range(train)]}
    ids["val"] = [f"2009_{i:06d}" for i in range(test)]
    for split, names in ids.items():
        for name in names:
            base = rng.integers(0, 256, 3)
            grad = (xx / IMAGE_W)[..., None] * rng.integers(-80, 80, 3)
            img = Image.fromarray(np.clip(base + grad, 0, 255).astype(np.uint8))
            mask = Image.new("L", (IMAGE_W, IMAGE_H), 0)
            di, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)
            for _ in range(int(rng.integers(1, 4))):
                c = int(rng.integers(1, CLASSES))
                x0, y0 = int(rng.integers(0, IMAGE_W - 60)), int(rng.integers(0, IMAGE_H - 60))
                box = (x0, y0, x0 + int(rng.integers(40, 250)), y0 + int(rng.integers(40, 200)))
                fill = tuple(int(v) for v in rng.integers(0, 256, 3))
                (di.ellipse if c % 2 else di.rectangle)(box, fill=fill)
                (dm.ellipse if c % 2 else dm.rectangle)(box, fill=c, outline=255, width=3)
            img.save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
            mask = mask.convert("P")
            mask.putpalette(palette)
            mask.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


# ---------------------------------------------------------------- the bounds


def bounds(train_rows: int, steps_batch: int = 16) -> dict:
    """What each pass must hold, in MiB, from the shapes (float32 unless said):

    - ``vit_batch``: the ViT's forward on a batch of ``BATCH`` images at 448 (T = 1,025 tokens,
      D = 384): the residual stream, the normalised input, q, k and v, the attention's output
      and the MLP's 4D hidden before and after the GELU (12 T D per image), the attention
      weights of one block (6 heads x T x T per image), the uint8 and float input batch;
    - ``bank``: the training rows' float16 tokens, T x D x 2 bytes each: the pages of the
      memory-mapped entry written or read (file pages, resident until the kernel reclaims them);
    - ``targets``: the training rows' 448x448 uint8 targets, held in memory;
    - ``step``: one training step of 16: the float16 and float32 token batch and 4 copies of its
      width (permuted, BatchNorm, dropout and its mask), the logits at 448x448 x 21 classes
      four times (the upsampled output, the loss's log-softmax, the gradients of both) and the
      int64 targets;
    - ``scoring``: a chunk of windows through the ViT (``vit_batch``), the 21-class output of
      16 windows at 448x448, and per image of the chunk its canvas at 597x448 and output at
      500x375 (test chunks hold up to 16 images);
    - ``SLACK_MB``, once per pass.
    """
    T = (SIZE // PATCH) ** 2 + PREFIX
    images = BATCH * 3 * SIZE * SIZE * (1 + 4 + 4)  # uint8, float, normalised
    vit = BATCH * (12 * T * DIM + HEADS * T * T) * 4 + images
    bank = train_rows * T * DIM * 2
    targets = train_rows * SIZE * SIZE
    tok = steps_batch * (T - PREFIX) * DIM
    logits = steps_batch * CLASSES * SIZE * SIZE * 4
    step = tok * (2 + 4 * 4 + 4) + 4 * logits + steps_batch * SIZE * SIZE * 8
    resized_w = round(IMAGE_W * SIZE / IMAGE_H)
    per_image = CLASSES * (resized_w * SIZE + IMAGE_H * IMAGE_W) * 4 + IMAGE_H * IMAGE_W * 8 * 3
    scoring = vit + BATCH * CLASSES * SIZE * SIZE * 4 + BATCH * per_image
    terms = {
        "vit_batch": vit,
        "bank": bank,
        "targets": targets,
        "step": step,
        "scoring": scoring,
    }
    terms = {k: v / MIB for k, v in terms.items()}
    s, b, t = SLACK_MB, terms["bank"], terms["targets"]
    return {
        "terms_mb": {k: round(v, 1) for k, v in terms.items()} | {"slack": SLACK_MB},
        "tokens": round(terms["vit_batch"] + b + s, 1),  # batch + the written pages
        "step": round(terms["step"] + b + t + s, 1),
        "probe": round(max(terms["step"], terms["scoring"]) + b + t + s, 1),
        # streamed: a training batch's forward and the step, never the bank
        "probe_streamed": round(
            terms["vit_batch"] + max(terms["step"], terms["scoring"]) + t + s, 1
        ),
        "scoring": None,  # a timing: no bound
        "forward_whole": round(terms["vit_batch"] + s, 1),  # two streamed batches
        "forward_cut": round(terms["vit_batch"] + s, 1),
    }


# ---------------------------------------------------------------- one measurement (child)


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """The highest ``RssAnon`` seen while the block runs, polled every 5 ms."""

    def __enter__(self):
        self.peak = status_mb("RssAnon")
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, status_mb("RssAnon"))

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, status_mb("RssAnon"))


def vit(depth: int):
    """The ViT-S/14 at 448 with random weights, cut to its first ``depth`` blocks (12: whole).
    A cut model gives the same token grid (patch embedding, width, class token, final norm)
    and, in inference, holds the same activations (each block's are freed before the next
    runs), for a twelfth of the forward's time; its weights hash and architecture say the cut,
    so no cache entry of one is read as the other's."""
    import dataclasses

    from ssl_eval.backbones.base import BuildOptions, WeightsInfo, state_dict_sha256
    from ssl_eval.backbones.catalog import build_backbone

    bb = build_backbone(BACKBONE, BuildOptions(image_size=SIZE))
    if depth >= len(bb.model.blocks):
        return bb
    bb.model.blocks = bb.model.blocks[:depth]
    arch = bb.load_report.get("architecture", {})
    return dataclasses.replace(
        bb,
        tag=f"{bb.tag}[blocks:{depth}]",
        weights=WeightsInfo("random-init", state_dict_sha256(bb.model)),
        load_report={**bb.load_report, "architecture": {**arch, "blocks_kept": depth}},
    )


def setup(a, depth: int | None = None):
    """The backbone, the bundle and the probe's inputs, as a run gives them to the protocol."""
    import torch

    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.protocols.base import ImageInputs

    work = Path(a.work)
    bb = vit(a.depth if depth is None else depth)
    bundle = get_dataset("voc2012-seg", DatasetOptions(work / "voc", False, work / "manifests"))
    # every train image trains the head (VOC's 1,464): no validation rows are held out, as
    # the card chooses nothing on them
    rows = np.arange(len(bundle.train), dtype=np.int64)
    inp = ImageInputs(
        bb, bundle, rows, rows[:0], torch.device("cpu"), 0, work / "state",
        num_workers=0, cache_dir=work / "cache", batch_size=BATCH,
    )  # fmt: skip
    return inp


def card_sets(a) -> list[str]:
    """The card's ``--set`` of each run, for the record."""
    return [
        f"step: {' '.join(card((STEP_WARM + a.steps + 1) * 16, sets_only=True))}",
        f"probe: {' '.join(card(a.probe_steps * 16, sets_only=True))}",
        f"probe_streamed: {' '.join(card(a.streamed_steps * 16, 0, sets_only=True))}",
    ]


def card(samples: int, budget_mb: int | None = None, sets_only: bool = False):
    from ssl_eval.protocols.cards import load_card

    sets = [f"samples={samples}", f"warmup_samples={max(0, samples // 4 - 1)}"]
    sets += [f"size={SIZE}", f"crop={SIZE}", f"stride={STRIDE}"]  # whatever the card's default
    sets.append("augment=none")  # the token cache's path (version 3 of the card augments)
    if budget_mb is not None:
        sets.append(f"token_budget_mb={budget_mb}")
    if sets_only:
        return sets
    return load_card("linseg@dinov3", sets)


def timed_head(head, log: list):
    """``head`` (tokens, prefix) -> logits, recording per call: the time the call starts, the
    median of 3 matmuls of its head on this batch, and when they end."""
    import torch

    class Timed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, tokens, prefix=None):
            start = time.perf_counter()
            with torch.no_grad():
                conv = [m for m in self.head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
                x, w = tokens.reshape(-1, tokens.shape[-1]), conv.weight.flatten(1).T
                mm = []
                for _ in range(3):
                    t = time.perf_counter()
                    x @ w
                    mm.append(time.perf_counter() - t)
            log.append((start, float(np.median(mm)), time.perf_counter()))
            return self.head(tokens)

    return Timed()


def seg_head(dim: int, dropout: float):
    from ssl_eval.protocols.dense_seg import LinearSegHead

    return LinearSegHead(dim, CLASSES, dropout)


def child(a) -> dict:
    import torch

    torch.manual_seed(0)
    inp = setup(a, 12 if a.child == "forward_whole" else None)
    out: dict = {"what": a.child, "train_rows": len(inp.train_idx), "val_rows": len(inp.val_idx)}
    out["test_images"] = len(inp.bundle.test)
    out["blocks"] = len(inp.backbone.model.blocks)
    base, anon_base = status_mb("VmRSS"), status_mb("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    with AnonPeak() as anon:
        if a.child == "tokens":
            from ssl_eval.protocols.dense.common import train_tokens

            rows = np.sort(np.asarray(inp.train_idx, dtype=np.int64))
            budget = card(16).params.token_budget_mb
            src = train_tokens(inp, SIZE, rows, budget)
            out |= {"record": src.record(), "cache_hit": src.cache_hit}
        elif a.child in FORWARDS:  # two streamed batches through the ViT
            from ssl_eval.protocols.dense.common import train_tokens

            src = train_tokens(inp, SIZE, np.arange(FORWARD_ROWS), 0)
            for _ in src.batches():
                pass
            out |= {"record": src.record(), "blocks": len(inp.backbone.model.blocks)}
        elif a.child in ("probe", "probe_streamed"):
            steps = a.probe_steps if a.child == "probe" else a.streamed_steps
            c = card(steps * 16, 0 if a.child == "probe_streamed" else None)
            res = c.protocol.run(inp, c.params)
            out["steps"] = steps
            out["miou"] = res.metrics["miou"]
            out["tokens"] = res.details.get("tokens")
            out["scored_at"] = res.details.get("scored_at")
        elif a.child == "step":
            out |= child_step(a, inp)
        elif a.child == "scoring":
            out |= child_scoring(a, inp)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["base_mb"] = round(base, 1)
    out["peak_mb"] = round(status_mb("VmHWM"), 1)
    out["added_mb"] = round(out["peak_mb"] - base, 1)
    out["anon_added_mb"] = round(anon.peak - anon_base, 1)
    out["load_1min_end"] = round(os.getloadavg()[0], 2)
    return out


def step_times(log: list, warm: int) -> tuple[list, list, list]:
    """(step seconds, matmul seconds, their ratios) from ``timed_head``'s log: step k runs from
    the end of call k's matmuls to the start of call k + 1 (the loop's batch read, head,
    upsampling, loss, backward and update), the first ``warm`` steps left out."""
    steps = [nxt[0] - cur[2] for cur, nxt in zip(log, log[1:], strict=False)][warm:]
    mms = [cur[1] for cur in log[:-1]][warm:]
    return steps, mms, [s / m for s, m in zip(steps, mms, strict=True)]


def child_step(a, inp) -> dict:
    """The probe's own training loop on the cached entry, its head and loss, each step timed
    (see the module)."""
    from ssl_eval.protocols.dense_seg import seg_loss, train_head

    warm = STEP_WARM
    c = card((warm + a.steps + 1) * 16)
    log: list = []
    head = timed_head(seg_head(DIM, c.params.dropout), log)
    record, _ = train_head(
        inp, c.params, head, lambda o, t, s: seg_loss(o, t), "segmentation",
    )  # fmt: skip
    steps, mms, ratios = step_times(log, warm)
    q = lambda v: [round(float(x), 1) for x in np.percentile(v, [0, 25, 50, 75, 100])]  # noqa: E731
    return {
        "tokens": record.get("tokens"),
        "steps_timed": len(steps),
        "step_ms": [round(1e3 * s, 1) for s in steps],
        "matmul_ms": [round(1e3 * m, 2) for m in mms],
        "ratio": [round(r, 1) for r in ratios],
        "ratio_quantiles": q(ratios),  # min, 25%, median, 75%, max
        "step_ms_median": round(1e3 * float(np.median(steps)), 1),
        "matmul_ms_median": round(1e3 * float(np.median(mms)), 2),
        "ratio_median": round(float(np.median(ratios)), 1),
    }


def child_scoring(a, inp) -> dict:
    """Per test image of 500x375: ``slide_predict`` + the scorer's row, with a stand-in
    backbone (tokens at once) and with the ViT-S/14; the same output at the token grid."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from ssl_eval.backbones.tokens import PatchGrid
    from ssl_eval.data.dense import IGNORE
    from ssl_eval.protocols.dense.common import slide_predict, windows
    from ssl_eval.protocols.dense.metrics import SegmentationScorer

    head = seg_head(DIM, 0.1).eval()
    call = lambda tokens, prefix: head(tokens)  # noqa: E731
    g = (SIZE // PATCH, SIZE // PATCH)
    canned = torch.randn(BATCH, *g, DIM, generator=torch.Generator().manual_seed(0))
    bb = inp.backbone

    class Instant(type(bb)):
        def patch_grid(self, x):
            return PatchGrid(canned[: len(x)], canned[: len(x), :1, 0])

    instant = Instant(**{f.name: getattr(bb, f.name) for f in dataclasses.fields(bb)})
    test, dense = inp.bundle.test, inp.bundle.dense
    rows = list(range(len(test)))
    targets = {r: dense.test.load(r) for r in rows}
    stride = STRIDE

    def score(backbone) -> list[float]:
        """Seconds per image, each image slid and scored alone (a chunk of one image)."""
        out = []
        for r in rows:
            t = time.perf_counter()
            scorer = SegmentationScorer(CLASSES, IGNORE)
            for _, o in slide_predict(
                backbone, test, [r], size=SIZE, crop=SIZE, stride=stride, head=call,
                device=inp.device,
                batch_size=BATCH,
            ):  # fmt: skip
                scorer.add_row(scorer.row(o.argmax(0).numpy(), targets[r]))
            out.append(time.perf_counter() - t)
        return out

    def grid() -> list[float]:
        """The same head output scored at the 32x32 token grid (what downsampled scoring
        would cost): argmax and the confusion counts against a 32x32 target."""
        out = []
        with torch.no_grad():
            logits = head(canned[:1])[0]
        for r in rows:
            small = F.interpolate(
                torch.from_numpy(targets[r])[None, None].float(), size=g, mode="nearest"
            )[0, 0].long().numpy()  # fmt: skip
            t = time.perf_counter()
            scorer = SegmentationScorer(CLASSES, IGNORE)
            scorer.add_row(scorer.row(logits.argmax(0).numpy(), small))
            out.append(time.perf_counter() - t)
        return out

    shapes = sorted({tuple(targets[r].shape) for r in rows})
    score(instant)  # warm-up
    overhead = [x for _ in range(a.reps) for x in score(instant)]
    whole_vit = vit(12) if a.depth < 12 else bb
    whole = score(whole_vit)  # the whole ViT-S/14's windows
    at_grid = [x for _ in range(a.reps) for x in grid()]
    med = lambda v: float(np.median(v))  # noqa: E731
    return {
        "blocks": len(whole_vit.model.blocks),  # the ViT whose windows were timed
        "image_shapes": [list(s) for s in shapes],
        "windows_per_image": [
            len(windows(round(w * SIZE / min(h, w)), SIZE, stride))
            * len(windows(round(h * SIZE / min(h, w)), SIZE, stride))
            for h, w in shapes
        ],
        "overhead_ms": round(1e3 * med(overhead), 1),
        "overhead_ms_range": [round(1e3 * min(overhead), 1), round(1e3 * max(overhead), 1)],
        "whole_ms": round(1e3 * med(whole), 1),
        "whole_ms_range": [round(1e3 * min(whole), 1), round(1e3 * max(whole), 1)],
        "grid_ms": round(1e3 * med(at_grid), 3),
        "overhead_over_grid": round(med(overhead) / med(at_grid), 1),
        "voc_val_images": VOC_VAL,
        "voc_val_overhead_s": round(VOC_VAL * med(overhead), 1),
        "voc_val_whole_s": round(VOC_VAL * med(whole), 1),
    }


# ---------------------------------------------------------------- the parent


def run_child(a, what: str) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--work", str(a.work)]
    cmd += ["--steps", str(a.steps), "--probe-steps", str(a.probe_steps)]
    cmd += ["--streamed-steps", str(a.streamed_steps), "--reps", str(a.reps)]
    cmd += ["--depth", str(a.depth)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"bench_dense: the {what} pass failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out), flush=True)
    return out


LSCPU_KEYS = {"Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket"}


def machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "lscpu": [ln for ln in lscpu if ln.split(":")[0].strip() in LSCPU_KEYS],
        "memory_gib": round(mem, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code_state(),
    }


def code_state() -> dict:
    """The commit the protocol code was read at, and the files that differ from it."""
    git = lambda *c: subprocess.run(  # noqa: E731
        ["git", "-C", str(ROOT), *c], capture_output=True, text=True
    ).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no", "ssl_eval", "protocols")
    return {"commit": git("rev-parse", "HEAD"), "modified": dirty.splitlines()}


def machine_line(info: dict) -> str:
    cpu = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip() for ln in info["lscpu"]}
    load = ", ".join(f"{x:.2f}" for x in info["load_average"])
    end = ", ".join(f"{x:.2f}" for x in info.get("load_average_end", []))
    return (
        f"{info['started']}: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPU(s) "
        f"({cpu.get('Thread(s) per core', '?')} thread(s) per core), {info['memory_gib']} GiB, "
        f"torch {info['torch']} ({info['torch_threads']} threads), numpy {info['numpy']}; load "
        f"average (1/5/15 min) {load} at start, {end} at end; {info.get('total_s', '?')} s; "
        f"code at {info['code']['commit'][:7]}"
        + (
            f" (modified: {', '.join(info['code']['modified'])})"
            if info["code"]["modified"]
            else ""
        )
    )


def markdown(res: dict) -> str:
    s, c, b = res["step"], res["scoring"], res["bounds"]
    n = res["passes"][0]["train_rows"]
    q = s["ratio_quantiles"]
    lines = [
        f"# {res['name']}",
        "",
        f"`{BACKBONE}` at {SIZE} px ({SIZE // PATCH}x{SIZE // PATCH} tokens of {DIM}), "
        f"`linseg@dinov3` (`{' '.join(res['card_set'])}`), a synthetic VOC 2012 folder "
        f"(500x375 JPEGs, palette masks, 21 classes): {res['images']['train']:,} train "
        f"images ({n:,} training rows) and {res['images']['test']} test images; no loader "
        f"workers. Command: `{' '.join(res['machine']['argv'])}`.",
        "",
        "## 1. A training step on the cached tokens against the matmul of its head",
        "",
        f"{s['steps_timed']} steps of `train_head` reading the on-disk token entry "
        f"({s['tokens']}), batch 16, logits upsampled to {SIZE}x{SIZE}; the matmul "
        f"(16*{(SIZE // PATCH) ** 2}, {DIM}) @ ({DIM}, {CLASSES}) on each step's batch.",
        "",
        "| step ms (median) | matmul ms (median) | step / matmul: median | quartiles | range |",
        "|---:|---:|---:|---:|---:|",
        f"| {s['step_ms_median']:,.1f} | {s['matmul_ms_median']:.2f} | {q[2]:.0f}x "
        f"| {q[1]:.0f}x - {q[3]:.0f}x | {q[0]:.0f}x - {q[4]:.0f}x |",
        "",
        "## 2. Peak memory of each pass (its own process), against its stated bound",
        "",
        "| pass | what it did | ViT blocks | s | base MiB | peak MiB | added MiB "
        "| of which anon MiB | whole-model MiB | bound MiB | within |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    did = {
        "tokens": lambda p: (
            f"token pass: {p['record']['tokens']}, "
            f"{p['record']['token_bytes'] / MIB:,.0f} MiB float16 "
            f"(budget {p['record']['token_budget_bytes'] / MIB:,.0f} MiB)"
        ),
        "step": lambda p: f"{p['steps_timed'] + STEP_WARM + 1} training steps on the entry",
        "forward_whole": lambda p: f"{FORWARD_ROWS} images streamed (the whole ViT)",
        "forward_cut": lambda p: f"{FORWARD_ROWS} images streamed (the cut ViT)",
        "probe": lambda p: (
            f"linseg run: tokens {p['tokens']}, {p['steps']} steps, "
            f"{p['test_images']} test images scored"
        ),
        "probe_streamed": lambda p: (
            f"linseg run, token_budget_mb=0: tokens {p['tokens']}, "
            f"{p['steps']} steps, {p['test_images']} test images scored"
        ),
        "scoring": lambda p: "scoring per image (3.; the whole ViT)",
    }
    for p in res["passes"]:
        bound = p.get("bound_mb")
        within = "-" if bound is None else ("yes" if p["within_bound"] else "**NO**")
        whole = f"{p['whole_model_added_mb']:,.0f}" if "whole_model_added_mb" in p else "-"
        lines.append(
            f"| {p['what']} | {did[p['what']](p)} | {p['blocks']} | {p['seconds']} "
            f"| {p['base_mb']:,.0f} "
            f"| {p['peak_mb']:,.0f} | {p['added_mb']:,.0f} | {p['anon_added_mb']:,.0f} | "
            f"{whole} | {'-' if bound is None else f'{bound:,.0f}'} | {within} |"
        )
    t = b["terms_mb"]
    lines += [
        "",
        "Bounds (MiB), the sum of what a pass must hold (`bounds()` in the script): "
        f"ViT batch of 16 at {SIZE} px {t['vit_batch']:,.0f}; bank {t['bank']:,.0f} (the "
        f"training rows' float16 tokens: the memory map's pages); targets {t['targets']:,.0f}; "
        f"training step {t['step']:,.0f}; scoring chunk {t['scoring']:,.0f}; slack "
        f"{t['slack']}. tokens = batch + bank + slack; step = step + bank + targets + slack; "
        "probe = max(step, scoring) + bank + targets + slack; probe_streamed = batch + "
        "max(step, scoring) + targets + slack. Added = peak (VmHWM) - resident size once "
        "the backbone and data are loaded; anon: the peak of the anonymous part (RssAnon, "
        "polled), the rest being the memory map's file pages.",
        "",
        *cut_note(res),
        f"## 3. Full-resolution scoring, per {IMAGE_W}x{IMAGE_H} test image, {CLASSES} classes",
        "",
        "| what | ms per image (median) | range | over VOC's 1,449 val images |",
        "|---|---:|---:|---:|",
        f"| upsampling, overlap averaging, argmax, confusion counts "
        f"({c['windows_per_image'][0]} windows of {SIZE}; backbone stand-in) "
        f"| {c['overhead_ms']:,.1f} | {c['overhead_ms_range'][0]:,.1f} - "
        f"{c['overhead_ms_range'][1]:,.1f} | {c['voc_val_overhead_s']:,.0f} s |",
        f"| the same with the ViT-S/14's forward on the windows | {c['whole_ms']:,.1f} | "
        f"{c['whole_ms_range'][0]:,.1f} - {c['whole_ms_range'][1]:,.1f} "
        f"| {c['voc_val_whole_s']:,.0f} s |",
        f"| reference: argmax and counts at the {SIZE // PATCH}x{SIZE // PATCH} token grid "
        f"| {c['grid_ms']:.3f} | | |",
        "",
        f"Full-resolution scoring's own work is {c['overhead_over_grid']:,.0f}x the grid's.",
        "",
        "Machine:",
        "",
        f"- {machine_line(res['machine'])}",
        "",
    ]
    return "\n".join(lines)


def judge(passes: list[dict], b: dict) -> None:
    """Each pass's bound and verdict. A pass that ran the cut ViT is judged on what the whole
    model would add: its own figure plus what the whole model's streamed pass added over the
    cut one's (``forward_whole`` - ``forward_cut``, when positive)."""
    f = {p["what"]: p for p in passes if p["what"] in FORWARDS}
    delta = 0.0
    if f:
        delta = max(0.0, f["forward_whole"]["added_mb"] - f["forward_cut"]["added_mb"])
    for p in passes:
        judged = p["added_mb"]
        p["bound_mb"] = b[p["what"]]
        if p["bound_mb"] is None:
            p["within_bound"] = None
            continue
        if p["blocks"] < 12 and p["what"] != "forward_cut":
            judged = p["whole_model_added_mb"] = round(judged + delta, 1)
        p["within_bound"] = bool(judged <= p["bound_mb"])


def cut_note(res: dict) -> list[str]:
    """What the cut ViT stands for, from its pass against the whole model's (or nothing)."""
    f = {p["what"]: p for p in res["passes"] if p["what"] in FORWARDS}
    if not f:
        return []
    w, c = f["forward_whole"], f["forward_cut"]
    return [
        f"The passes over the set ran the ViT-S/14 cut to its first {c['blocks']} block(s) "
        f"(`--depth {c['blocks']}`: the same token grid, and in inference the same "
        "activations, each block's freed before the next runs; a twelfth of the forward's "
        f"time). Over the same {FORWARD_ROWS} images, streamed, the whole model's pass added "
        f"{w['added_mb']:,.0f} MiB (anon {w['anon_added_mb']:,.0f}) in {w['seconds']} s, the "
        f"cut one's {c['added_mb']:,.0f} MiB (anon {c['anon_added_mb']:,.0f}) in "
        f"{c['seconds']} s: the passes that ran the cut model are judged on their figure plus "
        f"the difference, {max(0, w['added_mb'] - c['added_mb']):,.0f} MiB (the column "
        "'whole-model MiB'). Scoring (3.) runs the whole model.",
        "",
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="48 train and 2 test images, 4/2/1 steps, 1 rep"
    )
    ap.add_argument("--images", type=int, help="train images (default 1,464, VOC 2012's)")
    ap.add_argument("--test-images", type=int, help="test images (default 4; quick 2)")
    ap.add_argument("--steps", type=int, default=10, help="training steps timed (1.)")
    ap.add_argument("--probe-steps", type=int, default=10, help="steps of the cached probe")
    ap.add_argument("--streamed-steps", type=int, default=3, help="steps of the streamed probe")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of the scoring timings")
    ap.add_argument("--work", type=Path, help="folder for the set and cache (default: temp)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks")
    ap.add_argument(
        "--depth", type=int, default=12,
        help="ViT blocks kept for the passes over the set (1: a twelfth of the forward's time, "
        "the same memory; the whole model's and the cut one's forwards are compared)",
    )  # fmt: skip
    ap.add_argument("--child", choices=CHILDREN + FORWARDS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0

    from ssl_eval.core.files import atomic_write_json, atomic_write_text

    n = a.images or (48 if a.quick else 1464)
    k = a.test_images or (2 if a.quick else 4)
    if a.quick:  # a smoke run: fewer steps and repetitions too
        a.steps, a.probe_steps, a.streamed_steps, a.reps = 4, 2, 1, 1
    if n < 2 * BATCH or k < 1 or min(a.steps, a.probe_steps, a.streamed_steps, a.reps) < 1:
        raise SystemExit(f"bench_dense: --images >= {2 * BATCH}, the others >= 1")
    info = machine()
    info["argv"] = [
        "python",
        "benchmarks/bench_dense.py",
        *(sys.argv[1:] if argv is None else argv),
    ]
    print(json.dumps(info), flush=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_dense-") as tmp:
        a.work = (a.work or Path(tmp)).resolve()
        if (a.work / "voc").exists():
            shutil.rmtree(a.work / "voc")
        shutil.rmtree(a.work / "cache", ignore_errors=True)  # every run writes its entry
        t = time.perf_counter()
        make_voc(a.work / "voc", n, k)
        print(f"wrote {n} + {k} images in {time.perf_counter() - t:.0f} s", flush=True)
        whats = (FORWARDS if a.depth < 12 else ()) + CHILDREN
        passes = [run_child(a, w) for w in whats]
        entries = len(list((a.work / "cache" / "tokens").glob("*/meta.json")))
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    info["total_s"] = round(time.perf_counter() - t_start)
    b = bounds(passes[0]["train_rows"])
    judge(passes, b)
    name = "bench_dense" + ("_quick" if a.quick else "")
    res = {
        "name": name,
        "backbone": BACKBONE,
        "size": SIZE,
        "images": {"train": n, "test": k, "shape": [IMAGE_H, IMAGE_W]},
        "card_set": card_sets(a),
        "token_cache_entries": entries,  # 1: the probe's pass read the entry the token pass wrote
        "machine": info,
        "bounds": b,
        "step": next(p for p in passes if p["what"] == "step"),
        "scoring": next(p for p in passes if p["what"] == "scoring"),
        "passes": passes,
    }
    md = markdown(res)
    print(md)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / f"{name}.json", res)
    atomic_write_text(a.out / f"{name}.md", md)
    over = [p["what"] for p in passes if p["within_bound"] is False]
    if over:
        print(f"bench_dense: over the bound: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
