"""``ssl-eval check``: the regression gate (exit 0 nothing regressed, 1 regressions, 2 usage);
``--two-sided`` asks whether the records reproduce the baseline (a change either way fails)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._args import add_results_dir

NAME = "check"
HELP = "compare the records with a baseline: exit 1 on a regression, a missing row or a changed setting"
ORDER = 45


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baseline", type=Path, required=True, help="a file written by ssl-eval baseline"
    )
    p.add_argument(
        "--tolerance",
        default="auto",
        help="'auto' (paired test on the same test images, else the recorded intervals; "
        "Holm-corrected) or an absolute drop allowed per row (0.01 = one point)",
    )
    p.add_argument(
        "--allow-missing", action="store_true", help="baseline rows absent now do not fail"
    )
    p.add_argument(
        "--allow-changed-setting",
        action="store_true",
        help="rows whose setting changed do not fail",
    )
    p.add_argument(
        "--two-sided",
        action="store_true",
        help="ask whether the records reproduce the baseline: a significant change in either "
        "direction fails (default: the one-sided regression gate, improvements only listed)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail retrained rows the baseline cannot judge (it holds one training run of "
        "their recipe); by default they are reported as unverifiable",
    )
    p.add_argument(
        "--summary", type=Path, help="write a markdown summary (for a pull-request comment)"
    )
    p.add_argument("--junit", type=Path, help="write JUnit XML (one test case per row)")
    p.add_argument("--quiet", action="store_true", help="print only failing rows and the verdict")
    add_results_dir(p)


def run(a: argparse.Namespace) -> int:
    from ..core.files import atomic_write_text
    from ..report.baseline import frame_rows, read_baseline
    from ..report.gate import check, junit_xml, parse_tolerance, summary_markdown

    tol = parse_tolerance(a.tolerance)
    base = read_baseline(a.baseline)
    res = check(
        base,
        frame_rows(a.results_dir),
        tol,
        a.allow_missing,
        a.allow_changed_setting,
        two_sided=a.two_sided,
        strict=a.strict,
    )
    order = {"regression": 0, "missing": 1, "changed": 2, "improvement": 3}
    order |= {"unverifiable": 4, "new": 5, "ok": 6}
    for f in sorted((f for f in res.findings if f.kind in order), key=lambda f: order[f.kind]):
        if not a.quiet or res.failed(f):
            print(f.line())
    print(res.verdict())
    md = summary_markdown(res, a.baseline)
    if a.summary:
        atomic_write_text(a.summary, md)
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        with open(step, "a", encoding="utf-8") as fh:
            fh.write(md)
    if a.junit:
        atomic_write_text(a.junit, junit_xml(res))
    return res.exit_code
