#!/usr/bin/env python
"""k-NN cost against N x M, and the linear probe, each against scikit-learn and the matmul
limit, with the peak memory of every run.

    python benchmarks/bench_knn_speed.py            # d = 384: 12.5k x 2.5k, 25k x 5k, 50k x 10k
    python benchmarks/bench_knn_speed.py --quick    # a smoke run at a quarter of each size

Every figure comes from a fresh subprocess (so its peak RSS, ``VmHWM``, is its own) on the same
seeded synthetic features (benchmarks/bench_protocols.py's Gaussian mixture, 100 classes):

- ``limit``: the float32 GEMM rate, best of torch and numpy, on a (1024 x D) @ (D x N) product;
  the matmul limit of a search is 2 N M D divided by it (no exact search can beat it).
- ``sklearn``: ``KNeighborsClassifier(200, metric="cosine", algorithm="brute")``, fit + predict.
- ``torch`` / ``faiss``: ssl-eval's ``knn_classify`` (ks 10/20/100/200 from one top-200 search)
  with that backend; ``torch`` is what runs on a GPU without faiss-gpu, ``faiss`` the CPU default.
- ``linear`` / ``sklearn_linear`` (the largest size): ``run_linear`` with the shipped card
  (8 heads, selected on a 10% validation split) against scikit-learn's StandardScaler +
  ``LogisticRegression`` (lbfgs) at the C = 1 / (wd n) with wd = 0.03, the value scikit-learn's
  own validation grid selected at d = 384 in docs/benchmarks.md.

k-NN times are the best of ``--reps`` repetitions in the child; the others are one run. The
figures are ratios measured in one run of this script: read them with the load average it
prints (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DIM, CLASSES, K, SEED = 384, 100, 200, 0
KS = (10, 20, 100, 200)


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def data(n: int, m: int):
    from bench_protocols import make_features, make_labels

    by, qy = make_labels(n, m, CLASSES, SEED)
    bx, qx = make_features([by, qy], DIM, CLASSES, SEED)
    return bx, by, qx, qy


def child(what: str, n: int, m: int, reps: int) -> dict:
    import torch

    bx, by, qx, qy = data(n, m)
    base = peak_mb()
    out: dict = {"what": what, "n": n, "m": m}
    if what == "limit":
        from bench_protocols import gemm_rates

        rt, rn = gemm_rates(DIM, n)
        out.update(torch_gflops=rt / 1e9, numpy_gflops=rn / 1e9)
        out["seconds"] = 2 * n * m * DIM / max(rt, rn)
    elif what in ("torch", "faiss"):
        from ssl_eval.protocols.search.knn import knn_classify

        args = (torch.from_numpy(bx), torch.from_numpy(by), torch.from_numpy(qx))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            scores = knn_classify(*args, KS, 0.07, CLASSES, backend=what)
            best = min(best, time.perf_counter() - t0)
        out["seconds"] = best
        out["top1@k200"] = float((scores[200].argmax(1).numpy() == qy).mean())
    elif what == "sklearn":
        from sklearn.neighbors import KNeighborsClassifier

        t0 = time.perf_counter()
        clf = KNeighborsClassifier(K, metric="cosine", algorithm="brute").fit(bx, by)
        pred = clf.predict(qx)
        out["seconds"] = time.perf_counter() - t0
        out["top1@k200"] = float((pred == qy).mean())
    elif what == "linear":
        from ssl_eval.data.splits import stratified_val_split
        from ssl_eval.protocols.base import ProtocolInputs
        from ssl_eval.protocols.cards import load_card
        from ssl_eval.protocols.linear import run_linear

        tr, va = stratified_val_split(by, 0.1, SEED)
        t0 = time.perf_counter()
        res = run_linear(
            ProtocolInputs(bx, by, qx, qy, tr, va, CLASSES), load_card("linear", []).params
        )
        out["seconds"] = time.perf_counter() - t0
        out["test_top1"] = res.metrics["top1"]
    elif what == "sklearn_linear":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        from ssl_eval.data.splits import stratified_val_split

        tr, _ = stratified_val_split(by, 0.1, SEED)
        t0 = time.perf_counter()
        sc = StandardScaler().fit(bx[tr])
        clf = LogisticRegression(C=1 / (0.03 * len(tr)), max_iter=1000)
        clf.fit(sc.transform(bx[tr]), by[tr])
        out["seconds"] = time.perf_counter() - t0
        out["test_top1"] = float((clf.predict(sc.transform(qx)) == qy).mean())
    out["base_mb"] = round(base, 1)
    out["peak_mb"] = round(peak_mb(), 1)
    out["peak_minus_base_mb"] = round(out["peak_mb"] - base, 1)
    return out


def run_child(what: str, n: int, m: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--n", str(n), "--m", str(m)]
    r = subprocess.run(cmd + ["--reps", str(reps)], capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"child {what} {n}x{m} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(res), flush=True)
    return res


def tables(rows: list[dict]) -> str:
    by = {(r["what"], r["n"]): r for r in rows}
    sizes = sorted({(r["n"], r["m"]) for r in rows if r["what"] == "limit"})
    n0, m0 = sizes[0]
    out = [
        "k-NN (d = 384, k = 200): seconds, ratios to the matmul limit, peak RSS - base (MB)",
        "",
        "| N x M | N x M rel. | limit s | sklearn s | torch s | faiss s | sklearn / limit | "
        "torch / limit | faiss / limit | sklearn / faiss | MB sklearn | MB torch | MB faiss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, m in sizes:
        lim, sk = by[("limit", n)], by[("sklearn", n)]
        t, f = by[("torch", n)], by[("faiss", n)]
        L = lim["seconds"]
        out.append(
            f"| {n:,} x {m:,} | {n * m / (n0 * m0):.0f} | {L:.2f} | {sk['seconds']:.2f} | "
            f"{t['seconds']:.2f} | {f['seconds']:.2f} | {sk['seconds'] / L:.2f} | "
            f"{t['seconds'] / L:.2f} | {f['seconds'] / L:.2f} | {sk['seconds'] / f['seconds']:.2f} | "
            f"{sk['peak_minus_base_mb']:.0f} | {t['peak_minus_base_mb']:.0f} | "
            f"{f['peak_minus_base_mb']:.0f} |"
        )
    lin = [r for r in rows if r["what"] in ("linear", "sklearn_linear")]
    if lin:
        out += [
            "",
            "Linear probe: seconds, test top-1, peak RSS - base (MB)",
            "",
            "| run | N x M | s | test top-1 | MB |",
            "|---|---|---:|---:|---:|",
        ]
        out += [
            f"| {r['what']} | {r['n']:,} x {r['m']:,} | {r['seconds']:.2f} | "
            f"{r['test_top1']:.4f} | {r['peak_minus_base_mb']:.0f} |"
            for r in lin
        ]
    return "\n".join(out)


def machine_line(result: dict) -> str:
    """The CPU and the load average at start and end (the machine is shared), in one line."""
    info = result["machine"]
    cpu = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip() for ln in info["lscpu"]}
    start, end = (
        ", ".join(f"{x:.2f}" for x in info[k]) for k in ("load_average_start", "load_average_end")
    )
    return (
        f"Machine: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPU(s); load average "
        f"(1/5/15 min) {start} at start, {end} at end; {result['total_s']} s; "
        f"`{' '.join(['python benchmarks/bench_knn_speed.py', *result['argv'][1:]])}`"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of each size")
    ap.add_argument("--reps", type=int, default=2, help="k-NN repetitions (best is kept)")
    ap.add_argument("--no-linear", action="store_true", help="k-NN only")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--m", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.n, a.m, a.reps)))
        return 0

    from ssl_eval.core.files import atomic_write_json, atomic_write_text

    scale = 4 if a.quick else 1
    sizes = [(12_500 // scale, 2_500 // scale), (25_000 // scale, 5_000 // scale)]
    sizes.append((50_000 // scale, 10_000 // scale))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:20]
    info = {"lscpu": lscpu, "load_average_start": os.getloadavg()}
    t0 = time.perf_counter()
    rows = []
    for n, m in sizes:
        for what in ("limit", "sklearn", "torch", "faiss"):
            rows.append(run_child(what, n, m, a.reps))
    if not a.no_linear:
        n, m = sizes[-1]
        rows += [run_child(w, n, m, 1) for w in ("linear", "sklearn_linear")]
    info["load_average_end"] = os.getloadavg()
    md = tables(rows)
    print(md)
    stem = "bench_knn_speed" + ("_quick" if a.quick else "")
    a.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "argv": sys.argv, "dim": DIM, "runs": rows}
    result["total_s"] = round(time.perf_counter() - t0)
    atomic_write_json(a.out / f"{stem}.json", result)
    atomic_write_text(a.out / f"{stem}.md", f"# {stem}\n\n{md}\n\n{machine_line(result)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
