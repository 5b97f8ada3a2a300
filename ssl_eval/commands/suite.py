"""``ssl-eval suite``: the embedded main job (train, evaluate, tables, report, reference check)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._args import add_cluster_options, cluster_options

NAME = "suite"
HELP = "run a job suite: train the bundled methods, evaluate them and the baselines, report, check"
ORDER = 5


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "suite",
        nargs="?",
        default=None,
        help="a shipped job suite (default: 'default'; 'quick' with --quick) or a YAML path",
    )
    p.add_argument("--quick", action="store_true", help="the quick suite (about 3 minutes on CPU)")
    p.add_argument("--list", action="store_true", help="list the shipped job suites and exit")
    p.add_argument(
        "--results-dir",
        type=Path,
        help="where this run's records, checkpoints, leaderboard and report go "
        "(default: runs/<suite>; the committed reference lives apart, in results/reference/)",
    )
    p.add_argument(
        "--reference",
        help="baseline file to check this run against (default: the shipped suite's committed "
        "reference, results/reference/<suite>/baseline.json, which travels with the package; "
        "'none' skips the check)",
    )
    p.add_argument(
        "--train-seeds",
        type=int,
        default=1,
        metavar="N",
        help="train every model N times (training seeds seed, seed+1, ...): the leaderboard "
        "shows the mean over runs, and a baseline written from them knows the recipe's "
        "retraining noise (default 1)",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="train under pinned CPU kernels (ssl-eval train --deterministic): the same weights "
        "on any x86-64 CPU with AVX2, about 4x slower training; the models train into other "
        "folders than unpinned runs",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="feature cache (default $SSL_EVAL_CACHE or ~/.cache/ssl-eval)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true", help="re-evaluate units already recorded")
    p.add_argument("--retrain", action="store_true", help="retrain models already trained")
    p.add_argument("--no-report", action="store_true", help="skip the HTML/markdown report")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--junit", type=Path, help="with a reference: the check's JUnit XML (one case per row)"
    )
    p.add_argument("--summary", type=Path, help="with a reference: the check's markdown summary")
    add_cluster_options(p)  # the evaluation stage as jobs; training runs here


def run(a: argparse.Namespace) -> int:
    from ..core.errors import UserError
    from ..orchestrate.suite import load_job_suite, shipped_job_suites
    from ..orchestrate.suite.runner import SuiteOptions, run_suite

    if a.list:
        for name in shipped_job_suites():
            s = load_job_suite(name)
            some = [f"; on {pat} models: {', '.join(c)}" for pat, c in s.arch_protocols.items()]
            some += [f"; on {ds} alone: {', '.join(c)}" for ds, c in s.dataset_protocols.items()]
            print(
                f"{name}: {len(s.models)} trained models, baselines {', '.join(s.baselines)}; "
                f"protocols {', '.join(s.protocols)}{''.join(some)}  - {s.description}"
            )
        return 0
    if a.quick and a.suite not in (None, "quick"):
        raise UserError(f"--quick runs the 'quick' suite; drop it to run {a.suite}")
    suite = load_job_suite(a.suite or ("quick" if a.quick else "default"))
    results = a.results_dir or Path("runs") / suite.name
    out = run_suite(
        suite,
        SuiteOptions(
            results_dir=results,
            cache_dir=a.cache_dir,
            device=a.device,
            force=a.force,
            progress=not a.no_progress,
            report=not a.no_report,
            retrain=a.retrain,
            train_seeds=a.train_seeds,
            deterministic=a.deterministic,
            cluster=cluster_options(a),
        ),
    )
    print((results / "leaderboard.md").read_text())
    times = ", ".join(f"{k} {v:.0f}s" for k, v in out.timings.items() if not k.startswith("train "))
    print(
        f"suite {suite.name} v{suite.version}: {len(out.trained)} model(s) trained, "
        f"{out.units_done} unit(s) evaluated, {out.units_skipped} reused; {times}"
    )
    report = results / "report" / "index.html"
    if report.is_file():
        print(f"report: {report}")
    ref = a.reference
    if ref is None:
        from ..orchestrate.suite.spec import shipped_reference

        found = shipped_reference(suite.name) if a.suite in (None, suite.name) else None
        ref = str(found) if found is not None else "none"
        if ref == "none":
            print(
                f"suite {suite.name} has no committed reference: nothing to check against (--reference FILE)"
            )
    if ref == "none":
        return 0
    print(
        f"did this run reproduce the reference {ref}? (two-sided: a significant change either way is not a reproduction)"
    )
    argv = ["check", "--baseline", ref, "--results-dir", str(results), "--two-sided"]
    for flag, path in (("--junit", a.junit), ("--summary", a.summary)):
        if path is not None:
            argv += [flag, str(path)]
    code = _check(argv)
    print(
        "REPRODUCED: no number the reference holds differs significantly from it, in either "
        "direction (retrained models judged against the reference's training runs; rows it "
        "does not hold are listed NEW: no reference, not judged)"
        if code == 0
        else "NOT REPRODUCED: see the rows above"
        if code == 1
        else "the check could not run (see the error above)"
    )
    return code


def _check(argv: list[str]) -> int:
    """``ssl-eval check argv`` in this process: its exit code, 2 (its error printed on one
    line) where it cannot run."""
    from ..core.errors import UserError, one_line
    from . import check

    parser = argparse.ArgumentParser(prog="ssl-eval check")
    check.add_arguments(parser)
    try:
        return check.run(parser.parse_args(argv[1:]))
    except UserError as e:
        print(f"ssl-eval: error: {one_line(e, limit=None)}", file=sys.stderr)
        return 2
