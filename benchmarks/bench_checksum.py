"""Cost of verifying a feature-cache entry's checksums against the cached run it serves.

A cached run reads the entry (memory map) and runs the protocol; verification reads every
byte once more through zlib.crc32. Measured on a CIFAR-size entry (50,000 x 64 float16, the
CIFAR ResNet features) and a wide one (50,000 x 2,048 float16), each against the k-NN protocol
on 10,000 queries, in the same run. Prints the ratios; writes results/benchmarks/bench_checksum.json.

Usage: python benchmarks/bench_checksum.py
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssl_eval.features.entries import file_checksum
from ssl_eval.protocols.search.knn import knn_classify

ROOT = Path(__file__).resolve().parents[1]


def best(fn, reps=3):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for d in (64, 2048):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "features.npy"
            np.save(path, rng.standard_normal((50_000, d)).astype(np.float16))
            labels = torch.from_numpy(rng.integers(0, 10, 50_000))
            q = torch.from_numpy(rng.standard_normal((10_000, d)).astype(np.float32))
            verify = best(lambda path=path: file_checksum(path))

            def cached_run(path=path, labels=labels, q=q):
                x = torch.from_numpy(np.asarray(np.load(path, mmap_mode="r"), dtype=np.float32))
                knn_classify(x, labels, q, (20,), 0.07, 10, "faiss")

            run = best(cached_run, reps=2)
            size = path.stat().st_size
            rows.append(
                {
                    "dim": d,
                    "entry_mb": round(size / 2**20, 1),
                    "verify_s": round(verify, 4),
                    "cached_knn_run_s": round(run, 3),
                    "share": round(verify / (verify + run), 4),
                    "verify_gb_per_s": round(size / verify / 1e9, 2),
                }
            )
            r = rows[-1]
            print(
                f"d={d}: entry {r['entry_mb']} MB, crc32 verify {r['verify_s']:.4f} s "
                f"({r['verify_gb_per_s']} GB/s), cached k-NN run {r['cached_knn_run_s']:.3f} s: "
                f"verification is {100 * r['share']:.1f}% of the cached run"
            )
    out = ROOT / "results" / "benchmarks" / "bench_checksum.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} threads",
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
