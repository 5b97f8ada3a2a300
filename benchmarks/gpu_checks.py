"""GPU checks and benchmarks of issue 13 point 5, as ONE script, so a lent GPU's minutes go to
GPU work only (planned at under 8 minutes on one H200). Each check prints one JSON line and a
failing check is recorded and the rest still run; everything lands in one JSON file.

  env         the device, and the reference rate: a bf16 (8192^3) matrix product's TFLOP/s
  decode      decode-cache build of synthetic JPEGs at ViT-B/16's eval resolution (images/s)
  extract     ViT-B/16 at 224 from the decode cache under bf16 autocast: images/s and TFLOP/s
              against the measured matmul rate and the spec peak, for plain / channels-last +
              pinned memory / torch.compile + pinned memory, and the pure forward on a batch
              already on the GPU (the model-bound limit)
  knn         k-NN 50,000 queries x 1.28M x 768 bank, k=200: every GPU search of knn_gpu.py
              (torch float32, torch float16, faiss GPU float16 where installed), the automatic
              choice, and the float16 searches' agreement with float32 on 1,000 queries
  finetune    one fine-tune step (ViT-B/16, bf16 autocast, AdamW): images/s and TFLOP/s
  headline    frozen protocols (k-NN, linear, few-shot) of a ViT-S/14 on a 10% ImageNet-1k-size
              synthetic set (128,116 train + 5,000 test, 1,000 classes) read from the decode
              cache, end to end through evaluate.run; extrapolated to the full size, phase by
              phase, with the rule stated in the output
  probes      the newer protocols' device paths at small fixed sizes (PROBES): linear_aug@dinov2,
              attentive@capi, attentive@vjepa2, logreg@dinov2 (GPU torch path vs CPU numpy
              path), linseg@dinov3, lindepth@dinov3, knnseg@capi: seconds, peak GPU memory,
              the metric, a CPU reference where cheap; a failing sub-probe is recorded and the
              others still run

Usage (on the GPU machine; from the repository root):
  PYTHONPATH=. python benchmarks/gpu_checks.py --out $OUT/gpu_checks.json
  python benchmarks/gpu_checks.py --smoke            # tiny sizes on the CPU (tests run this)
  PYTHONPATH=. python benchmarks/gpu_checks.py --only probes --out $OUT/probes.json
Targets (issue 13): k-NN < 1 s; extraction >= 50% of bf16 peak; headline < 5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_eval.core.registry import Registry  # noqa: E402
from ssl_eval.features.accel import Accel  # noqa: E402

SPEC_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0}  # dense, SXM data sheets


@dataclass(frozen=True)
class Sizes:
    matmul: int
    decode_images: int
    decode_hw: tuple[int, int]
    vit_b: str
    vit_b_size: int
    extract_images: int
    extract_batch: int
    knn_bank: int
    knn_queries: int
    knn_dim: int
    knn_k: int
    ft_batch: int
    vit_s: str
    vit_s_size: int
    head_train: int
    head_test: int
    head_classes: int
    head_scale: int  # the full size is this many times the run's
    probe_backbone: str  # check probes: the backbone and its input size, and the first
    probe_size: int  # probe_train train and probe_test test images of each dataset
    probe_train: int
    probe_test: int


FULL = Sizes(
    8192, 2048, (375, 500), "random:vit_base_patch16_224", 224, 16384, 512,
    1_281_167, 50_000, 768, 200, 128,
    "random:vit_small_patch14_dinov2", 224, 128_116, 5_000, 1000, 10,
    "random:vit_tiny_p4", 64, 600, 200,
)  # fmt: skip
SMOKE = Sizes(
    64, 12, (40, 48), "random:vit_micro_p4", 32, 24, 8,
    2_000, 100, 64, 20, 4,
    "random:vit_micro_p4", 32, 120, 40, 4, 10,
    "random:vit_micro_p4", 32, 240, 60,
)  # fmt: skip

CHECKS: Registry = Registry("GPU check")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(dev, fn, reps: int = 1):
    """(result of the last call, best seconds of ``reps``), the device synchronised."""
    best, out = float("inf"), None
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return out, best


def check_env(ctx) -> dict:
    dev, n = ctx["device"], ctx["sizes"].matmul
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    _timed(dev, lambda: a @ b, reps=3)
    _, s = _timed(dev, lambda: [a @ b for _ in range(10)], reps=1)
    tflops = 2 * n**3 * 10 / s / 1e12
    ctx["peak_measured"] = tflops
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in str(name)), None)
    ctx["peak_spec"] = spec
    return {
        "device": str(name),
        "torch": torch.__version__,
        "matmul": f"{n}^3 {str(dt).removeprefix('torch.')}",
        "matmul_tflops": round(tflops, 2),
        "spec_bf16_tflops": spec,
        "cpu_cores": os.cpu_count(),
    }


def check_decode(ctx) -> dict:
    from PIL import Image

    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.features.decode_cache import decoded

    z, work = ctx["sizes"], ctx["work"]
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (*z.decode_hw, 3), dtype=np.uint8)
    for split, n in (("train", z.decode_images), ("val", 2)):
        for i in range(n):
            d = work / "jpegs" / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.roll(base, i * 7, axis=1)).save(d / f"{i}.jpg", quality=90)
    ds = get_dataset(f"folder:{work / 'jpegs'}", DatasetOptions())
    bb = build_backbone(z.vit_b, BuildOptions(image_size=z.vit_b_size))
    workers = min(16, os.cpu_count() or 1) if ctx["device"].type == "cuda" else 0
    got, s = _timed(
        ctx["device"],
        lambda: decoded(ds, "train", bb.preprocessing, cache_dir=work / "c", num_workers=workers, progress=False),
    )  # fmt: skip
    return {
        "images": len(got),
        "jpeg_hw": list(z.decode_hw),
        "to": list(got.images.shape[1:]),
        "workers": workers,
        "seconds": round(s, 3),
        "images_per_s": round(len(got) / s, 1),
    }


def _flops_per_image(bb, size: int, dev) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, device=dev)
    with FlopCounterMode(display=False) as fc, torch.autocast(dev.type, enabled=False):
        bb.embed(x)
    return float(fc.get_total_flops())


def _synthetic_bundle(n_train: int, n_test: int, size: int, classes: int, name: str):
    from ssl_eval.data.datasets import DatasetBundle, ImageSplit

    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)

    def images(n):  # cheap to make at ImageNet size: a random block, tiled
        out = np.empty((n, size, size, 3), np.uint8)
        for s in range(0, n, 64):
            out[s : s + 64] = block[: min(64, n - s)]
        return out

    def labels(n):
        return np.arange(n, dtype=np.int64) % classes

    return DatasetBundle(
        name,
        [str(c) for c in range(classes)],
        ImageSplit(labels(n_train), images(n_train)),
        ImageSplit(labels(n_test), images(n_test)),
        {"synthetic": [n_train, n_test, size, classes]},
    )


def check_extract(ctx) -> dict:
    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.features.decode_cache import decoded
    from ssl_eval.features.extraction import extract

    z, dev, work = ctx["sizes"], ctx["device"], ctx["work"]
    bb = build_backbone(z.vit_b, BuildOptions(image_size=z.vit_b_size))
    bb.model.to(dev)
    flops = _flops_per_image(bb, z.vit_b_size, dev)
    ds = _synthetic_bundle(z.extract_images, 8, z.vit_b_size, 10, "synthetic-extract")
    workers = min(16, os.cpu_count() or 1) if dev.type == "cuda" else 0
    decoded(
        ds, "train", bb.preprocessing, cache_dir=work / "x", num_workers=workers, progress=False
    )
    peak = ctx.get("peak_measured")
    out = {"model": z.vit_b, "gflop_per_image": round(flops / 1e9, 2), "images": z.extract_images}

    def rate(seconds: float) -> dict:
        r = z.extract_images / seconds
        d = {"images_per_s": round(r, 1), "tflops": round(r * flops / 1e12, 2)}
        if peak:
            d["of_measured_matmul"] = round(r * flops / 1e12 / peak, 3)
        if ctx.get("peak_spec"):
            d["of_spec_peak"] = round(r * flops / 1e12 / ctx["peak_spec"], 3)
        return d

    variants = {
        "plain": Accel(),
        "channels_last+pinned": Accel(channels_last=True, pin_memory=True),
        "compile+pinned": Accel(compile=True, pin_memory=True),
    }
    if ctx["smoke"]:
        variants.pop("compile+pinned")  # about a minute to compile on a CPU
    for i, (name, accel) in enumerate(variants.items()):
        kw = dict(device=dev, batch_size=z.extract_batch, progress=False, decode_cache=True)
        warm = work / f"xw{i}"
        extract(bb, ds, "test", cache_dir=warm, accel=accel, **kw)  # compile / kernels, once
        fs, s = _timed(
            dev,
            lambda a=accel, kw=kw: extract(bb, ds, "train", cache_dir=work / "x", accel=a, **kw),
        )
        out[name] = rate(s)
        with contextlib.suppress(OSError):
            import shutil

            shutil.rmtree(fs.path)  # the next variant extracts again
    x = torch.randn(z.extract_batch, 3, z.vit_b_size, z.vit_b_size, device=dev)
    amp = dev.type == "cuda"
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        _timed(dev, lambda: bb.embed(x), reps=2)
        steps = max(1, z.extract_images // z.extract_batch)
        _, s = _timed(dev, lambda: [bb.embed(x) for _ in range(steps)])
    out["forward_only_resident_batch"] = rate(s * z.extract_images / (steps * z.extract_batch))
    out["target"] = "extraction >= 0.5 of the GPU's bf16 peak"
    return out


def check_knn(ctx) -> dict:
    import torch.nn.functional as F

    from ssl_eval.protocols.search.gpu import GPU_SEARCHES, gpu_knn_search

    z, dev = ctx["sizes"], ctx["device"]
    g = torch.Generator(device=dev).manual_seed(0)
    bank = F.normalize(torch.randn(z.knn_bank, z.knn_dim, device=dev, generator=g), dim=1)
    q = F.normalize(torch.randn(z.knn_queries, z.knn_dim, device=dev, generator=g), dim=1)
    mem = 4096 if dev.type == "cuda" else 256
    out = {"bank": list(bank.shape), "queries": z.knn_queries, "k": z.knn_k, "memory_mb": mem}
    ref = None
    for name in GPU_SEARCHES.names():
        try:
            (s_, i_, choice), secs = _timed(
                dev, lambda n=name: gpu_knn_search(bank, q, z.knn_k, mem, [n])
            )
        except RuntimeError as e:
            out[name] = f"not measured: {e}"
            continue
        row = {"seconds_incl_probe": round(secs, 3), "precision": choice.precision}
        if ref is None and name == "torch":
            ref = i_[:1000].cpu()
        elif ref is not None:
            got = i_[:1000].cpu()
            same = [
                len(set(a[:20].tolist()) & set(b[:20].tolist())) / 20
                for a, b in zip(ref, got, strict=True)
            ]
            row["top20_overlap_with_float32"] = round(float(np.mean(same)), 4)
        out[name] = row
    # the card's automatic backends: the fastest float32 search (auto), float16 (auto_fp16)
    for key, family in (("auto", "float32"), ("auto_fp16", "float16")):
        names = [n for n in GPU_SEARCHES.names() if GPU_SEARCHES.get(n).family == family]
        try:
            (_, _, choice), secs = _timed(
                dev, lambda names=names: gpu_knn_search(bank, q, z.knn_k, mem, names)
            )
        except RuntimeError as e:
            out[key] = f"not measured: {e}"
            continue
        out[key] = {"seconds": round(secs, 3), **choice.record()}
    out["target"] = "k-NN 50,000 x 1.28M x 768 under 1 s"
    return out


def check_finetune(ctx) -> dict:
    from ssl_eval.backbones import BuildOptions, build_backbone

    z, dev = ctx["sizes"], ctx["device"]
    bb = build_backbone(z.vit_b, BuildOptions(image_size=z.vit_b_size))
    model = bb.model.to(dev).train()
    flops = 3 * _flops_per_image(bb, z.vit_b_size, dev)  # forward + backward ~ 3x forward
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(z.ft_batch, 3, z.vit_b_size, z.vit_b_size, device=dev)
    amp = dev.type == "cuda"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
            loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _timed(dev, step, reps=2)
    _, s = _timed(dev, lambda: [step() for _ in range(5)])
    r = 5 * z.ft_batch / s
    d = {
        "batch": z.ft_batch,
        "images_per_s": round(r, 1),
        "tflops_3x_forward": round(r * flops / 1e12, 2),
    }
    if ctx.get("peak_measured"):
        d["of_measured_matmul"] = round(r * flops / 1e12 / ctx["peak_measured"], 3)
    return d


def check_headline(ctx) -> dict:
    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.core.config import RunConfig
    from ssl_eval.data.datasets import DATASETS, DatasetSpec
    from ssl_eval.features.decode_cache import decoded
    from ssl_eval.orchestrate.evaluate import run
    from ssl_eval.protocols.cards import load_cards
    from ssl_eval.records.store import read_unit_file

    z, dev, work = ctx["sizes"], ctx["device"], ctx["work"]
    name = "synthetic-in1k-10pct"
    bundle = _synthetic_bundle(z.head_train, z.head_test, z.vit_s_size, z.head_classes, name)
    if name not in DATASETS:
        DATASETS.register(name, DatasetSpec(name, lambda _: bundle, "gpu_checks headline"))
    workers = min(16, os.cpu_count() or 1) if dev.type == "cuda" else 0
    bb = build_backbone(z.vit_s, BuildOptions(image_size=z.vit_s_size))
    cache = work / "head"
    t0 = time.perf_counter()
    for split in ("train", "test"):  # the decode cache, built before the timed run
        decoded(
            bundle, split, bb.preprocessing, cache_dir=cache, num_workers=workers, progress=False
        )
    build_s = time.perf_counter() - t0
    small = ["fewshot.shots=[5]", "fewshot.seeds=1", "fewshot.classifiers=[prototype]"]
    small += ["fewshot.headline=prototype@5", "knn.ks=[10, 20]", "linear.min_steps=0"]
    overrides = small if ctx["smoke"] else []
    cfg = RunConfig(
        backbones=(z.vit_s,),
        datasets=(name,),
        protocols=load_cards(["knn", "linear", "fewshot"], overrides),
        results_dir=work / "head-results",
        cache_dir=cache,
        device=dev.type,
        batch_size=z.extract_batch,
        image_size=z.vit_s_size,
        progress=False,
        num_workers=workers,
        decode_cache=True,
        pin_memory=dev.type == "cuda",
    )
    t0 = time.perf_counter()
    outcomes = run(cfg)
    wall = time.perf_counter() - t0
    phases: dict = {}
    for o in outcomes:
        rec = read_unit_file(o.path)[0]
        phases[o.protocol] = rec.wall_time_s
        for split, s in (rec.details.get("feature_seconds") or {}).items():
            phases[f"extract_{split}"] = s
    rules = {"knn": z.head_scale**2}  # every other phase: x head_scale
    full = {k: round(v * rules.get(k, z.head_scale), 1) for k, v in phases.items()}
    other = wall - sum(phases.values())
    return {
        "model": z.vit_s,
        "train": z.head_train,
        "test": z.head_test,
        "classes": z.head_classes,
        "decode_cache_build_s_untimed": round(build_s, 1),
        "end_to_end_s": round(wall, 1),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "extrapolation_rule": f"full size = this run x {z.head_scale} for every phase (extraction "
        "and linear: images and samples per epoch grow x10; few-shot: an upper bound, as its shots "
        "per class do not grow, only its test scoring; loading and bookkeeping) except k-NN, x "
        f"{z.head_scale**2} (bank and queries both grow x{z.head_scale})",
        "full_size_estimate_s": round(sum(full.values()) + other * z.head_scale, 1),
        "full_size_phases_s": full,
        "target": "frozen protocols of a ViT-S/14 on ImageNet-1k size under 300 s",
    }


@dataclass(frozen=True)
class Probe:
    """One sub-probe of check ``probes``: a shipped card run at a small budget (``full`` on
    the GPU, ``smoke`` with --smoke; both through ``dataclasses.replace`` of the card's
    params) on a built-in dataset. ``reference``: "cpu", the same run on the CPU in float32
    beside the GPU's bf16 autocast (the top-1 difference is reported, not asserted); "numpy",
    logistic regression's CPU path (numpy) on the same features as its GPU path (torch); "":
    none."""

    card: str
    dataset: str
    metric: str
    full: dict
    smoke: dict
    reference: str = ""


_DENSE = dict(size=0, crop=0, stride=0, batch_size=16)
PROBES: dict[str, Probe] = {
    "linear_aug": Probe(
        "linear_aug@dinov2", "digits", "top1",
        dict(iterations=20, batch_size=128, forward_batch=256),
        dict(iterations=3, batch_size=32, forward_batch=64, n_last_blocks=[1, 2]), "cpu",
    ),
    "attentive_capi": Probe(
        "attentive@capi", "digits", "top1",
        dict(iterations=20, warmup=2, batch_size=128),
        dict(iterations=3, warmup=1, batch_size=32, lrs=[1e-3], weight_decays=[5e-4]), "cpu",
    ),
    "attentive_vjepa2": Probe(
        "attentive@vjepa2", "digits", "top1",
        dict(epochs=0.0, iterations=20, warmup=2, batch_size=128),
        dict(epochs=0.0, iterations=3, warmup=1, batch_size=32, lrs=[1e-3],
             weight_decays=[1e-3], heads=2, depth=2), "cpu",
    ),
    "logreg": Probe(
        "logreg@dinov2", "digits", "top1",
        dict(c_num=12, max_iter=300), dict(c_num=4, max_iter=50), "numpy",
    ),
    "linseg": Probe(
        "linseg@dinov3", "shapes-seg", "miou",
        dict(**_DENSE, samples=320, warmup_samples=32),
        dict(**_DENSE, samples=16, warmup_samples=8) | {"batch_size": 8},
    ),
    "lindepth": Probe(
        "lindepth@dinov3", "shapes-depth", "rmse",
        dict(**_DENSE, samples=320, warmup_samples=64, sigloss_warmup_samples=32,
             train_crop=(28, 28), max_depth=4.0),
        dict(**_DENSE, samples=16, warmup_samples=8, sigloss_warmup_samples=8, bins=16,
             train_crop=(28, 28), max_depth=4.0) | {"batch_size": 8},
    ),
    "knnseg": Probe("knnseg@capi", "shapes-seg", "miou", {}, dict(ks=[1, 3], max_bank_patches=4000)),
}  # fmt: skip


def _probe_dataset(ctx, name: str) -> str:
    """``name`` cut to its first probe_train / probe_test images (dense targets too),
    registered under a name of its own (so no cache mixes it with the whole set)."""
    import dataclasses

    from ssl_eval.data.datasets import DATASETS, DatasetOptions, DatasetSpec, get_dataset

    z = ctx["sizes"]
    cut_name = f"{name}-first{z.probe_train}-{z.probe_test}"
    if cut_name in DATASETS:
        return cut_name

    def cut(split, n):
        return dataclasses.replace(split, labels=split.labels[:n], images=split.images[:n])

    def load(_):
        b = get_dataset(name, DatasetOptions())
        dense = b.dense
        if dense is not None:
            dense = dataclasses.replace(
                dense,
                train=dataclasses.replace(
                    dense.train, targets=dense.train.targets[: z.probe_train]
                ),
                test=dataclasses.replace(dense.test, targets=dense.test.targets[: z.probe_test]),
            )
        return dataclasses.replace(
            b,
            name=cut_name,
            train=cut(b.train, z.probe_train),
            test=cut(b.test, z.probe_test),
            fingerprint={**b.fingerprint, "first": [z.probe_train, z.probe_test]},
            dense=dense,
        )

    DATASETS.register(cut_name, DatasetSpec(cut_name, load, f"gpu_checks probes: {name}, cut"))
    return cut_name


def _probe_card(probe: Probe, smoke: bool):
    import dataclasses

    from ssl_eval.protocols.cards import load_card

    card = load_card(probe.card)
    small = probe.smoke if smoke else probe.full
    return dataclasses.replace(card, params=dataclasses.replace(card.params, **small))


def _peak_reset(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev) -> float | None:
    if dev.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)


def _run_probe_cli(ctx, probe: Probe, card, dev: torch.device, tag: str) -> dict:
    """The card through evaluate.run (what ``ssl-eval run`` calls) on ``dev``."""
    from ssl_eval.core.config import RunConfig
    from ssl_eval.orchestrate.evaluate import run
    from ssl_eval.records.store import read_unit_file

    z, work = ctx["sizes"], ctx["work"]
    cfg = RunConfig(
        backbones=(z.probe_backbone,),
        datasets=(_probe_dataset(ctx, probe.dataset),),
        protocols=(card,),
        results_dir=work / f"probe-{tag}",
        cache_dir=work / f"probe-cache-{dev.type}",
        device=dev.type,
        batch_size=z.extract_batch,
        image_size=z.probe_size,
        progress=False,
        num_workers=0,
        bootstrap_resamples=50,
    )
    _peak_reset(dev)
    outcomes, s = _timed(dev, lambda: run(cfg))
    (o,) = outcomes
    if o.status != "done":
        raise RuntimeError(f"{probe.card} on {probe.dataset}: status {o.status}")
    rec = [r for r in read_unit_file(o.path) if r.metric == probe.metric]
    return {
        "seconds": round(s, 2),
        "peak_gpu_mb": _peak_mb(dev),
        probe.metric: round(float(o.metrics[probe.metric]), 4),
        "tokens": (rec[0].details.get("tokens") or rec[0].details.get("tokens_train"))
        if rec
        else None,
    }


def _logreg_inputs(ctx, dev: torch.device):
    """Digits embedded once by the probe backbone (float32, on ``dev``): the same features for
    logistic regression's two paths; validation every 5th training row."""
    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.protocols.base import ProtocolInputs, embed_images

    z = ctx["sizes"]
    ds = get_dataset(_probe_dataset(ctx, "digits"), DatasetOptions())
    bb = build_backbone(z.probe_backbone, BuildOptions(image_size=z.probe_size))
    with torch.no_grad():
        tr = embed_images(bb, ds.train.images, dev, z.extract_batch)
        te = embed_images(bb, ds.test.images, dev, z.extract_batch)
    n = len(tr)
    return ProtocolInputs(
        tr, np.asarray(ds.train.labels), te, np.asarray(ds.test.labels),
        np.setdiff1d(np.arange(n), np.arange(0, n, 5)), np.arange(0, n, 5), len(ds.classes),
    )  # fmt: skip


def _run_logreg(ctx, probe: Probe, card) -> dict:
    """The protocol type's run (what evaluate.run calls on cached features) on the GPU (torch
    path) and on the CPU (numpy path), on the same features: the selected C and the test top-1
    must be the same."""
    import dataclasses

    dev = ctx["device"]
    inp = _logreg_inputs(ctx, dev)
    _peak_reset(dev)
    gpu, s = _timed(
        dev, lambda: card.protocol.run(dataclasses.replace(inp, device=dev), card.params)
    )
    row = {
        "seconds": round(s, 2),
        "peak_gpu_mb": _peak_mb(dev),
        "top1": round(gpu.metrics["top1"], 4),
        "selected_C": gpu.details["selected"]["C"],
        "device_path": gpu.details["device"],
    }
    cpu_dev = torch.device("cpu")
    ref, s_ref = _timed(
        cpu_dev, lambda: card.protocol.run(dataclasses.replace(inp, device=cpu_dev), card.params)
    )
    same = (
        ref.details["selected"]["C"] == gpu.details["selected"]["C"]
        and ref.metrics["top1"] == gpu.metrics["top1"]
    )
    row["reference"] = {
        "path": "numpy on the CPU, the same features",
        "seconds": round(s_ref, 2),
        "top1": round(ref.metrics["top1"], 4),
        "selected_C": ref.details["selected"]["C"],
        "same_C_and_top1": same,
    }
    if not same:
        raise RuntimeError(
            f"logreg: the GPU path chose C={gpu.details['selected']['C']:.6g} "
            f"(top-1 {gpu.metrics['top1']:.4f}), the numpy path C={ref.details['selected']['C']:.6g} "
            f"(top-1 {ref.metrics['top1']:.4f})"
        )
    return row


def _probe_one(ctx, name: str, probe: Probe) -> dict:
    card = _probe_card(probe, ctx["smoke"])
    if probe.reference == "numpy":
        return _run_logreg(ctx, probe, card)
    row = _run_probe_cli(ctx, probe, card, ctx["device"], name)
    if probe.reference == "cpu":
        ref = _run_probe_cli(ctx, probe, card, torch.device("cpu"), f"{name}-cpu")
        row["reference"] = {
            "path": "the same run on the CPU in float32",
            "seconds": ref["seconds"],
            probe.metric: ref[probe.metric],
            f"{probe.metric}_difference_device_minus_cpu": round(
                row[probe.metric] - ref[probe.metric], 4
            ),
        }
    return row


def check_probes(ctx) -> dict:
    """Each newer protocol's device path end to end at a small fixed size: wall seconds, peak
    GPU memory, the metric and, where cheap, the agreement with a CPU reference. A failing
    sub-probe is recorded (what failed, one line) and the others still run; any failure makes
    the check an error (so the script's exit code says so)."""
    z = ctx["sizes"]
    out: dict = {"backbone": z.probe_backbone, "image_size": z.probe_size}
    failed = []
    for name, probe in PROBES.items():
        t0 = time.perf_counter()
        try:
            row = {"card": probe.card, "dataset": probe.dataset, **_probe_one(ctx, name, probe)}
            row["ok"] = True
        except Exception as e:  # one failing sub-probe must not cost the others
            msg = (str(e).strip().splitlines() or [""])[0]
            row = {"card": probe.card, "ok": False, "error": f"{type(e).__name__}: {msg}"}
            failed.append(name)
        row["probe_seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = row
        print(json.dumps({f"probes.{name}": row}), flush=True)
    if failed:
        out["error"] = f"sub-probes failed: {', '.join(failed)}"
    return out


for _name, _fn in [("env", check_env), ("decode", check_decode), ("extract", check_extract),
                   ("knn", check_knn), ("finetune", check_finetune), ("headline", check_headline),
                   ("probes", check_probes)]:  # fmt: skip
    CHECKS.register(_name, _fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (tests)")
    ap.add_argument("--only", default="", help="comma-separated checks (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for every figure")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if dev.type != "cuda" and not a.smoke:
        print(
            "no CUDA GPU here: every GPU figure stays 'not measured' (use --smoke to test the script)"
        )
        return 2
    torch.manual_seed(0)
    names = [n for n in a.only.split(",") if n] or CHECKS.names()
    results: dict = {"smoke": a.smoke, "device": str(dev)}
    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp:
        ctx = {
            "device": dev,
            "sizes": SMOKE if a.smoke else FULL,
            "work": Path(tmp),
            "smoke": a.smoke,
        }
        for name in names:
            t0 = time.perf_counter()
            try:
                res = CHECKS.get(name)(ctx)
            except Exception as e:  # one failing check must not cost the others' minutes
                res = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
            res["check_seconds"] = round(time.perf_counter() - t0, 1)
            results[name] = res
            print(json.dumps({name: res}), flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [n for n in names if "error" in results[n]]
    print(f"checks: {len(names) - len(failed)} ran, {len(failed)} failed {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
