"""The regression gate: ``ssl-eval baseline`` writes a baseline from the records, ``ssl-eval
check`` compares the current records with it.

Rows are matched on (backbone, dataset, protocol, seed, metric) and then compared only when
their settings agree (see ``results.make_setting``): a changed column side (card, params, data,
split, feature options) or row side (backbone, weights, preprocessing) is a *changed setting*,
reported and failing unless allowed. One exception, by design: a model trained by ssl-eval's
own trainer has different weights on every machine (floating point), so a row whose only
difference is the weights' sha256, with the same training recipe on both sides, is
*retrained from the same recipe* and compared on its value.

Tolerance ``auto``: where both sides keep per-image correctness (k-NN, linear, fine-tune), an
exact one-sided McNemar test on the same test images; elsewhere the normal approximation from
the two recorded 95% intervals. The p-values of all compared rows are corrected together with
Holm's method (family-wise error 5%), so a gate over many rows does not fail by chance. A
number tolerance is an absolute drop (0.01 = one percentage point) allowed per row.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .fsutil import atomic_write_text
from .stats import unpack_bits

BASELINE_FORMAT = "ssl-eval-baseline"
BASELINE_VERSION = 1
KEY = ("backbone", "dataset", "protocol", "seed", "metric")
ALPHA = 0.05


# ---------------------------------------------------------------- baseline rows


def frame_rows(results_dir: Path, metrics: tuple[str, ...] = ("top1",)) -> list[dict]:
    """One row per (unit run, metric) of the records, the newest run of each key and setting."""
    from .frame import load_frame

    frame = load_frame(results_dir)
    if frame.empty:
        return []
    frame = frame.sort_values("time", kind="stable")
    rows: dict[tuple, dict] = {}
    for _, r in frame.iterrows():
        summary = json.loads(r["setting.summary"])
        for m in metrics:
            if m not in r or _missing(r[m]):
                continue
            row = {
                "backbone": r["backbone"],
                "dataset": r["dataset"],
                "protocol": r["protocol"],
                "seed": None if _missing(r.get("seed")) else int(r["seed"]),
                "metric": m,
                "value": float(r[m]),
                "ci95": _pair(r, m),
                "setting": {
                    "hash": r["setting.hash"],
                    "row": r["setting.row_hash"],
                    "column": r["setting.column_hash"],
                    "summary": summary,
                },
                "recipe": _get(r, "load_report.training.recipe"),
                "per_sample_correct": _get(r, f"{m}.per_sample_correct"),
                "n_test": _int(_get(r, f"{m}.n_test")),
                "time": r["time"],
            }
            rows[(*_key(row), row["setting"]["hash"])] = row  # newest wins
    return list(rows.values())


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _get(r, col):
    v = r.get(col)
    return None if _missing(v) else v


def _int(v):
    return None if v is None else int(v)


def _pair(r, m):
    lo, hi = _get(r, f"{m}.lo"), _get(r, f"{m}.hi")
    return None if lo is None or hi is None else [float(lo), float(hi)]


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def write_baseline(results_dir: Path, out: Path, update: bool = False) -> int:
    """Write the baseline of ``results_dir`` to ``out``; refuses to replace a file unless
    ``update``. Returns the number of rows."""
    out = Path(out)
    if out.exists() and not update:
        raise UserError(f"{out} exists; add --update to replace it with the current records")
    rows = frame_rows(Path(results_dir))
    if not rows:
        raise UserError(f"no records in {Path(results_dir) / 'records'}: nothing to write")
    doc = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": str(results_dir),
        "rows": sorted(rows, key=lambda r: tuple(str(x) for x in _key(r))),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return len(rows)


def read_baseline(path: Path) -> list[dict]:
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise UserError(
            f"baseline {path} does not exist; write one with `ssl-eval baseline`"
        ) from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(
            f"baseline {path} is not a readable JSON baseline ({e.__class__.__name__}); rewrite it with `ssl-eval baseline --update`"
        ) from e
    if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT:
        raise UserError(f"{path} is not an ssl-eval baseline (no format {BASELINE_FORMAT!r})")
    if doc.get("version") != BASELINE_VERSION:
        raise UserError(
            f"baseline {path} has version {doc.get('version')!r}; this ssl-eval reads {BASELINE_VERSION}"
        )
    rows = doc.get("rows")
    need = {*KEY, "value", "setting"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and need <= set(r) for r in rows):
        raise UserError(
            f"baseline {path}: every row needs {sorted(need)}; rewrite it with `ssl-eval baseline --update`"
        )
    return rows


# ---------------------------------------------------------------- the check


@dataclass
class Finding:
    kind: str  # regression, improvement, missing, changed, new, retrained, ok
    backbone: str
    dataset: str
    protocol: str
    seed: object
    metric: str
    old: float | None = None
    new: float | None = None
    tolerance: str = ""
    detail: str = ""
    p_value: float | None = None

    @property
    def name(self) -> str:
        seed = "" if self.seed is None else f" seed {self.seed}"
        return f"{self.backbone} x {self.dataset} x {self.protocol}{seed} [{self.metric}]"

    def line(self) -> str:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
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

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def failed(self, f: Finding) -> bool:
        return (
            f.kind == "regression"
            or (f.kind == "missing" and not self.allow_missing)
            or (f.kind == "changed" and not self.allow_changed)
        )

    @property
    def exit_code(self) -> int:
        return 1 if any(self.failed(f) for f in self.findings) else 0

    def verdict(self) -> str:
        n = {
            k: len(self.of(k))
            for k in ("regression", "improvement", "missing", "changed", "new", "retrained", "ok")
        }
        compared = n["regression"] + n["improvement"] + n["ok"]
        state = "FAIL" if self.exit_code else "PASS"
        return (
            f"{state}: {compared} row(s) compared ({n['retrained']} retrained from the same recipe), "
            f"{n['regression']} regression(s), {n['improvement']} improvement(s), "
            f"{n['missing']} missing{' (allowed)' if self.allow_missing and n['missing'] else ''}, "
            f"{n['changed']} changed setting(s){' (allowed)' if self.allow_changed and n['changed'] else ''}, "
            f"{n['new']} new"
        )


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


def _p_drop(old: dict, new: dict) -> tuple[float | None, str]:
    """One-sided p-value that ``new`` is worse than ``old``, and the method named."""
    a, b = old.get("per_sample_correct"), new.get("per_sample_correct")
    n_a, n_b = old.get("n_test"), new.get("n_test")
    if a and b and n_a and n_a == n_b:
        ca, cb = unpack_bits(a, n_a), unpack_bits(b, n_b)
        lost, gained = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
        return _binom_tail(
            lost, lost + gained
        ), f"paired McNemar on {n_a} test images ({lost} lost, {gained} gained)"
    if old.get("ci95") and new.get("ci95"):
        h_old = (old["ci95"][1] - old["ci95"][0]) / 2
        h_new = (new["ci95"][1] - new["ci95"][0]) / 2
        se = math.sqrt(h_old**2 + h_new**2) / 1.96
        if se == 0:
            return (0.0 if new["value"] < old["value"] else 1.0), "intervals of width 0"
        z = (old["value"] - new["value"]) / se
        return 0.5 * math.erfc(z / math.sqrt(2)), "from the two 95% intervals"
    # nothing to test with: compared exactly (any drop is significant), never waved through
    if new["value"] < old["value"]:
        return 0.0, "no interval or per-image results: compared exactly"
    return 1.0, "no interval or per-image results: compared exactly"


def _binom_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): the exact one-sided McNemar p-value."""
    if n == 0:
        return 1.0
    from math import comb

    return min(1.0, sum(comb(n, i) for i in range(k, n + 1)) / 2**n)


def _holm(pvals: list[float]) -> list[float]:
    """Holm-adjusted p-values (family-wise error across the compared rows)."""
    m = len(pvals)
    order = sorted(range(m), key=lambda i: pvals[i])
    adj, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvals[i]))
        adj[i] = running
    return adj


def check(
    baseline: list[dict],
    current: list[dict],
    tolerance: float | None = None,
    allow_missing: bool = False,
    allow_changed: bool = False,
) -> CheckResult:
    """Compare ``current`` rows (``frame_rows``) with ``baseline`` rows (``read_baseline``).

    Each baseline row is matched on its key with the current row of the same setting, else
    the newest current row of that key (then its setting decides: retrained or changed).
    Under ``tolerance=None`` (auto) a drop is a regression when its one-sided p-value, Holm-
    adjusted over every compared row, is below 0.05; a rise is an improvement by the same rule
    the other way. A number: a drop (rise) larger than it is a regression (improvement)."""
    res = CheckResult(allow_missing=allow_missing, allow_changed=allow_changed)
    by_key: dict[tuple, list[dict]] = {}
    for r in current:
        by_key.setdefault(_key(r), []).append(r)
    used: set[int] = set()  # ids of the current rows a baseline row was matched with
    pending: list[tuple[dict, dict, str]] = []
    for old in baseline:
        k = _key(old)
        cands = by_key.get(k, [])
        f = dict(zip(KEY, k, strict=True))
        if not cands:
            res.findings.append(
                Finding("missing", old=old["value"], detail="not in the current records", **f)
            )
            continue
        same = [c for c in cands if c["setting"]["hash"] == old["setting"]["hash"]]
        new = same[-1] if same else sorted(cands, key=lambda c: str(c.get("time")))[-1]
        used.add(id(new))
        relation, what = _setting_difference(old, new)
        if relation == "changed":
            res.findings.append(
                Finding("changed", old=old["value"], new=new["value"], detail=what, **f)
            )
            continue
        pending.append((old, new, relation))
    # decide on every compared row together
    tests = [(*_p_drop(old, new), _p_drop(new, old)[0]) for old, new, _ in pending]
    if tolerance is None and pending:
        adj_down = _holm([p for p, _, _ in tests])
        adj_up = _holm([p for _, _, p in tests])
    for i, (old, new, relation) in enumerate(pending):
        f = dict(zip(KEY, _key(old), strict=True))
        drop = old["value"] - new["value"]
        p, how, _ = tests[i]
        if tolerance is None:
            worse = drop > 0 and adj_down[i] < ALPHA
            better = drop < 0 and adj_up[i] < ALPHA
            shown = adj_up[i] if better else adj_down[i]
            tol = f"auto: {how}, Holm-adjusted p={shown:.3g}"
        else:
            tol = f"tolerance {100 * tolerance:.2f} points"
            worse, better = drop > tolerance, -drop > tolerance
        kind = "regression" if worse else "improvement" if better else "ok"
        detail = "retrained from the same recipe" if relation == "retrained" else ""
        res.findings.append(
            Finding(
                kind,
                old=old["value"],
                new=new["value"],
                tolerance=tol,
                detail=detail,
                p_value=p,
                **f,
            )
        )
        if relation == "retrained":
            res.findings.append(Finding("retrained", **f))
    for k, cands in by_key.items():
        in_baseline = any(_key(old) == k for old in baseline)
        known = {old["setting"]["hash"] for old in baseline if _key(old) == k}
        for new in cands:
            if id(new) in used or (in_baseline and new["setting"]["hash"] in known):
                continue
            what = "a setting not in the baseline" if in_baseline else "not in the baseline"
            res.findings.append(
                Finding("new", new=new["value"], detail=what, **dict(zip(KEY, k, strict=True)))
            )
    return res


# ---------------------------------------------------------------- outputs


def summary_markdown(res: CheckResult, baseline: Path) -> str:
    def esc(s) -> str:
        return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")

    lines = [f"## ssl-eval check against `{esc(baseline)}`", "", f"**{res.verdict()}**", ""]
    shown = [
        f
        for f in res.findings
        if f.kind in ("regression", "missing", "changed", "improvement", "new")
    ]
    if shown:
        lines += [
            "| result | backbone | dataset | protocol | metric | baseline | current | how |",
            "|---|---|---|---|---|---:|---:|---|",
        ]
        pct = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
        for f in shown:
            how = f.tolerance + (f"; {f.detail}" if f.detail else "")
            lines.append(
                f"| {f.kind}{' (fails)' if res.failed(f) else ''} | {esc(f.backbone)} | {esc(f.dataset)} | "
                f"{esc(f.protocol)} | {esc(f.metric)} | {pct(f.old)} | {pct(f.new)} | {esc(how)} |"
            )
    return "\n".join(lines) + "\n"


def junit_xml(res: CheckResult) -> str:
    from xml.sax.saxutils import escape, quoteattr

    cases = [f for f in res.findings if f.kind != "retrained"]
    failures = sum(res.failed(f) for f in cases)
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<testsuites name="ssl-eval check" tests="{len(cases)}" failures="{failures}">',
        f'<testsuite name="ssl-eval check" tests="{len(cases)}" failures="{failures}" errors="0" skipped="0">',
    ]
    for f in cases:
        attrs = f"classname={quoteattr(f'{f.dataset}.{f.protocol}')} name={quoteattr(f'{f.backbone} {f.metric}' + ('' if f.seed is None else f' seed {f.seed}'))}"
        if res.failed(f):
            out.append(
                f"<testcase {attrs}><failure message={quoteattr(f.kind)}>{escape(f.line())}</failure></testcase>"
            )
        else:
            out.append(f"<testcase {attrs}><system-out>{escape(f.line())}</system-out></testcase>")
    out += ["</testsuite>", "</testsuites>"]
    return "\n".join(out) + "\n"
