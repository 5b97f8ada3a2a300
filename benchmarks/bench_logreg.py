"""Logistic regression over DINOv3's C grid: ssl-eval's warm-started, preconditioned L-BFGS
path (ssl_eval/protocols/logreg.py, _lbfgs.py) against the official scripts' loop, scikit-learn's
LogisticRegression(lbfgs, tol=1e-12, max_iter=1000, float64) fitted cold at each C, timed in
the same run on the same features.

Features: a synthetic Gaussian mixture, N x D float64, K classes (class means at distance
``--sep`` in random directions, unit noise), split 90/10 into train and validation as the
DINOv2 script does. Both sides fit the same C values on the train rows; the report gives their
selected C (best validation top-1, smallest C on ties), that C's validation top-1, the
relative difference of its coefficients, and the time ratio. When the scikit-learn loop over
the full grid does not fit the time at hand, ``--every k`` times both sides over every k-th C
of the grid (the warm path then takes k times longer strides, which costs it iterations).

    python benchmarks/bench_logreg.py                  # 50,000 x 384, 10 classes
    python benchmarks/bench_logreg.py --n 5000 --d 64  # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_eval.core.provenance import cpu_model  # noqa: E402
from ssl_eval.protocols.logreg import LogregParams, fit_path  # noqa: E402


def mixture(n: int, d: int, k: int, sep: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d))
    means *= sep / np.sqrt(2) / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, k, n)
    x = means[y] + rng.standard_normal((n, d))
    return x, y


def sklearn_loop(x, y, xv, yv, cs):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            m = LogisticRegression(C=c, tol=1e-12, max_iter=1000).fit(x, y)
            out.append((m.coef_.T.copy(), m.intercept_.copy(), int(m.n_iter_[0]), m.score(xv, yv)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--sep", type=float, default=3.0)
    ap.add_argument("--every", type=int, default=1, help="time every k-th C of the grid")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the ssl-eval path")
    ap.add_argument("--sk-repeats", type=int, default=1, help="repeats of the sklearn loop")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads of torch and of sklearn's BLAS (0: defaults)",
    )
    ap.add_argument("--out", default=str(ROOT / "results/benchmarks/bench_logreg.md"))
    a = ap.parse_args(argv)
    limits = None
    if a.threads:  # the same number of threads for both sides
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(a.threads)
        limits = threadpool_limits(a.threads)
    x, y = mixture(a.n, a.d, a.k, a.sep)
    nv = a.n // 10
    xt, yt, xv, yv = x[nv:], y[nv:], x[:nv], y[:nv]
    cs = LogregParams().grid()[:: a.every]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    X = torch.from_numpy(xt).to(dev, torch.float64)
    Y = torch.from_numpy(yt).to(dev)
    XV, YV = torch.from_numpy(xv).to(dev, torch.float64), torch.from_numpy(yv).to(dev)
    p = LogregParams()

    t_torch, c_torch, fits = [], [], None
    for _ in range(a.repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fits = fit_path(X, Y, a.k, cs, p)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_torch.append(time.perf_counter() - t)
        c_torch.append(time.process_time() - c)
        print(f"ssl-eval warm path: {t_torch[-1]:.2f} s", flush=True)
    acc_t = [float((f.logits(XV).argmax(1) == YV).double().mean()) for f in fits]

    t_sk, c_sk, sk = [], [], None
    for _ in range(a.sk_repeats):
        t, c = time.perf_counter(), time.process_time()
        sk = sklearn_loop(xt, yt, xv, yv, cs)
        t_sk.append(time.perf_counter() - t)
        c_sk.append(time.process_time() - c)
        print(f"sklearn cold loop: {t_sk[-1]:.2f} s", flush=True)
    acc_s = [r[3] for r in sk]

    bt, bs = int(np.argmax(acc_t)), int(np.argmax(acc_s))
    W, Ws = fits[bt].weight.cpu().numpy(), sk[bt][0]
    rel = float(np.linalg.norm(W - Ws) / np.linalg.norm(Ws))
    mt, ms = statistics.median(t_torch), statistics.median(t_sk)
    ratio = ms / mt
    cpu_ratio = statistics.median(c_sk) / statistics.median(c_torch)
    load = os.getloadavg()
    threads = torch.get_num_threads()
    who = "torch, numpy's and sklearn's BLAS" if a.threads else "torch"
    lines = [
        "# bench_logreg: ssl-eval's warm-started L-BFGS path vs scikit-learn's cold loop",
        "",
        f"Generated by `python benchmarks/bench_logreg.py {' '.join(argv or sys.argv[1:])}`.".replace(
            " `.", "`."
        ),
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, threads {threads} ({who}), "
        f"device {dev}{' (' + torch.cuda.get_device_name() + ')' if dev.type == 'cuda' else ''}",
        f"- features: Gaussian mixture, {len(xt):,} train + {nv:,} validation rows x {a.d}, "
        f"{a.k} classes, class means {a.sep} apart, float64",
        f"- grid: {len(cs)} C values, every {a.every}-th of DINOv3's 10**linspace(-6, 5, 45)"
        + (
            " (the full grid)"
            if a.every == 1
            else " (the sklearn loop over all 45 is too slow here)"
        ),
        f"- load average at the end (1, 5, 15 min): {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} "
        "(a shared machine: wall times carry other jobs' share; CPU times of this process do not)",
        f"- ssl-eval: fit_path (preconditioned L-BFGS, warm start, tol={p.tol:g}, "
        f"max_iter={p.max_iter}), median of {a.repeats}: {mt:.2f} s wall "
        f"({', '.join(f'{t:.2f}' for t in t_torch)}), CPU {statistics.median(c_torch):.2f} s",
        f"- sklearn {__import__('sklearn').__version__}: LogisticRegression(lbfgs, tol=1e-12, "
        f"max_iter=1000) cold at each C, median of {a.sk_repeats}: {ms:.2f} s wall "
        f"({', '.join(f'{t:.2f}' for t in t_sk)}), CPU {statistics.median(c_sk):.2f} s",
        f"- **ratio sklearn / ssl-eval: {ratio:.1f}x wall, {cpu_ratio:.1f}x CPU time**",
        f"- selected C: ssl-eval {cs[bt]:.4g} (val top-1 {acc_t[bt]:.4f}), sklearn {cs[bs]:.4g} "
        f"(val top-1 {acc_s[bs]:.4f}); coefficients at ssl-eval's C: relative difference {rel:.1e}",
        f"- iterations per C, ssl-eval: {[f.iterations for f in fits]} "
        f"(total {sum(f.iterations for f in fits)}, loss evaluations "
        f"{sum(f.evaluations for f in fits)})",
        f"- iterations per C, sklearn: {[r[2] for r in sk]} (total {sum(r[2] for r in sk)})",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    if limits is not None:
        limits.unregister()
    return 0


if __name__ == "__main__":
    sys.exit(main())
