"""How often does the verdict cry wolf, and does it still catch a real regression?

Usage: python benchmarks/bench_verdict.py [--reference results/reference/quick] [--suite quick]

1. False alarms on reruns: the reference holds N training runs (seeds) of every trained model.
   Each run in turn plays "another machine": a baseline is written from the other N - 1 runs
   (``gate.group_runs``) and the held-out run is checked against it, as the suite's verdict
   (two-sided) and as the regression gate (one-sided). A check that fails is a false alarm:
   the held-out run is the same recipe trained by the same code.
2. Power on an injected regression: the suite is trained once more, on a fresh results folder,
   by a trainer with a real bug (the second view of every two-view method is the first view
   itself, and the supervised loss sees each image with its neighbour's label), every recipe
   and setting unchanged; the run is checked against the whole reference. Power is the share
   of its trained rows called REGRESSION, and whether the check fails at all.

Writes results/benchmarks/bench_verdict.json and .md (generated: do not edit by hand).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssl_eval.report.baseline import frame_rows, group_runs  # noqa: E402
from ssl_eval.report.gate import check  # noqa: E402


def leave_one_out(reference: Path) -> dict:
    rows = frame_rows(reference)
    seeds = sorted({r["train_seed"] for r in rows if r.get("train_seed") is not None})
    out = {"seeds": seeds, "checks": []}
    for s in seeds:
        held = [r for r in rows if r.get("train_seed") == s or r.get("recipe") is None]
        rest = [r for r in rows if r.get("train_seed") != s]
        base = group_runs(rest)
        for two_sided in (True, False):
            res = check(base, held, two_sided=two_sided)
            trained = [f for f in res.findings if f.retrained]
            out["checks"].append(
                {
                    "held_out_seed": s,
                    "two_sided": two_sided,
                    "failed": bool(res.exit_code),
                    "rows": len(res.findings),
                    "trained_rows": len(trained),
                    "flagged": [f.line() for f in res.findings if res.failed(f)],
                    "min_raw_p_trained": min(
                        (f.p_value for f in trained if f.p_value is not None), default=None
                    ),
                }
            )
    return out


def _inject_bug():
    """The trainer's regression: identical views for two-view methods, misaligned labels."""
    from ssl_eval.train import augment
    from ssl_eval.train.methods import supervised

    real_views = augment.make_views

    def same_views(*a, **k):
        views = real_views(*a, **k)
        return [views[0]] * len(views) if len(views) >= 2 else views

    augment.make_views = same_views
    import ssl_eval.train.loop as loop

    if hasattr(loop, "make_views"):
        loop.make_views = same_views
    real_fwd = supervised.Supervised.forward

    def misaligned(self, views, progress, labels=None):
        return real_fwd(self, views, progress, labels=labels.roll(1))

    supervised.Supervised.forward = misaligned


def power(reference: Path, suite: str, work: Path) -> dict:
    """The suite's own training seed, as a user's CI run would train it."""
    from ssl_eval.cli import main

    _inject_bug()
    t0 = time.perf_counter()
    code = main(
        [
            "suite",
            suite,
            "--results-dir",
            str(work),
            "--no-progress",
            "--no-report",
            "--reference",
            "none",
        ]
    )
    if code != 0:
        raise SystemExit(f"the regressed suite run failed ({code})")
    base = group_runs(frame_rows(reference))
    res = check(base, frame_rows(work))
    trained = [f for f in res.findings if f.retrained]
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "check_failed": bool(res.exit_code),
        "trained_rows": len(trained),
        "regressions": sum(f.kind == "regression" for f in trained),
        "rows": [f.line() for f in trained],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", type=Path, default=ROOT / "results/reference/quick")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-verdict"))
    ap.add_argument("--skip-power", action="store_true")
    a = ap.parse_args()
    loo = leave_one_out(a.reference)
    doc = {
        "reference": str(
            a.reference.relative_to(ROOT) if a.reference.is_absolute() else a.reference
        ),
        "machine": platform.machine(),
        "leave_one_out": loo,
    }
    if not a.skip_power:
        doc["power"] = power(a.reference, a.suite, a.work)
    from ssl_eval.core.provenance import machine_info

    doc["machine"] = machine_info()
    doc["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = ROOT / "results/benchmarks/bench_verdict.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    md = [
        "# bench_verdict (generated by `python benchmarks/bench_verdict.py`; do not edit)",
        "",
        f"Reference `{doc['reference']}`, training seeds {loo['seeds']}; machine {doc['machine']}.",
        "",
        "| held-out seed | question | trained rows | failed | smallest raw p (trained) |",
        "|---:|---|---:|---|---:|",
    ]
    for c in loo["checks"]:
        p = c["min_raw_p_trained"]
        md.append(
            f"| {c['held_out_seed']} | {'two-sided' if c['two_sided'] else 'one-sided'} | "
            f"{c['trained_rows']} | {'FAIL' if c['failed'] else 'pass'} | "
            f"{'' if p is None else f'{p:.3g}'} |"
        )
    n_fail = sum(c["failed"] for c in loo["checks"])
    md += ["", f"False alarms: {n_fail} of {len(loo['checks'])} checks."]
    if "power" in doc:
        pw = doc["power"]
        md += [
            "",
            f"Injected regression (the suite's training seed): {pw['regressions']} of {pw['trained_rows']} "
            f"trained rows REGRESSION; the check {'FAILS' if pw['check_failed'] else 'passes'}.",
            "",
            *[f"- {r}" for r in pw["rows"]],
        ]
    (out.with_suffix(".md")).write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
