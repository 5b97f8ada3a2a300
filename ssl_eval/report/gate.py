"""The regression gate: ``ssl-eval baseline`` writes a baseline from the records, ``ssl-eval
check`` compares the current records with it.

Rows are matched on (backbone, dataset, protocol, seed, metric) and then compared only when
their settings agree (see ``results.make_setting``): a changed column side (card, params, data,
split, feature options) or row side (backbone, weights, preprocessing) is a *changed setting*,
reported and failing unless allowed. Each row is judged by the test that fits what it compares:

* **same weights on both sides** (pixels, a random network, a downloaded checkpoint, or a
  trained model whose weights came out bit-identical): the two fixed models are compared on the
  same test images, by an exact one-sided McNemar test where both sides keep per-image
  correctness (k-NN, linear, fine-tune), else by the normal approximation from the two
  recorded 95% intervals;
* **retrained from the same recipe** (a model trained by ssl-eval's trainer whose only
  difference is its weights: another machine, another training seed): a retrained model is
  another model, so the question is whether its value lies where another training run of the
  recipe is expected, a t prediction test over the baseline's training runs of that recipe
  (``stats.prediction_test``). A baseline row that holds a single training run cannot say how
  far a retrained model may move: the row is *unverifiable* (a warning; ``--strict`` fails it),
  never passed or failed on a guess.

All p-values of the tested rows are corrected together with Holm's method (family-wise error
5%). Two questions can be asked: the regression gate (``ssl-eval check``, one-sided: a
significant drop fails, a significant rise is listed) and reproduction (``--two-sided``, what
``ssl-eval suite`` asks: a significant change either way fails). A number tolerance is an
absolute change allowed per row (0.01 = one percentage point), applied to the means of the runs.
Errors, where lower is better (``records.schema.LOWER_IS_BETTER``: a dense probe's RMSE and
AbsRel), are negated before any test, so a significant rise of RMSE is the regression.

A baseline row keeps every training run of its recipe (``runs``); ``write_baseline`` groups the
records' runs that differ only by their trained weights (one per training seed) into one row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.stats import holm as _holm  # Holm-adjusted p-values (family-wise error across rows)
from ..core.stats import prediction_test, unpack_bits
from ..records.schema import LOWER_IS_BETTER
from .baseline import KEY, row_key, run_of, seed_order

ALPHA = 0.05

# ---------------------------------------------------------------- the check

KINDS = ("regression", "improvement", "unverifiable", "missing", "changed", "new", "ok")
# a current row the baseline has no row (or no run of this setting) for: listed and counted,
# neither passed nor failed (JUnit: skipped); a suite that adds a protocol shows its rows so
# until its reference is regenerated
NOT_JUDGED = "no reference, not judged"


@dataclass
class Finding:
    kind: str  # one of KINDS
    backbone: str
    dataset: str
    protocol: str
    seed: object
    metric: str
    old: float | None = None
    new: float | None = None
    tolerance: str = ""  # the test that judged the row, with its figures
    detail: str = ""
    p_value: float | None = None  # raw (before Holm) p of the direction reported
    test: str = ""  # paired | intervals | exact | prediction | unverifiable | fixed
    retrained: bool = False

    @property
    def name(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.backbone} x {self.dataset} x {self.protocol}{seed} [{self.metric}]"

    def line(self) -> str:
        pct = lambda v: "-" if v is None else _shown(self.metric, v)  # noqa: E731
        head = f"{self.kind.upper():12s} {self.name}"
        if self.old is not None or self.new is not None:
            head += f": {pct(self.old)} -> {pct(self.new)}"
        if self.tolerance:
            head += f" ({self.tolerance})"
        return head + (f"; {self.detail}" if self.detail else "")


@dataclass
class CheckResult:
    findings: list[Finding] = field(default_factory=list)
    allow_missing: bool = False
    allow_changed: bool = False
    two_sided: bool = False
    strict: bool = False

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def failed(self, f: Finding) -> bool:
        return (
            f.kind == "regression"
            or (f.kind == "improvement" and self.two_sided)
            or (f.kind == "unverifiable" and self.strict)
            or (f.kind == "missing" and not self.allow_missing)
            or (f.kind == "changed" and not self.allow_changed)
        )

    @property
    def exit_code(self) -> int:
        return 1 if any(self.failed(f) for f in self.findings) else 0

    @property
    def question(self) -> str:
        return (
            "reproduction, two-sided: a significant change either way fails"
            if self.two_sided
            else "regression gate, one-sided: a significant worsening fails (a drop; a rise of "
            "RMSE or AbsRel), an improvement is listed"
        )

    def verdict(self) -> str:
        n = {k: len(self.of(k)) for k in KINDS}
        judged = [f for f in self.findings if f.kind in ("regression", "improvement", "ok")]
        by_test = {t: sum(f.test == t for f in judged) for t in ("prediction",)}
        state = "FAIL" if self.exit_code else "PASS"
        allowed = lambda k, flag: " (allowed)" if flag and n[k] else ""  # noqa: E731
        return (
            f"{state}: {len(judged)} row(s) compared "
            f"({by_test['prediction']} retrained, judged against the baseline's training runs; "
            f"{len(judged) - by_test['prediction']} with the same weights, on the same test images), "
            f"{n['regression']} regression(s), {n['improvement']} improvement(s), "
            f"{n['unverifiable']} unverifiable{' (fails: --strict)' if self.strict and n['unverifiable'] else ''}, "
            f"{n['missing']} missing{allowed('missing', self.allow_missing)}, "
            f"{n['changed']} changed setting(s){allowed('changed', self.allow_changed)}, "
            f"{n['new']} new (no reference, not judged) [{self.question}]"
        )


def _shown(metric: str, v: float) -> str:
    """A value as the tables show it: percent for fractions, the unit itself for errors."""
    return f"{v:.4f}" if metric in LOWER_IS_BETTER else f"{100 * v:.2f}"


def _oriented(row: dict, metric: str) -> dict:
    """``row`` with a lower-is-better metric negated (value, interval, runs), so that every
    test below reads higher as better and a rise of an error is the drop that fails."""
    if metric not in LOWER_IS_BETTER:
        return row
    out = dict(row, value=-float(row["value"]))
    if row.get("ci95"):
        out["ci95"] = [-row["ci95"][1], -row["ci95"][0]]
    if row.get("runs"):
        out["runs"] = [_oriented(r, metric) for r in row["runs"]]
    return out


def parse_tolerance(text: str) -> float | None:
    """``auto`` -> None; a number (a fraction: 0.01 = one point) -> that number."""
    if text == "auto":
        return None
    try:
        tol = float(text)
    except ValueError:
        raise UserError(
            f"--tolerance is 'auto' or a number (0.01 = one point), not {text!r}"
        ) from None
    if not 0 <= tol < 1:
        raise UserError(f"--tolerance {text}: a fixed tolerance is a fraction in [0, 1)")
    return tol


def _setting_difference(old: dict, new: dict) -> tuple[str, str]:
    """("same" | "retrained" | "changed", what differs)."""
    so, sn = old["setting"], new["setting"]
    if so["hash"] == sn["hash"]:
        return "same", ""
    co, cn = so["summary"]["column"], sn["summary"]["column"]
    ro, rn = so["summary"]["row"], sn["summary"]["row"]
    diffs = sorted(_diff(co, cn, "")) + sorted(_diff(ro, rn, ""))
    only_weights = co == cn and {k: v for k, v in ro.items() if k != "weights"} == {
        k: v for k, v in rn.items() if k != "weights"
    }
    if only_weights and old.get("recipe") and old.get("recipe") == new.get("recipe"):
        return "retrained", "weights differ, same training recipe"
    return "changed", ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


def _diff(a, b, prefix) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {_short(a)} -> {_short(b)}"]


def _short(v) -> str:
    s = json.dumps(v, default=str) if not isinstance(v, str) else v
    return s if len(s) <= 24 else s[:21] + "..."


def _p_drop(old: dict, new: dict) -> tuple[float, str, str]:
    """One-sided p-value that fixed model ``new`` is worse than fixed model ``old``, the test's
    short name and its description."""
    a, b = old.get("per_sample_correct"), new.get("per_sample_correct")
    n_a, n_b = old.get("n_test"), new.get("n_test")
    if a and b and n_a and n_a == n_b:
        ca, cb = unpack_bits(a, n_a), unpack_bits(b, n_b)
        lost, gained = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
        return (
            _binom_tail(lost, lost + gained),
            "paired",
            f"same weights: paired McNemar on {n_a} test images ({lost} lost, {gained} gained)",
        )
    if old.get("ci95") and new.get("ci95"):
        h_old = (old["ci95"][1] - old["ci95"][0]) / 2
        h_new = (new["ci95"][1] - new["ci95"][0]) / 2
        se = math.sqrt(h_old**2 + h_new**2) / 1.96
        if se == 0:
            return (
                (0.0 if new["value"] < old["value"] else 1.0),
                "intervals",
                "intervals of width 0",
            )
        z = (old["value"] - new["value"]) / se
        return 0.5 * math.erfc(z / math.sqrt(2)), "intervals", "same weights: the two 95% intervals"
    # nothing to test with: compared exactly (any drop is significant), never waved through
    how = "no interval or per-image results: compared exactly"
    return (0.0 if new["value"] < old["value"] else 1.0), "exact", how


def _test_se(olds: list[dict], news: list[dict]) -> float:
    """The test-image sampling noise of one run: the new runs' recorded 95% intervals (else the
    baseline's), else the binomial standard error of the value on its test images."""
    for rows in (news, olds):
        halves = [(r["ci95"][1] - r["ci95"][0]) / 2 for r in rows if r.get("ci95")]
        if halves:
            return float(np.mean(halves)) / 1.96
    for r in (*news, *olds):
        if r.get("n_test"):
            v = float(r["value"])
            return math.sqrt(max(v * (1 - v), 0.0) / int(r["n_test"]))
    return 0.0


def _p_runs(old: dict, news: list[dict]) -> tuple[float, str, str]:
    """One-sided p-value that the retrained runs ``news`` are lower than the baseline's runs
    of their recipe predict (``stats.prediction_test``)."""
    runs = old["runs"]
    diff, se, df, p = prediction_test(
        [r["value"] for r in runs], [r["value"] for r in news], _test_se(runs, news)
    )
    sd = float(np.std([r["value"] for r in runs], ddof=1))
    dof = "inf" if math.isinf(df) else f"{df:.1f}"
    m = "" if len(news) == 1 else f" (mean of {len(news)} new runs)"
    return (
        p,
        "prediction",
        f"retrained: prediction test over {len(runs)} training runs (sd {100 * sd:.2f} points, "
        f"with the test images: se {100 * se:.2f}, df {dof}){m}",
    )


def _binom_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): the exact one-sided McNemar p-value."""
    if n == 0:
        return 1.0
    from math import comb

    return min(1.0, sum(comb(n, i) for i in range(k, n + 1)) / 2**n)


def _newest_per_weights(rows: list[dict]) -> list[dict]:
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: str(r.get("time"))):
        out[r["setting"]["hash"]] = r
    return sorted(out.values(), key=lambda r: (seed_order(r), str(r.get("time"))))


@dataclass
class _Pair:
    old: dict  # the baseline row
    ref: dict  # what ``news`` is compared with: one run (same weights) or the row (runs)
    news: list[dict]
    retrained: bool


def _match(baseline: list[dict], current: list[dict], res: CheckResult):
    """Pair each baseline row with its current rows: the same weights as one of its runs
    (compared as fixed models), else the retrained runs of its recipe, else a changed setting
    or a missing row. Returns the pairs and the ids of the current rows used."""
    by_key: dict[tuple, list[dict]] = {}
    for r in current:
        by_key.setdefault(row_key(r), []).append(r)
    used: set[int] = set()
    pairs: list[_Pair] = []
    for old in baseline:
        k = row_key(old)
        cands = by_key.get(k, [])
        f = dict(zip(KEY, k, strict=True))
        if not cands:
            res.findings.append(
                Finding("missing", old=old["value"], detail="not in the current records", **f)
            )
            continue
        runs = {r["setting_hash"]: r for r in old["runs"]}
        same = [c for c in cands if c["setting"]["hash"] in runs]
        siblings = [c for c in cands if _setting_difference(old, c)[0] == "retrained"]
        if same:
            new = sorted(same, key=lambda c: str(c.get("time")))[-1]
            used.update(id(c) for c in (*same, *siblings))
            pairs.append(_Pair(old, runs[new["setting"]["hash"]], [new], False))
        elif siblings:
            used.update(id(c) for c in siblings)
            pairs.append(_Pair(old, old, _newest_per_weights(siblings), True))
        else:
            new = sorted(cands, key=lambda c: str(c.get("time")))[-1]
            used.add(id(new))
            what = _setting_difference(old, new)[1]
            res.findings.append(
                Finding("changed", old=old["value"], new=new["value"], detail=what, **f)
            )
    return pairs, used


def check(
    baseline: list[dict],
    current: list[dict],
    tolerance: float | None = None,
    allow_missing: bool = False,
    allow_changed: bool = False,
    two_sided: bool = False,
    strict: bool = False,
) -> CheckResult:
    """Compare ``current`` rows (``frame_rows``) with ``baseline`` rows (``read_baseline``).

    Under ``tolerance=None`` (auto) each compared row gets a one-sided p-value per direction
    from its test (module docstring); the regression gate fails a drop whose p, Holm-adjusted
    over the tested rows, is below 0.05 and lists a rise by the same rule the other way; with
    ``two_sided`` the p-value is two-sided and a significant change either way fails. A
    number: a change of the mean larger than it is a regression (improvement)."""
    res = CheckResult(
        allow_missing=allow_missing,
        allow_changed=allow_changed,
        two_sided=two_sided,
        strict=strict,
    )
    baseline = [r if "runs" in r else {**r, "runs": [run_of(r)]} for r in baseline]
    # errors (RMSE, AbsRel) negated: the tests below read higher as better throughout
    baseline = [_oriented(r, r["metric"]) for r in baseline]
    current = [_oriented(r, r["metric"]) for r in current]
    pairs, used = _match(baseline, current, res)
    tested: list[tuple[_Pair, float, float, str, str]] = []  # pair, p down, p up, test, how
    for pr in pairs:
        if pr.retrained and len(pr.old["runs"]) < 2:
            continue
        if pr.retrained:
            p, test, how = _p_runs(pr.old, pr.news)
            tested.append((pr, p, 1.0 - p, test, how))
        else:
            p, test, how = _p_drop(pr.ref, pr.news[0])
            tested.append((pr, p, _p_drop(pr.news[0], pr.ref)[0], test, how))
    if two_sided:
        both = _holm([min(1.0, 2 * min(d, u)) for _, d, u, _, _ in tested])
        adj_down = adj_up = both
    else:
        adj_down = _holm([d for _, d, _, _, _ in tested])
        adj_up = _holm([u for _, _, u, _, _ in tested])
    judged = {id(t[0]): (i, t) for i, t in enumerate(tested)}
    for pr in pairs:
        f = dict(zip(KEY, row_key(pr.old), strict=True))
        old_v = pr.ref["value"] if not pr.retrained else pr.old["value"]
        new_v = float(np.mean([r["value"] for r in pr.news]))
        drop = old_v - new_v  # oriented: > 0 is worse for every metric
        detail = _pair_detail(pr)
        if tolerance is not None:
            worse, better = drop > tolerance, -drop > tolerance
            test, p = "fixed", None
            tol = f"fixed tolerance {100 * tolerance:.2f} points"
        elif id(pr) not in judged:
            res.findings.append(
                Finding(
                    "unverifiable",
                    old=old_v,
                    new=new_v,
                    tolerance="unverifiable: one training run",
                    detail=detail + "; the baseline holds one training run of this recipe, "
                    "so it cannot say how far a retrained model may move: write the baseline "
                    "from several training seeds (ssl-eval suite --train-seeds N)",
                    test="unverifiable",
                    retrained=True,
                    **f,
                )
            )
            continue
        else:
            i, (_, p_down, p_up, test, how) = judged[id(pr)]
            worse = drop > 0 and adj_down[i] < ALPHA
            better = drop < 0 and adj_up[i] < ALPHA
            shown = adj_up[i] if drop < 0 else adj_down[i]
            p = p_up if drop < 0 else p_down
            tol = f"{how}, Holm-adjusted p={shown:.3g}"
        kind = "regression" if worse else "improvement" if better else "ok"
        res.findings.append(
            Finding(
                kind,
                old=old_v,
                new=new_v,
                tolerance=tol,
                detail=detail,
                p_value=p,
                test=test,
                retrained=pr.retrained,
                **f,
            )
        )
    _new_rows(baseline, current, used, res)
    for f in res.findings:  # errors shown as recorded, not as the tests read them
        if f.metric in LOWER_IS_BETTER:
            f.old = None if f.old is None else -f.old
            f.new = None if f.new is None else -f.new
    return res


def _pair_detail(pr: _Pair) -> str:
    if not pr.retrained:
        seed = pr.ref.get("train_seed")
        return "" if seed is None else f"training seed {seed}, identical weights"
    seeds = [r.get("train_seed") for r in pr.news]
    ref = [r.get("train_seed") for r in pr.old["runs"]]
    return f"retrained from the same recipe (training seed {_seeds(seeds)}; baseline seeds {_seeds(ref)})"


def _seeds(seeds: list) -> str:
    return ",".join("?" if s is None else str(s) for s in seeds)


def _new_rows(baseline: list[dict], current: list[dict], used: set[int], res: CheckResult):
    keys = {row_key(old) for old in baseline}
    known = {(row_key(old), r["setting_hash"]) for old in baseline for r in old["runs"]}
    for new in current:
        k = row_key(new)
        if id(new) in used or (k, new["setting"]["hash"]) in known:
            continue
        what = "a setting not in the baseline" if k in keys else "not in the baseline"
        res.findings.append(
            Finding(
                "new",
                new=new["value"],
                tolerance=NOT_JUDGED,
                detail=what,
                **dict(zip(KEY, k, strict=True)),
            )
        )


# ---------------------------------------------------------------- outputs


def summary_markdown(res: CheckResult, baseline: Path) -> str:
    def esc(s) -> str:
        return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = [f"## ssl-eval check against `{esc(baseline)}`", "", f"**{res.verdict()}**", ""]
    ok = res.of("ok")
    if ok:
        tests = ", ".join(
            f"{sum(f.test == t for f in ok)} by {t}" for t in sorted({f.test for f in ok})
        )
        lines += [f"{len(ok)} row(s) within what their test allows ({tests}).", ""]
    shown = [f for f in res.findings if f.kind != "ok"]
    if shown:
        lines += [
            "| result | backbone | dataset | protocol | metric | baseline | current | how |",
            "|---|---|---|---|---|---:|---:|---|",
        ]
        for f in shown:
            pct = lambda v, m=f.metric: "" if v is None else _shown(m, v)  # noqa: E731
            how = f.tolerance + (f"; {f.detail}" if f.detail else "")
            lines.append(
                f"| {f.kind}{' (fails)' if res.failed(f) else ''} | {esc(f.backbone)} | {esc(f.dataset)} | "
                f"{esc(f.protocol)} | {esc(f.metric)} | {pct(f.old)} | {pct(f.new)} | {esc(how)} |"
            )
    return "\n".join(lines) + "\n"


def junit_xml(res: CheckResult) -> str:
    from xml.sax.saxutils import escape, quoteattr

    cases = res.findings
    failures = sum(res.failed(f) for f in cases)
    skipped = sum(f.kind == "new" for f in cases)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuites name="ssl-eval check" tests="{len(cases)}" failures="{failures}" skipped="{skipped}">',
        f'<testsuite name="ssl-eval check" tests="{len(cases)}" failures="{failures}" errors="0" skipped="{skipped}">',
    ]
    for f in cases:
        attrs = f"classname={quoteattr(f'{f.dataset}.{f.protocol}')} name={quoteattr(f'{f.backbone} {f.metric}' + ('' if f.seed is None else f' seed {f.seed}'))}"
        if f.kind == "new":  # nothing to judge it against: skipped, never a pass
            out.append(
                f"<testcase {attrs}><skipped message={quoteattr(NOT_JUDGED)}>{escape(f.line())}</skipped></testcase>"
            )
        elif res.failed(f):
            out.append(
                f"<testcase {attrs}><failure message={quoteattr(f.kind)}>{escape(f.line())}</failure></testcase>"
            )
        else:
            out.append(f"<testcase {attrs}><system-out>{escape(f.line())}</system-out></testcase>")
    out += ["</testsuite>", "</testsuites>"]
    return "\n".join(out) + "\n"
