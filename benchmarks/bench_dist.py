"""Two processes (``torchrun --nproc-per-node 2``, gloo) against one process on the same
evaluation: wall time and peak resident memory, measured in the same run.

Each configuration runs the same ``ssl-eval run`` command with a fresh cache and results folder
(feature extraction included), one after the other:

  1 process, default threads   the usual single-process run (torch uses every core)
  1 process, 1 thread          the reference for the scaling of the 2-process run
  2 processes, 1 thread each   torchrun's default (OMP_NUM_THREADS=1 per worker)

Memory, sampled every 20 ms over the whole process tree (the torchrun launcher and its
workers, or the single process): "peak total" is the largest sum of proportional set sizes
(PSS: a page shared by several processes counted once in all), "peak per process" the largest
resident set (RSS) of one process. The records of every configuration are checked to hold the same
values. Prints a table with ratios against the 1-process runs; writes
results/benchmarks/bench_dist.json and bench_dist.md.

Usage: python benchmarks/bench_dist.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ssl_eval.core.files import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of ``pid`` in MB. PSS shares each shared page among the processes mapping
    it, so PSS sums over processes without counting a page twice (a fork's child, the
    libraries every rank maps)."""
    out = [0.0, 0.0]
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                for j, field in enumerate(("Rss:", "Pss:")):
                    if line.startswith(field):
                        out[j] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out[0], out[1]


def measure(cmd: list[str], env: dict) -> dict:
    """Wall time and peak RSS (total over the process tree, and largest process) of ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"total": 0.0, "one": 0.0}

    def sample():
        while proc.poll() is None:
            mem = [_memory_mb(p) for p in _tree(proc.pid)]
            peak["total"] = max(peak["total"], sum(pss for _, pss in mem))
            peak["one"] = max(peak["one"], max((rss for rss, _ in mem), default=0.0))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    t.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {
        "wall_s": round(wall, 2),
        "peak_pss_total_mb": round(peak["total"], 1),
        "peak_rss_process_mb": round(peak["one"], 1),
    }


def records(folder: Path) -> dict:
    out = {}
    for f in sorted((folder / "records").glob("*.json")):
        for r in json.loads(f.read_text())["records"]:
            out[f"{r['backbone']} {r['protocol']['name']} {r['metric']}"] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="digits at 16 px: a smoke run")
    a = ap.parse_args()
    if a.quick:
        data = ["--dataset", "digits", "--image-size", "16", "--backbone", "random:resnet10t"]
    else:  # shapes: 10,000 train + 2,000 test images at 32 px
        data = ["--dataset", "shapes", "--image-size", "32", "--backbone", "random:resnet10t"]
    args = ["-m", "ssl_eval", "run", *data, "--protocol", "knn,linear", "--no-progress"]
    args += ["--no-leaderboard", "--feature-dtype", "float32"]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    configs = [
        ("1 process, default threads", [sys.executable], {}),
        ("1 process, 1 thread", [sys.executable], {"OMP_NUM_THREADS": "1"}),
        ("2 processes, 1 thread each", [*TORCHRUN, "2"], {}),
    ]
    rows, seen = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, prefix, env) in enumerate(configs):
            out = Path(tmp) / str(i)
            cmd = [*prefix, *args, "--results-dir", str(out / "r"), "--cache-dir", str(out / "c")]
            row = {"config": name, **measure(cmd, base | env)}
            recs = records(out / "r")
            values = {k: r["value"] for k, r in recs.items()}
            if seen is not None and values != seen:
                sys.exit(f"{name}: the records' values differ from the first run's")
            seen = values
            row["extract_s"] = round(
                sum(
                    sum(r["details"].get("feature_seconds", {}).values())
                    for k, r in recs.items()
                    if k.endswith(" top1") and " knn " in k
                ),
                2,
            )
            row["protocols_s"] = round(
                sum(r["wall_time_s"] for k, r in recs.items() if k.endswith(" top1")), 2
            )
            rows.append(row)
            print(f"{name}: {row}", flush=True)
    ref_default, ref_one = rows[0], rows[1]
    for r in rows:
        r["wall_vs_1proc_default"] = round(r["wall_s"] / ref_default["wall_s"], 2)
        r["wall_vs_1proc_1thread"] = round(r["wall_s"] / ref_one["wall_s"], 2)
        r["peak_pss_total_vs_1proc_default"] = round(
            r["peak_pss_total_mb"] / ref_default["peak_pss_total_mb"], 2
        )
    cpus = os.cpu_count()
    lines = [
        f"command: python {' '.join(args)}  (cpus: {cpus}, {platform.processor() or platform.machine()})",
        "",
        "| configuration | wall s | x 1 proc (default threads) | x 1 proc (1 thread) | "
        "extraction s | protocols s | peak PSS total MB | x 1 proc | peak RSS largest process MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['wall_s']:.1f} | {r['wall_vs_1proc_default']:.2f} | "
            f"{r['wall_vs_1proc_1thread']:.2f} | {r['extract_s']:.1f} | {r['protocols_s']:.1f} | "
            f"{r['peak_pss_total_mb']:.0f} | {r['peak_pss_total_vs_1proc_default']:.2f} | "
            f"{r['peak_rss_process_mb']:.0f} |"
        )
    lines += ["", f"records: {len(seen)} values, identical in every configuration"]
    print("\n".join(lines))
    dest = ROOT / "results" / "benchmarks"
    dest.mkdir(parents=True, exist_ok=True)
    name = "bench_dist_quick" if a.quick else "bench_dist"
    atomic_write_json(
        dest / f"{name}.json", {"command": args, "cpus": cpus, "rows": rows, "values": seen}
    )
    atomic_write_text(dest / f"{name}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
