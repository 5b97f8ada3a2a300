"""Decode once: feature extraction with and without the decode cache, against the pure forward
pass, for two backbones on the CIFAR-10 JPEG copy, in one run.

For each backbone (default: the real CIFAR ResNet-20 and ResNet-56 of ../shared/weights, which
share one resize/crop and so one decode entry, and ``pixels`` at the same size, a backbone with
no model, whose rate is the input pipeline's own):
  * no cache: ``features.extract`` as a run without --decode-cache does it (a DataLoader whose
    workers open, decode and resize every JPEG; ``--num-workers`` as the CLI's default);
  * cache: ``features.extract(decode_cache=True)`` reading the entry built once beforehand
    (its build time is reported on its own, and charged once to the pair of backbones);
  * forward only: ``backbone.embed`` on the same batches already in memory and normalised, the
    rate no input pipeline can beat.
Every extraction starts from an empty feature cache; the two paths' features are compared bit
for bit (float32). Prints images/s and ratios; writes results/benchmarks/decode_cache.json|md.

Usage:
  mkdir -p /tmp/cifar10 && tar -xzf ../shared/data/cifar10_jpeg.tar.gz -C /tmp/cifar10
  python benchmarks/bench_decode_cache.py --data /tmp/cifar10 --weights-dir ../shared/weights
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.core.files import atomic_write_json, atomic_write_text
from ssl_eval.core.provenance import package_versions
from ssl_eval.data.datasets import DatasetOptions, ImageSplit, get_dataset
from ssl_eval.features.decode_cache import decoded
from ssl_eval.features.extraction import extract

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"cifar_resnet20": "resnet20-12fca82f.th", "cifar_resnet56": "resnet56-4bfd9763.th"}


def _subset(bundle, split: str, limit: int | None):
    """``bundle`` whose ``split`` keeps its first ``limit`` images of every class, in order
    (the fingerprint says so, so no cache entry of the whole split is reused)."""
    src = bundle.split(split)
    if not limit or limit >= len(src):
        return bundle
    keep = np.concatenate([np.flatnonzero(src.labels == c)[:limit] for c in np.unique(src.labels)])
    part = ImageSplit(src.labels[keep], paths=[src.paths[i] for i in keep])
    fp = {**bundle.fingerprint, "subset": {split: f"first {limit} per class"}}
    return dataclasses.replace(bundle, **{split: part}, fingerprint=fp)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the DataLoader workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn):
    """(result, wall s, CPU s). On a shared machine the CPU seconds are the figure other
    users' load disturbs least; the wall seconds are what a user waits."""
    c0, t0 = _cpu(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _cpu() - c0


def _forward_only(bb, entry, batch_size: int):
    """``bb.embed`` alone over every batch of ``entry``, inputs in memory and normalised."""
    xs = [bb.preprocessing.normalise(b) for b in entry.batches(batch_size)]

    def run():
        for x in xs:
            bb.embed(x)

    run()  # warm-up: oneDNN builds its kernels once per input shape, on first use
    return _timed(run)


def _measurements(bb, bundle, a, work: Path, kw: dict, entry, r: int) -> dict:
    """One repetition's three measurements of ``bb``, each extraction from an empty feature
    cache (the decode entry itself stays: it is built once, before)."""

    def plain():
        cache = work / f"plain{r}-{bb.tag}"
        return _timed(lambda: extract(bb, bundle, a.split, cache_dir=cache, **kw))

    def fast():
        shutil.rmtree(work / "dc" / "features", ignore_errors=True)
        return _timed(
            lambda: extract(bb, bundle, a.split, cache_dir=work / "dc", decode_cache=True, **kw)
        )

    return {
        "plain": plain,
        "fast": fast,
        "forward": lambda: _forward_only(bb, entry, a.batch_size),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="unpacked CIFAR-10 JPEG folder")
    ap.add_argument("--weights-dir", type=Path, default=ROOT.parent / "shared" / "weights")
    ap.add_argument(
        "--backbones",
        default="cifar_resnet20,cifar_resnet56,pixels",
        help="pixels (no model: the input pipeline alone) runs at the first backbone's size",
    )
    ap.add_argument("--split", default="test")
    ap.add_argument("--per-class", type=int, default=None, help="first N images of each class")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--num-workers", type=int, default=None, help="as the CLI: min(4, cores)")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions; best kept")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine two OpenMP threads "
        "spent 2-3x the time of one in barrier waits, in a way that differed between paths)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "decode_cache")
    ap.add_argument("--render", action="store_true", help="only rewrite --out's .md from its .json")
    a = ap.parse_args()
    if a.render:
        out = json.loads(a.out.with_suffix(".json").read_text())
        if "models_cpu_s_no_cache" not in out["summary"]:  # a run of the first layout
            rows = [r for r in out["rows"] if r["backbone"] != "pixels"]
            n = rows[0]["images"]
            cpu_p = sum(r["cpu_s_per_1k_img"]["no_cache"] * n / 1000 for r in rows)
            cpu_f = out["summary"]["decode_entry_build_cpu_s"] + sum(
                r["cpu_s_per_1k_img"]["decode_cache"] * n / 1000 for r in rows
            )
            out["summary"] = {
                k: v for k, v in out["summary"].items() if not k.startswith("both_")
            } | {
                "models_sharing_the_entry": [r["backbone"] for r in rows],
                "models_cpu_s_no_cache": round(cpu_p, 2),
                "models_cpu_s_cache_incl_build": round(cpu_f, 2),
                "models_cpu_speedup_incl_build": round(cpu_p / cpu_f, 2),
            }
            atomic_write_json(a.out.with_suffix(".json"), out)
        atomic_write_text(a.out.with_suffix(".md"), _markdown(out))
        return

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    try:
        bundle = _subset(get_dataset(f"folder:{a.data}", DatasetOptions()), a.split, a.per_class)
        n = len(bundle.split(a.split))
        names = [s.strip() for s in a.backbones.split(",") if s.strip()]
        bbs = {}
        for name in names:
            w = a.weights_dir / WEIGHTS[name] if name in WEIGHTS else None
            size = (bbs[names[0]].preprocessing.crop if bbs else None) if name == "pixels" else None
            bbs[name] = build_backbone(name, BuildOptions(weights=w, image_size=size, offline=True))
        kw = dict(device=torch.device("cpu"), batch_size=a.batch_size, dtype="float32")
        kw |= dict(progress=False, num_workers=a.num_workers)
        pre0 = bbs[names[0]].preprocessing
        entry, build_s, build_cpu = _timed(
            lambda: decoded(bundle, a.split, pre0, cache_dir=work / "dc", progress=False)
        )
        times: dict = {}
        for bb in bbs.values():  # warm-up: every batch shape once, for every backbone
            extract(bb, bundle, a.split, cache_dir=work / "warmup", decode_cache=True, **kw)
        for r in range(a.reps):  # interleaved: a burst of others' load hits every path alike
            for name, bb in bbs.items():
                for what, fn in _measurements(bb, bundle, a, work, kw, entry, r).items():
                    times.setdefault((name, what), []).append(fn())
        rows = []
        for name, bb in bbs.items():
            geo = {
                k: v
                for k, v in dataclasses.asdict(bb.preprocessing).items()
                if k not in ("mean", "std")
            }
            geo0 = {k: v for k, v in dataclasses.asdict(pre0).items() if k not in ("mean", "std")}
            plain, fast = (times[(name, w)][0][0] for w in ("plain", "fast"))
            best = {
                w: (min(x[1] for x in times[(name, w)]), min(x[2] for x in times[(name, w)]))
                for w in ("plain", "fast", "forward")
            }
            (t_plain, c_plain), (t_fast, c_fast), (t_fwd, c_fwd) = (
                best["plain"],
                best["fast"],
                best["forward"],
            )
            same = np.array_equal(np.asarray(plain.features), np.asarray(fast.features))
            rows.append(
                {
                    "backbone": name,
                    "shares_the_decode_entry": geo == geo0,
                    "images": n,
                    "no_cache_img_s": round(n / t_plain, 1),
                    "decode_cache_img_s": round(n / t_fast, 1),
                    "forward_only_img_s": round(n / t_fwd, 1),
                    "speedup_cache_vs_no_cache": round(t_plain / t_fast, 2),
                    "cache_share_of_forward_rate": round(t_fwd / t_fast, 3),
                    "no_cache_share_of_forward_rate": round(t_fwd / t_plain, 3),
                    "cpu_s_per_1k_img": {
                        "no_cache": round(1000 * c_plain / n, 2),
                        "decode_cache": round(1000 * c_fast / n, 2),
                        "forward_only": round(1000 * c_fwd / n, 2),
                    },
                    "speedup_cpu_s_cache_vs_no_cache": round(c_plain / c_fast, 2),
                    "features_bitwise_equal": bool(same),
                    "feature_keys_equal": plain.key == fast.key,
                    "wall_s_all_reps": {
                        w: [round(x[1], 2) for x in times[(name, w)]]
                        for w in ("plain", "fast", "forward")
                    },
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        models = [r for r in rows if r["backbone"] != "pixels" and r["shares_the_decode_entry"]]
        cpu_plain = sum(r["cpu_s_per_1k_img"]["no_cache"] * n / 1000 for r in models)
        cpu_fast = build_cpu + sum(r["cpu_s_per_1k_img"]["decode_cache"] * n / 1000 for r in models)
        summary = {
            "decode_entry_build_s": round(build_s, 2),
            "decode_entry_build_cpu_s": round(build_cpu, 2),
            "decode_entry_mb": round(entry.images.nbytes / 2**20, 1),
            "models_sharing_the_entry": [r["backbone"] for r in models],
            "models_cpu_s_no_cache": round(cpu_plain, 2),
            "models_cpu_s_cache_incl_build": round(cpu_fast, 2),
            "models_cpu_speedup_incl_build": round(cpu_plain / cpu_fast, 2),
        }
        print(json.dumps(summary), flush=True)
        machine = {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "packages": package_versions(),
        }
        subset = f", first {a.per_class} per class" if a.per_class else ""
        setup = {
            "data": f"CIFAR-10 JPEG copy, {a.split} split{subset} ({n} images)",
            "batch_size": a.batch_size,
            "torch_threads": a.threads,
            "reps": a.reps,
            "num_workers": a.num_workers if a.num_workers is not None else "min(4, cores)",
            "dtype": "float32",
            "device": "cpu",
        }
        out = {"setup": setup, "rows": rows, "summary": summary, "machine": machine}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.out.with_suffix(".json"), out)
        atomic_write_text(a.out.with_suffix(".md"), _markdown(out))
        print(f"wrote {a.out.with_suffix('.json')} and .md")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _markdown(out: dict) -> str:
    s = out["setup"]
    lines = [
        "# Decode cache: extraction images/s (written by benchmarks/bench_decode_cache.py)",
        "",
        f"{s['data']}; batch {s['batch_size']}, workers {s['num_workers']}, {s['dtype']} on the "
        f"{s['device']} with {s['torch_threads']} torch thread(s), best of {s['reps']} "
        "interleaved repetitions. "
        f"Machine: {out['machine']['processor']}, {out['machine']['cores']} cores, "
        f"load average after the run {out['machine']['load_average_after']}.",
        "",
        "Wall-clock rates on a machine shared with other users' jobs vary run to run; the CPU "
        "seconds (this process and its finished DataLoader workers) are the steadier figure.",
        "",
        "| backbone | no cache img/s | decode cache img/s | forward only img/s | cache / no cache"
        " | cache / forward | CPU s per 1k img (no cache / cache / forward) | CPU s ratio | bitwise equal |",
        "|---|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in out["rows"]:
        model = r["backbone"] != "pixels"  # pixels has no model: no forward-only rate
        fwd, share = (
            (r["forward_only_img_s"], r["cache_share_of_forward_rate"]) if model else ("-", "-")
        )
        lines.append(
            f"| {r['backbone']} | {r['no_cache_img_s']} | {r['decode_cache_img_s']} | "
            f"{fwd} | {r['speedup_cache_vs_no_cache']}x | {share} | "
            + " / ".join(
                str(r["cpu_s_per_1k_img"][k]) for k in ("no_cache", "decode_cache", "forward_only")
            )
            + f" | {r['speedup_cpu_s_cache_vs_no_cache']}x | {r['features_bitwise_equal']} |"
        )
    m = out["summary"]
    lines += [
        "",
        f"Decode entry: built once in {m['decode_entry_build_s']} s wall, "
        f"{m['decode_entry_build_cpu_s']} CPU s ({m['decode_entry_mb']} MB), shared by "
        f"{', '.join(m['models_sharing_the_entry'])}. Together they spent "
        f"{m['models_cpu_s_no_cache']} CPU s without the cache and "
        f"{m['models_cpu_s_cache_incl_build']} CPU s with it, its build included "
        f"({m['models_cpu_speedup_incl_build']}x).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
