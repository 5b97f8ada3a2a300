#!/usr/bin/env python
"""How many epochs the linear probe needs, decided on VALIDATION top-1 (test shown, never used).

    python benchmarks/linear_epochs.py                          # the default feature sources
    python benchmarks/linear_epochs.py --sources cifar_resnet20 --merge   # add a row to the files

For each feature source, the shipped linear card (protocols/linear.yaml) runs at
``--set epochs=E`` for E = 3, 10, 20 (``load_card("linear", [f"epochs={E}"])`` ->
``run_linear``), on the evaluator's split: a stratified 10% of train held out for selection
(``stratified_val_split(labels, 0.1, 0)``), protocol seed 0. For each E it reports

* val top-1: the validation top-1 of the head the protocol selects (the max over the lr x wd
  grid of ``details["val_top1"]``): the figure the epoch choice rests on;
* test top-1 of that head: SHOWN ONLY, never used to choose anything.

Two noise yardsticks, both 95%:

* rough binomial half-width of one accuracy, 1.96 * sqrt(p (1 - p) / n), with p the 3-epoch
  figure and n the split's size (n_val for validation, n_test for test);
* paired half-width of the difference acc(E) - acc(3) on the same images,
  1.96 * sqrt(((b + c) / n - ((b - c) / n)^2) / n), b and c the images only the E-epoch head
  or only the 3-epoch head gets right (the selected head each time). The two heads err on
  mostly the same images, so this is much tighter than the binomial one, and it is the one
  that says whether a change on validation is more than split noise.

Feature sources (``--sources``, comma-separated):

* ``synth384``, ``synth2048``: the seeded Gaussian mixtures of benchmarks/bench_protocols.py
  (its ``make_labels`` / ``make_features``: bank 50,000 / queries 10,000, 100 classes, sep 0.5,
  seed 0), float32; the bank is train (val carved from it), the queries are test.
* ``shapes``, ``digits``: the built-in datasets under the ``pixels`` backbone.
* ``cifar_pixels``: the JPEG copy of CIFAR-10 (../shared/data/cifar10_jpeg.tar.gz, unpacked to
  --cifar-dir if absent) under ``pixels``.
* ``cifar_resnet20``, ``cifar_resnet56``: the same data under the supervised CIFAR ResNets of
  ../shared/weights (about 13 minutes of feature extraction each on a 2-core CPU; not in the
  default list).

Image features are extracted exactly as ``ssl-eval run`` does (``ssl_eval.features.extraction.extract``:
float16 storage, the content-addressed cache in --cache-dir, so they are extracted once across
E and across invocations). ``--reuse-features`` also accepts a cache entry written by other ssl-eval source
(another edit of backbones/ or data/ since): same weights, backbone, preprocessing, data,
split, dtype, libraries and device; the row then names the entry. Writes ``--out``.json (every figure, every head's val top-1) and
``--out``.md (the two tables), and prints them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_protocols import loadavg, log, make_features, make_labels  # noqa: E402

import ssl_eval  # noqa: E402
from ssl_eval.core.runtime import seed_everything  # noqa: E402
from ssl_eval.data.splits import stratified_val_split  # noqa: E402
from ssl_eval.protocols import linear as linear_module  # noqa: E402
from ssl_eval.protocols.base import ProtocolInputs  # noqa: E402
from ssl_eval.protocols.cards import load_card  # noqa: E402
from ssl_eval.protocols.linear import run_linear  # noqa: E402

VAL_FRACTION, SPLIT_SEED, SEED = 0.1, 0, 0  # the evaluator's defaults (RunConfig)
DEFAULT_SOURCES = "synth384,synth2048,shapes,digits,cifar_pixels"
LABELS = {
    "synth384": "synthetic d = 384 (bench_protocols)",
    "synth2048": "synthetic d = 2,048 (bench_protocols)",
    "shapes": "shapes, pixels",
    "digits": "digits, pixels",
    "cifar_pixels": "CIFAR-10 JPEG, pixels (3,072-d)",
    "cifar_resnet20": "CIFAR-10 JPEG, cifar_resnet20 (64-d)",
    "cifar_resnet56": "CIFAR-10 JPEG, cifar_resnet56 (64-d)",
}
WEIGHTS = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet56": "resnet56-4bfd9763.th"}


def machine() -> dict:
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in (
                "Model name",
                "CPU(s)",
                "Core(s) per socket",
                "Socket(s)",
                "Thread(s) per core",
            ):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.CalledProcessError):
        info["Model name"] = platform.processor() or "unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": info.get("Model name", "unknown"),
        "lscpu": info,
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ssl_eval": ssl_eval.__version__,
    }


def half_width(p: float, n: int) -> float:
    """Rough binomial 95% half-width of an accuracy p measured on n images, in points."""
    return 100 * 1.96 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Difference of two accuracies on the same images (bool arrays, ``b`` minus ``a``), in
    points, with its paired 95% half-width."""
    n = len(a)
    gain, loss = int((b & ~a).sum()), int((a & ~b).sum())
    d = (gain - loss) / n
    hw = 1.96 * math.sqrt(max((gain + loss) / n - d * d, 0.0) / n)
    return {
        "diff_pts": 100 * d,
        "half_width_pts": 100 * hw,
        "only_new_right": gain,
        "only_first_right": loss,
    }


def run_with_heads(inp: ProtocolInputs, params):
    """``run_linear`` unchanged, also handing back the HeadGrid it trained (to score the
    selected head per image; the reported numbers are run_linear's own)."""
    grabbed = []
    original = linear_module.train_heads

    def keep(*args, **kwargs):
        grabbed.append(original(*args, **kwargs))
        return grabbed[-1]

    linear_module.train_heads = keep
    try:
        out = run_linear(inp, params)
    finally:
        linear_module.train_heads = original
    return out, grabbed[0]


def correct_per_image(
    heads, x: np.ndarray, y: np.ndarray, head: int, chunk: int = 8192
) -> np.ndarray:
    right = []
    for s in range(0, len(x), chunk):
        xb = torch.from_numpy(np.asarray(x[s : s + chunk], dtype=np.float32))
        right.append(heads.logits(xb, head=head).argmax(1).numpy() == y[s : s + chunk])
    return np.concatenate(right)


# ---------------------------------------------------------------- feature sources


def synthetic(dim: int):
    bank_y, query_y = make_labels(50_000, 10_000, 100, SEED)
    bank_x, query_x = make_features([bank_y, query_y], dim, 100, SEED, 0.5)
    return (
        bank_x,
        bank_y,
        query_x,
        query_y,
        100,
        {
            "kind": "synthetic",
            "dim": dim,
            "bank": 50_000,
            "queries": 10_000,
            "classes": 100,
            "sep": 0.5,
            "seed": SEED,
        },
    )


def older_entry(cache_dir: Path, key: dict) -> Path | None:
    """The newest cache entry written by other ssl-eval source: its key agrees with ``key`` on
    every field it has except the hashed source (the weights' sha256, backbone, preprocessing,
    feature kind, data fingerprint, split, dtype, libraries, device among them); fields that the
    older code did not record yet are not compared."""
    found = []
    for meta in (cache_dir / "features").glob("*/meta.json"):
        try:
            k = json.loads(meta.read_text())["key"]
        except (OSError, ValueError, KeyError):
            continue
        if all(f in k for f in ("weights_sha256", "dataset_fingerprint", "split", "dtype")) and all(
            key.get(f) == v for f, v in k.items() if f != "code"
        ):
            found.append((meta.stat().st_mtime, meta.parent))
    return max(found)[1] if found else None


def image_features(dataset: str, backbone: str, weights: Path | None, cache_dir: Path, reuse: bool):
    """Train and test features as ``ssl-eval run`` computes them (same cache, same dtype)."""
    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.core.files import sha256_json
    from ssl_eval.core.runtime import resolve_device
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.features.extraction import cache_key, extract

    device = resolve_device("cpu")
    bundle = get_dataset(dataset, DatasetOptions(manifest_dir=cache_dir / "manifests"))
    bb = build_backbone(backbone, BuildOptions(weights=weights))
    t0 = time.perf_counter()
    arrays, reused = {}, {}
    for split in ("train", "test"):
        key = cache_key(bb, bundle, split, "float16", device)
        entry = cache_dir / "features" / sha256_json(key)[:32]
        old = None if (entry / "meta.json").is_file() or not reuse else older_entry(cache_dir, key)
        if old is not None:
            log(
                f"  reusing {old} (written by another ssl-eval source hash: "
                f"{json.loads((old / 'meta.json').read_text())['key']['code']} vs {key['code']} now)"
            )
            arrays[split] = (
                np.load(old / "features.npy", mmap_mode="r"),
                np.load(old / "labels.npy"),
            )
            reused[split] = str(old)
        else:
            fs = extract(bb, bundle, split, cache_dir=cache_dir, device=device, progress=False)
            arrays[split] = (fs.features, fs.labels)
    secs = time.perf_counter() - t0
    (trx, try_), (tex, tey) = arrays["train"], arrays["test"]
    log(f"  features: train {trx.shape}, test {tex.shape} ({secs:.1f} s)")
    return (
        trx,
        try_,
        tex,
        tey,
        bundle.num_classes,
        {
            "kind": "images",
            "dataset": bundle.name,
            "backbone": bb.tag,
            "weights": str(weights) if weights else None,
            "feature_dtype": "float16",
            "dim": int(trx.shape[1]),
            "classes": bundle.num_classes,
            "feature_seconds": round(secs, 1),
            "reused_entry_of_other_source_hash": reused or None,
        },
    )


def ensure_cifar(cifar_dir: Path, shared: Path) -> Path:
    if not (cifar_dir / "train").is_dir() or not (cifar_dir / "test").is_dir():
        tar = shared / "data" / "cifar10_jpeg.tar.gz"
        log(f"  unpacking {tar} into {cifar_dir}")
        cifar_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as t:
            t.extractall(cifar_dir, filter="data")
    return cifar_dir


def load_source(name: str, a) -> tuple:
    if name == "synth384":
        return synthetic(384)
    if name == "synth2048":
        return synthetic(2048)
    if name in ("shapes", "digits"):
        return image_features(name, "pixels", None, a.cache_dir, a.reuse_features)
    cifar = f"folder:{ensure_cifar(a.cifar_dir, a.shared)}"
    if name == "cifar_pixels":
        return image_features(cifar, "pixels", None, a.cache_dir, a.reuse_features)
    if name in WEIGHTS:
        return image_features(
            cifar, name, a.shared / "weights" / WEIGHTS[name], a.cache_dir, a.reuse_features
        )
    raise SystemExit(f"unknown source {name!r}; choose from {', '.join(LABELS)}")


# ---------------------------------------------------------------- the ablation


def ablate(name: str, a) -> dict:
    log(f"\n== {LABELS[name]} ==  (load {loadavg()})")
    t0 = time.perf_counter()
    train_x, train_y, test_x, test_y, classes, about = load_source(name, a)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    tr, va = stratified_val_split(train_y, VAL_FRACTION, SPLIT_SEED)
    row = {
        "source": name,
        "label": LABELS[name],
        "about": about,
        "train": len(tr),
        "val": len(va),
        "test": len(test_y),
        "runs": {},
        "measured": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": loadavg(),
    }
    log(
        f"  train {len(tr):,} / val {len(va):,} / test {len(test_y):,}, {classes} classes, dim {train_x.shape[1]}"
    )
    right = {}
    for E in a.epochs:
        card = load_card("linear", [f"epochs={E}"])
        seed_everything(SEED)
        inp = ProtocolInputs(train_x, train_y, test_x, test_y, tr, va, classes, seed=SEED)
        t = time.perf_counter()
        out, heads = run_with_heads(inp, card.params)
        wall = time.perf_counter() - t
        vals = out.details["val_top1"]
        best_val = max(vals.values())
        sel = out.details["selected"]
        assert (
            vals[f"lr={sel['lr']},wd={sel['weight_decay']}"] == best_val
        )  # the protocol selects on val
        h = heads.settings.index((sel["lr"], sel["weight_decay"]))
        right[E] = {
            "val": correct_per_image(heads, train_x[va], train_y[va], h),
            "test": correct_per_image(heads, test_x, test_y, h),
        }
        assert (
            abs(right[E]["val"].mean() - best_val) < 1e-6
            and abs(right[E]["test"].mean() - out.metrics["top1"]) < 1e-6
        )
        row["runs"][str(E)] = {
            "card_version": card.version,
            "overrides": dict(card.overrides),
            "val_top1": best_val,
            "test_top1": out.metrics["top1"],
            "selected": sel,
            "val_top1_per_head": vals,
            "epochs_run": out.details["epochs_run"],
            "steps": out.details["steps"],
            "diverged_heads": out.details["diverged_heads"],
            "wall_s": round(wall, 2),
        }
        log(
            f"  epochs={E:<3d} (ran {out.details['epochs_run']} epochs, {out.details['steps']} steps, {wall:6.1f} s): "
            f"val {100 * best_val:6.2f}  [test {100 * out.metrics['top1']:6.2f}, shown only]  "
            f"selected lr={sel['lr']} wd={sel['weight_decay']}"
        )
    e0 = a.epochs[0]
    for E in a.epochs[1:]:
        row["runs"][str(E)]["paired_vs_first"] = {
            s: paired(right[e0][s], right[E][s]) for s in ("val", "test")
        }
    base = row["runs"][str(e0)]
    row["val_half_width_pts"] = half_width(base["val_top1"], len(va))
    row["test_half_width_pts"] = half_width(base["test_top1"], len(test_y))
    row["max_abs_val_change_pts"] = max(
        abs(100 * (r["val_top1"] - base["val_top1"])) for r in row["runs"].values()
    )
    row["max_val_gain_over_first_pts"] = max(
        100 * (r["val_top1"] - base["val_top1"]) for r in row["runs"].values()
    )
    row["first_within_val_noise"] = row["max_val_gain_over_first_pts"] <= row["val_half_width_pts"]
    # paired: no longer schedule beats the first on validation by more than its paired half-width
    row["first_within_paired_val_noise"] = all(
        r["paired_vs_first"]["val"]["diff_pts"] <= r["paired_vs_first"]["val"]["half_width_pts"]
        for r in row["runs"].values()
        if "paired_vs_first" in r
    )
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["load_end"] = loadavg()
    del train_x, test_x
    gc.collect()
    return row


# ---------------------------------------------------------------- report


def tables(rows: list[dict], epochs: list[int], info: dict) -> str:
    e0 = str(epochs[0])
    later = [str(E) for E in epochs[1:]]

    def deltas(r, split):
        return " | ".join(
            f"{r['runs'][E]['paired_vs_first'][split]['diff_pts']:+.2f} "
            f"± {r['runs'][E]['paired_vs_first'][split]['half_width_pts']:.2f}"
            for E in later
        )

    lines = [
        "Validation top-1 (%) of the selected head (max over the card's grid of val top-1: the figure the "
        f"choice rests on). Split: {int(VAL_FRACTION * 100)}% of train, stratified, seed {SPLIT_SEED}. "
        f"Δ E = val(E) - val({e0}) with its paired 95% half-width; binomial ± = 1.96 sqrt(p(1-p)/n_val) "
        f"at {e0} epochs.",
        "",
        "| features | n val | "
        + " | ".join(f"{E} epochs" for E in epochs)
        + " | "
        + " | ".join(f"Δ {E} (paired ±)" for E in later)
        + f" | binomial ± | {e0} within noise? (binomial / paired) |",
        "|---|---:|" + "---:|" * (len(epochs) + len(later) + 1) + "---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['val']:,} | "
            + " | ".join(f"{100 * r['runs'][str(E)]['val_top1']:.2f}" for E in epochs)
            + f" | {deltas(r, 'val')} | {r['val_half_width_pts']:.2f} | "
            f"{'yes' if r['first_within_val_noise'] else 'NO'} / {'yes' if r['first_within_paired_val_noise'] else 'NO'} |"
        )
    lines += [
        "",
        "Test top-1 (%) of the same heads: SHOWN, NOT USED TO CHOOSE.",
        "",
        "| features | n test | "
        + " | ".join(f"{E} epochs" for E in epochs)
        + " | "
        + " | ".join(f"Δ {E} (paired ±)" for E in later)
        + " | binomial ± |",
        "|---|---:|" + "---:|" * (len(epochs) + len(later) + 1),
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['test']:,} | "
            + " | ".join(f"{100 * r['runs'][str(E)]['test_top1']:.2f}" for E in epochs)
            + f" | {deltas(r, 'test')} | {r['test_half_width_pts']:.2f} |"
        )
    lines += [
        "",
        "Epochs actually run (the card raises epochs to reach min_steps = 200 optimiser steps):",
        "",
    ]
    for r in rows:
        ran = ", ".join(f"{E}->{r['runs'][str(E)]['epochs_run']}" for E in epochs)
        lines.append(
            f"- {r['label']}: {ran}; selected heads "
            + ", ".join(
                f"{E}: lr {r['runs'][str(E)]['selected']['lr']} wd {r['runs'][str(E)]['selected']['weight_decay']}"
                for E in epochs
            )
            + f"; {r['wall_s']:.0f} s (measured {r['measured']}, load {r['load_start']} -> {r['load_end']})"
        )
    lines += [
        "",
        f"Machine: {info['cpu']}, {info['lscpu'].get('CPU(s)', '?')} CPUs "
        f"({info['lscpu'].get('Core(s) per socket', '?')} cores per socket x {info['lscpu'].get('Socket(s)', '?')} socket, "
        f"{info['lscpu'].get('Thread(s) per core', '?')} thread per core), {info['memory_gib']} GiB, "
        f"torch {info['torch']} ({info['cpu_capability']}), ssl_eval {info['ssl_eval']}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sources", default=DEFAULT_SOURCES, help=f"comma-separated, from: {', '.join(LABELS)}"
    )
    ap.add_argument(
        "--epochs", default="3,10,20", help="epochs to compare; the first is the one judged"
    )
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/ssl_cache"))
    ap.add_argument("--cifar-dir", type=Path, default=Path("/tmp/cifar10_jpeg"))
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "results" / "benchmarks" / "linear_epochs",
        help="writes OUT.json and OUT.md",
    )
    ap.add_argument(
        "--reuse-features",
        action="store_true",
        help="accept a cached feature entry written under another ssl-eval source hash (said in the row)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other sources already in OUT.json (add or replace these)",
    )
    a = ap.parse_args(argv)
    a.epochs = [int(e) for e in a.epochs.split(",")]
    sources = [s.strip() for s in a.sources.split(",") if s.strip()]

    t_start = time.perf_counter()
    info = machine()
    log(
        f"machine: {info['cpu']}, {info['lscpu']}, torch threads {info['torch_threads']}; load {loadavg()}"
    )
    rows = [ablate(s, a) for s in sources]
    total = time.perf_counter() - t_start

    json_path, md_path = a.out.with_suffix(".json"), a.out.with_suffix(".md")
    previous = json.loads(json_path.read_text()) if a.merge and json_path.is_file() else {}
    kept = [r for r in previous.get("rows", []) if r["source"] not in sources]
    order = list(LABELS)
    all_rows = sorted(kept + rows, key=lambda r: order.index(r["source"]))
    runs = previous.get("invocations", []) + [
        {"argv": sys.argv, "sources": sources, "total_s": round(total, 1), "machine": info}
    ]
    text = tables(all_rows, a.epochs, info)
    log("\n" + text + f"\n\ntotal {total:.0f} s; load {loadavg()}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(
            {
                "epochs": a.epochs,
                "val_fraction": VAL_FRACTION,
                "split_seed": SPLIT_SEED,
                "seed": SEED,
                "rows": all_rows,
                "invocations": runs,
            },
            indent=1,
        )
        + "\n"
    )
    calls = "; ".join(f"--sources {','.join(r['sources'])}: {r['total_s']:.0f} s" for r in runs)
    md_path.write_text(
        "# Linear probe: epochs chosen on validation\n\n`python benchmarks/linear_epochs.py` "
        f"(invocations: {calls})\n\n" + text + "\n"
    )
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
