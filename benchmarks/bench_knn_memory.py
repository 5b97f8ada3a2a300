#!/usr/bin/env python
"""Peak resident memory of the k-NN and linear-probe protocols on ImageNet-size float16 banks.

    python benchmarks/bench_knn_memory.py                  # banks of 128k, 512k and 1,281,167 rows
    python benchmarks/bench_knn_memory.py --quick          # 16k, 32k, 64k rows (smoke run)
    python benchmarks/bench_knn_memory.py --only linear --sizes 131072,524288

Runs of separate invocations (``--only knn``, then ``--only linear``) are merged into one
results file; a (run, N) measured again replaces its row.

A seeded synthetic bank of float16 features (a Gaussian mixture, 1,024 dimensions: 2.6 GB at
1.28M rows) is written in chunks to a temporary folder as a ``.npy`` file, exactly as the
feature cache stores them, and memory-mapped. Each measurement runs in a fresh subprocess, so
its peak RSS (``VmHWM`` of /proc/self/status) is its own:

- ``knn``: ``run_knn`` of the shipped k-NN card (ks 10/20/100/200, k chosen on a validation
  split of the last 1,000 rows, then test) against the first N rows, with ``--queries`` test rows;
  ``knn_torch`` the same on the torch backend (its similarity block and group maxima).
- ``linear``: ``run_linear`` with one epoch and ``min_steps`` 0 (the memory of a pass does not
  depend on the number of passes), 10 classes.
- ``inmemory``: the reference the streaming replaces, at the two smaller sizes only: the bank
  converted whole to float32 (``np.asarray(x, np.float32)``) and normalised, as before.

What it reports per run: the RSS after imports and labels (``base``), the peak (``VmHWM``),
their difference, and the bound the chunk sizes give: the search plan's blocks
(``memory_mb``), the pages of the memmap a FeatureRows may hold before releasing them
(``release_mb``), and the outputs (Q x k similarities and indices, per-sample hits). The figure
that must not grow with N is ``peak - base``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, CLASSES, VAL, SEED = 1024, 10, 1_000, 0
RELEASE_MB = 256  # FeatureRows' default release_mb


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def blas_workspace_mb(queries: int, bank_rows: int, dim: int) -> float:
    """What the BLAS library keeps after torch multiplies one block of the plan's shape: MKL
    packs its operands into buffers of its own (about 30 MB here) and keeps them for later
    calls. Measured in this process as the resident memory the multiplication leaves once its
    operands and output are freed; the peak is then reset (``clear_refs``)."""
    import torch

    before = status_mb("VmRSS")
    a, b = torch.randn(queries, dim), torch.randn(bank_rows, dim)
    out = torch.empty(queries, bank_rows)
    torch.mm(a, b.T, out=out)
    del a, b, out
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return round(status_mb("VmRSS") - before, 1)


def write_bank(path: Path, n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """A (n, dim) float16 .npy written chunk by chunk (bounded memory); returns the labels."""
    means = np.random.default_rng(SEED).normal(size=(CLASSES, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)}
        )
        for s in range(0, n, chunk):
            y = labels[s : s + chunk]
            x = means[y] + 3 * rng.standard_normal((len(y), dim), dtype=np.float32)
            f.write(x.astype(np.float16).tobytes())
    return labels


def child(a) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from ssl_eval.protocols.base import ProtocolInputs
    from ssl_eval.protocols.knn import KnnParams, run_knn
    from ssl_eval.protocols.linear import LinearParams, run_linear
    from ssl_eval.protocols.search.knn import search_plan

    torch.manual_seed(0)
    folder = Path(a.folder)
    bank = np.load(folder / "bank.npy", mmap_mode="r")[: a.n]
    labels = np.load(folder / "labels.npy")[: a.n]
    test = np.load(folder / "test.npy", mmap_mode="r")
    test_y = np.load(folder / "test_labels.npy")
    val = np.arange(a.n - VAL, a.n)  # the last VAL rows: a validation split of fixed size
    train = np.arange(a.n - VAL)
    inp = ProtocolInputs(bank, labels, test, test_y, train, val, CLASSES)
    base = status_mb("VmRSS")
    workspace = 0.0
    if a.child == "knn_torch":  # the torch search's GEMM, at the plan's block shape: in the
        # peak, and in the bound
        plan = search_plan(a.n, max(len(test), VAL), DIM, 225, a.memory_mb, 2)
        workspace = blas_workspace_mb(plan["query_chunk"], plan["bank_chunk"], DIM)
    t0 = time.perf_counter()
    out: dict = {"what": a.child, "n": a.n}
    if a.child in ("knn", "knn_torch"):
        p = KnnParams(memory_mb=a.memory_mb, backend="torch" if a.child == "knn_torch" else "auto")
        res = run_knn(inp, p)
        out["top1"] = res.metrics["top1"]
        out["chunks"] = res.details["chunks"]
        out["backend"] = res.details["backend"]
        q = max(len(test), VAL)  # the larger of the two searches
        outputs = q * max(p.ks) * 12 * 3 + min(q, 8192) * len(p.ks) * CLASSES * 4  # top-k, votes
        plan = search_plan(a.n, q, DIM, max(p.ks), p.memory_mb, 2)
        # the bound: the plan's blocks (memory_mb), the mapped pages (release_mb), the outputs
        # and, for the torch search, the BLAS library's own workspace measured above
        out["bound_mb"] = p.memory_mb + RELEASE_MB + outputs / 2**20 + workspace
        out["blas_workspace_mb"] = workspace
        out["plan"] = plan
    elif a.child == "linear":
        p = LinearParams(epochs=1, min_steps=0)
        res = run_linear(inp, p)
        out["top1"] = res.metrics["top1"]
        out["chunks"] = res.details["chunks"]
        ch = res.details["chunks"]
        H = len(p.lrs) * len(p.weight_decays)
        blocks = max(ch["stats"] * DIM * 12, ch["eval"] * 4 * (DIM + H * CLASSES))
        heads = 4 * DIM * H * CLASSES * 3  # weights, momentum, gradient
        labels_mb = a.n * 8 * 3 / 2**20  # labels, row weights, permutation (N-sized, small)
        out["bound_mb"] = (blocks + heads) / 2**20 + RELEASE_MB + labels_mb
    else:  # the path streaming replaced: a whole float32 copy, normalised
        x = torch.from_numpy(np.asarray(bank, dtype=np.float32))
        x = torch.nn.functional.normalize(x, dim=1)
        out["bound_mb"] = float("nan")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["base_mb"] = round(base, 1)
    out["peak_mb"] = round(status_mb("VmHWM"), 1)
    out["peak_minus_base_mb"] = round(out["peak_mb"] - base, 1)
    out["rss_anon_end_mb"] = round(status_mb("RssAnon"), 1)
    out["rss_file_end_mb"] = round(status_mb("RssFile"), 1)
    out["within_bound"] = bool(out["peak_minus_base_mb"] <= out["bound_mb"])
    out["load_1min_end"] = round(os.getloadavg()[0], 2)  # other jobs on the machine
    return out


def run_child(folder: Path, what: str, n: int, memory_mb: int) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--folder", str(folder), "--n", str(n)]
    cmd += ["--memory-mb", str(memory_mb)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"child {what} n={n} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:20]
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "lscpu": [ln for ln in lscpu if ln.split(":")[0].strip() in LSCPU_KEYS],
        "memory_gib": round(mem, 1),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "load_average": os.getloadavg(),
    }


def machine_line(info: dict) -> str:
    """One line for the docs: the CPU, memory and the load other jobs put on it."""
    cpu = {ln.split(":")[0].strip(): ln.split(":", 1)[1].strip() for ln in info["lscpu"]}
    load = ", ".join(f"{x:.2f}" for x in info["load_average"])
    load_end = ", ".join(f"{x:.2f}" for x in info.get("load_average_end", []))
    return (
        f"{info['started']}: {cpu.get('Model name', '?')}, {cpu.get('CPU(s)', '?')} CPU(s) "
        f"({cpu.get('Thread(s) per core', '?')} thread(s) per core), {info['memory_gib']} GiB, "
        f"torch {info['torch']}, numpy {info['numpy']}; load average (1/5/15 min) {load} at "
        f"start, {load_end} at end; {info.get('total_s', '?')} s; `{' '.join(info['argv'][1:])}`"
    )


# the runs: k-NN with the card's backend (auto: FAISS here), k-NN on the torch backend, the
# linear probe, and the whole-bank float32 copy streaming replaced
WHATS = ("knn", "knn_torch", "linear", "inmemory")

LSCPU_KEYS = {"Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket"}


def table(rows: list[dict]) -> str:
    out = [
        "| run | bank N | backend / chunks | s | load | base MB | peak MB | peak - base MB "
        "| bound MB | within |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ch = r.get("chunks", {})
        desc = (
            f"{r.get('backend', '')} q {ch['test']['query_chunk']} x b {ch['test']['bank_chunk']}"
            if r["what"].startswith("knn")
            else (f"stats {ch['stats']}, eval {ch['eval']}, batch {ch['batch']}" if ch else "-")
        )
        bound = "-" if r["bound_mb"] != r["bound_mb"] else f"{r['bound_mb']:.0f}"
        within = "-" if bound == "-" else ("yes" if r["within_bound"] else "NO")
        out.append(
            f"| {r['what']} | {r['n']:,} | {desc} | {r['seconds']} | {r.get('load_1min_end', '-')} | "
            f"{r['base_mb']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['peak_minus_base_mb']:.0f} | {bound} | {within} |"
        )
    return "\n".join(out)


def merge(path: Path, rows: list[dict], info: dict, queries: int) -> dict:
    """This invocation's runs merged into the file's earlier ones (``--only knn`` then
    ``--only linear`` keep both): a (run, N) measured again replaces the earlier row, the
    others stay with the invocation (machine, load, command) that measured them. Runs of another
    dimension or query count are not merged: refused, so one table never mixes settings."""
    old = json.loads(path.read_text()) if path.exists() else {"runs": [], "invocations": []}
    if old["runs"] and (old.get("dim"), old.get("queries")) != (DIM, queries):
        raise SystemExit(
            f"{path} holds runs with dim {old.get('dim')}, queries {old.get('queries')}: "
            f"move it away or pass --out to another folder"
        )
    new_keys = {(r["what"], r["n"]) for r in rows}
    kept = [r for r in old["runs"] if (r["what"], r["n"]) not in new_keys]
    runs = sorted(kept + rows, key=lambda r: (r["n"], WHATS.index(r["what"])))
    used = {r["invocation"] for r in runs}
    invocations = [i for i in old["invocations"] if i["started"] in used] + [info]
    return {"dim": DIM, "queries": queries, "invocations": invocations, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="banks of 16k, 32k, 64k rows")
    ap.add_argument("--sizes", help="comma-separated bank sizes")
    ap.add_argument("--queries", type=int, default=1000, help="test queries (k-NN and linear)")
    ap.add_argument("--memory-mb", type=int, default=512, help="k-NN memory_mb (the card's)")
    ap.add_argument("--only", choices=WHATS[:-1], help="one run only")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks")
    ap.add_argument("--child", choices=WHATS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0

    from ssl_eval.core.files import atomic_write_json, atomic_write_text

    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else None
    sizes = sizes or ([16_384, 32_768, 65_536] if a.quick else [131_072, 524_288, 1_281_167])
    info = machine()
    info["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(info, indent=1), flush=True)
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_knn_memory-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        labels = write_bank(folder / "bank.npy", max(sizes), DIM, SEED)
        np.save(folder / "labels.npy", labels)
        test_y = write_bank(folder / "test.npy", a.queries, DIM, SEED + 1)  # other rows
        np.save(folder / "test_labels.npy", test_y)
        size_gb = (folder / "bank.npy").stat().st_size / 1e9
        print(
            f"wrote {max(sizes):,} x {DIM} float16 ({size_gb:.2f} GB) in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        whats = [w for w in WHATS[:-1] if a.only in (None, w)]
        for n in sizes:
            for what in whats:
                rows.append(run_child(folder, what, n, a.memory_mb))
                print(json.dumps(rows[-1]), flush=True)
        if a.only in (None, "knn"):  # the reference is the same for every run: measured once
            for n in sorted(sizes)[:2]:
                rows.append(run_child(folder, "inmemory", n, a.memory_mb))
                print(json.dumps(rows[-1]), flush=True)
    info["load_average_end"] = os.getloadavg()
    info["argv"] = sys.argv
    info["total_s"] = round(time.perf_counter() - t_start)
    for r in rows:
        r["invocation"] = info["started"]
    a.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_knn_memory" + ("_quick" if a.quick else "")
    result = merge(a.out / f"{stem}.json", rows, info, a.queries)
    md = table(result["runs"])
    print(md)
    atomic_write_json(a.out / f"{stem}.json", result)
    lines = "\n".join(f"- {machine_line(i)}" for i in result["invocations"])
    atomic_write_text(a.out / f"{stem}.md", f"# {stem}\n\n{md}\n\nMachines:\n\n{lines}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
