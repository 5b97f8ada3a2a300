"""What the numbers say, generated from the records: ``findings(results_dir) -> Findings``.

Every claim is made the same way whatever its outcome, so a column or a probe that contradicts
the expected story is printed exactly like one that agrees; nothing is chosen by hand:

* **against the baselines**: every trained model (a backbone whose records carry
  ``load_report.training.recipe``) against every baseline (a backbone without one: ``pixels``,
  ``random:<arch>``) in every leaderboard column (``leaderboard.build_table``, top-1) and every
  probe metric of the invariance records (``decode_<factor>``, ``inv_<augmentation>``);
* **within an ablation**: every pair of the trained models of one suite group whose name
  starts with ``ablation`` (``suite.json``), in the same columns and probes;
* **best per column**: the backbone(s) with the highest top-1 of each column, with the
  interval, and the next one.

A comparison is one of these tests, chosen by what the two sides carry:

* ``McNemar``: one training run on each side and both keep per-image correctness on the same
  test images (top-1 of k-NN, linear, fine-tuning): the exact two-sided McNemar test;
* ``t over runs``: one side has several training runs (rows of one label and recipe with other
  weights): a one-sample t test of its runs' values against the other side's value, two-sided
  (the spread between training runs is the honest noise of a retrained model); ``Welch t over
  runs`` when both sides have several;
* ``intervals``: otherwise (few-shot, the decoders of the invariance probe): the two recorded
  95% intervals read as normal distributions (their half-widths / 1.96 as standard errors);
* a side without any interval (an invariance score of a single run) is not compared: the
  claim says ``no interval: not compared`` and carries no p-value.

All p-values of one ``Findings`` are Holm-adjusted together (family-wise error 5%); a claim is
``above`` or ``below`` when its adjusted p-value is under 0.05, else ``not separable``.
``markdown()`` is deterministic: the same records give the same text, byte for byte (no path,
no time), so a README can quote it and a test can compare the quote.


Why one file of ~420 lines of code: the claims and the sentences that word them are one
contract (every sentence names the test behind it, and the test picks the words), and
``tests/test_findings.py`` checks them together; split, each half would import the other."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.stats import holm, interval_z_test, mcnemar, t_test_1samp, unpack_bits, welch_t

if TYPE_CHECKING:
    import pandas as pd

    from .leaderboard import Table

__all__ = ["ALPHA", "TITLE", "Best", "Claim", "Findings", "findings"]

ALPHA = 0.05
TITLE = "What the numbers say (generated from the records; Holm-corrected, 5% family-wise)"
HEADLINE = "top1"
PROBE_TYPE = "invariance"
PROBE_PREFIXES = ("decode_", "inv_")
ABLATION_PREFIX = "ablation"

ABOVE, BELOW, TIED, UNTESTED = "above", "below", "not separable", "not compared"
OUTCOMES = (ABOVE, TIED, BELOW, UNTESTED)
NO_INTERVAL = "no interval: not compared"
TESTS = {  # every test a claim may name, with what it is (the text explains those it uses)
    "McNemar": "exact two-sided McNemar test, paired on the same test images (one training "
    "run on each side)",
    "McNemar, every run": "each training run against the other side (one fixed model) by the "
    "exact two-sided McNemar test on the same test images; the claim holds for every run (p: "
    "the largest of the runs', an intersection-union test), about these runs, not every run "
    "the recipe could give",
    "t over runs": "one-sample two-sided t test of a model's training runs against the other "
    "side's value",
    "Welch t over runs": "Welch's two-sided t test of the two sides' training runs",
    "intervals": "the two recorded 95% intervals read as normal distributions (no per-image data)",
}


# ---------------------------------------------------------------- the structured claims


@dataclass(frozen=True)
class Claim:
    """One comparison of a trained model with another backbone in one column.

    Values are in the metric's display unit: top-1 and decodability in %, invariance scores
    as they are (1: the augmentation changes nothing); a side's value is the leaderboard's
    (the mean over its training runs where it has several)."""

    section: str  # "baselines" (model vs a baseline) or "ablation" (model vs model)
    metric: str  # top1, decode_<factor>, inv_<augmentation>
    column: str  # the leaderboard column label ("shapes / knn"); a probe's: "<column>: <metric>"
    model: str  # the trained model's label
    other: str  # the baseline's (or the other ablation model's) label
    value: float
    other_value: float
    runs: int  # training runs behind ``value``
    other_runs: int
    test: str  # McNemar | McNemar, every run | t over runs | Welch t over runs | intervals | ""
    p: float | None  # raw two-sided p-value; None when not compared
    p_holm: float | None = None  # Holm-adjusted over every tested claim of the Findings
    outcome: str = UNTESTED  # above | below | not separable | not compared
    note: str = ""  # why it is not compared


@dataclass(frozen=True)
class Best:
    column: str
    backbones: tuple[str, ...]  # the best (several when tied)
    text: str  # the best cell as the leaderboard writes it (value ± half-width, interval mark)
    value: float
    lo: float | None
    hi: float | None
    runner_up: tuple[str, ...] = ()  # the next value's backbone(s)
    runner_up_text: str = ""


@dataclass
class Findings:
    claims: list[Claim] = field(default_factory=list)
    best: list[Best] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # trained models, sorted
    baselines: list[str] = field(default_factory=list)
    ablations: dict[str, list[str]] = field(default_factory=dict)  # group -> its models
    missing: list[tuple[str, str]] = field(default_factory=list)  # (backbone, column): no cell
    columns: list[str] = field(default_factory=list)  # top-1 columns
    probe_columns: list[str] = field(default_factory=list)
    n_units: int = 0  # unit runs (record files) read
    alpha: float = ALPHA

    @property
    def n_tests(self) -> int:
        return sum(c.p is not None for c in self.claims)

    def claims_of(self, section: str, model: str | None = None, metric: str | None = None):
        """The claims of one section (``baselines`` or ``ablation``), of one model, and with
        ``metric`` ``"top1"`` the top-1 claims, with any other value the probes' ones."""
        return [
            c
            for c in self.claims
            if c.section == section
            and (model is None or c.model == model)
            and (metric is None or (c.metric == HEADLINE) == (metric == HEADLINE))
        ]

    def blocks(self) -> list[tuple[str, list[tuple[str, str]]]]:
        """The section as blocks ``(kind, segments)``: kind ``p`` (a paragraph) or ``li`` (a
        list item); a segment is ``(text, style)`` with style ``text`` (written by this module),
        ``name`` (a label from the records, to be escaped) or ``bold`` (an escaped label in
        bold). markdown() and the report's HTML render the same blocks."""
        return list(_blocks(self))

    def markdown(self) -> str:
        """The whole section, heading included (``report/findings.md``)."""
        from .markdown import findings_md

        return "\n".join([f"## {TITLE}", "", *findings_md(self.blocks())]).rstrip() + "\n"


# ---------------------------------------------------------------- reading the records


@dataclass
class _Side:
    label: str
    value: float  # display unit
    half: float | None  # half-width of the 95% interval, display unit
    runs: list[float]  # one value per training run (display unit)
    bits: np.ndarray | None  # per-image correctness: one run, one unit run
    run_bits: list[np.ndarray] | None = None  # per-image correctness of each training run


def _scale(metric: str) -> float:
    """Cell values are in % (the leaderboard's); an invariance score is shown as it is."""
    return 0.01 if metric.startswith("inv_") else 1.0


def _fmt(metric: str, v: float) -> str:
    return f"{v:.3f}" if metric.startswith("inv_") else f"{v:.2f}"


def _is_trained(rows: pd.DataFrame) -> bool:
    col = "load_report.training.recipe"
    if col not in rows.columns:
        return False
    return any(isinstance(r, str) and r for r in rows[col])


def _sides(frame: pd.DataFrame, table: Table, metric: str) -> dict[tuple[str, str], _Side]:
    """{(row label, column key): the side of that cell}."""
    from .leaderboard import cell_columns, make_cell, narrow

    scale = _scale(metric)
    pcol, ncol = f"{metric}.per_sample_correct", f"{metric}.n_test"
    keep = [*cell_columns(metric), pcol, ncol, "setting.column_hash", "backbone"]
    if not table.cells or metric not in frame.columns:
        return {}
    frame = narrow(frame, keep)
    frame = frame[frame[metric].notna()]
    column_hash, backbone = frame["setting.column_hash"].astype(str), frame["backbone"].astype(str)
    out: dict[tuple[str, str], _Side] = {}
    for (rk, ck), cell in table.cells.items():
        rows = frame[
            frame["file"].isin(cell.files)
            & (column_hash == ck)
            & (backbone == str(table.row_summary[rk].get("backbone")))
        ]
        runs = [cell.value * scale]
        run_bits = None
        if cell.kind == "t-runs":
            w = rows["setting.row.weights"].astype(str)
            groups = [g for _, g in rows.groupby(w, sort=True)]
            runs = [make_cell(g, metric).value * scale for g in groups]
            if pcol in rows.columns and ncol in rows.columns and all(len(g) == 1 for g in groups):
                packed = [(g[pcol].iloc[0], g[ncol].iloc[0]) for g in groups]
                if all(isinstance(b, str) and n == n for b, n in packed):
                    run_bits = [unpack_bits(b, int(n)) for b, n in packed]
        bits = None
        if len(runs) == 1 and len(rows) == 1 and pcol in rows.columns and ncol in rows.columns:
            packed, n = rows[pcol].iloc[0], rows[ncol].iloc[0]
            if isinstance(packed, str) and n == n:
                bits = unpack_bits(packed, int(n))
        half = cell.half_width
        out[(table.row_label[rk], ck)] = _Side(
            table.row_label[rk],
            cell.value * scale,
            None if half is None else half * scale,
            runs,
            bits,
            run_bits,
        )
    return out


def _compare(a: _Side, b: _Side) -> tuple[str, float | None, str]:
    """(test, two-sided p, note) of ``a`` against ``b``."""
    if len(a.runs) >= 2 and len(b.runs) >= 2:
        return "Welch t over runs", welch_t(a.runs, b.runs)[2], ""
    for many, one in ((a, b), (b, a)):
        if (
            len(many.runs) >= 2
            and many.run_bits
            and one.bits is not None
            and all(len(x) == len(one.bits) for x in many.run_bits)
        ):
            return "McNemar, every run", _every_run(many, one), ""
    if len(a.runs) >= 2:
        return "t over runs", t_test_1samp(a.runs, b.value)[2], ""
    if len(b.runs) >= 2:
        return "t over runs", t_test_1samp(b.runs, a.value)[2], ""
    if a.bits is not None and b.bits is not None and len(a.bits) == len(b.bits):
        return "McNemar", mcnemar(a.bits, b.bits)["p_value"], ""
    if a.half is not None and b.half is not None:
        return "intervals", interval_z_test(a.value, a.half, b.value, b.half)[1], ""
    return "", None, NO_INTERVAL


def _every_run(many: _Side, one: _Side) -> float:
    """Intersection-union test: each training run of ``many`` against the fixed model ``one``
    by the exact two-sided McNemar test on the same test images; the claim (every run on the
    same side of ``one``) holds at the largest of the runs' p-values, and not at all (p = 1)
    when the runs fall on both sides. A claim about these runs, not about every run the
    recipe could give (that is the t over runs, which a few seeds cannot power)."""
    signs, ps = set(), []
    for bits in many.run_bits or []:
        signs.add(np.sign(float(bits.mean()) - float(one.bits.mean())))
        ps.append(mcnemar(bits, one.bits)["p_value"])
    return max(ps) if len(signs) == 1 and 0 not in signs else 1.0


def _probe_metrics(frame: pd.DataFrame) -> list[str]:
    if "protocol.type" not in frame.columns:
        return []
    probes = frame[frame["protocol.type"] == PROBE_TYPE]
    return sorted(
        c
        for c in probes.columns
        if "." not in c and c.startswith(PROBE_PREFIXES) and probes[c].notna().any()
    )


def _ablations(results_dir: Path, models: list[str]) -> dict[str, list[str]]:
    """{group: its trained models} for the suite groups named ``ablation*`` (suite.json)."""
    try:
        spec = json.loads((results_dir / "suite.json").read_text())["suite"]
        entries = [
            (str(m["name"]), [str(g) for g in m.get("groups") or []]) for m in spec["models"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    groups: dict[str, list[str]] = {}
    for name, gs in entries:
        for g in gs:
            if g.startswith(ABLATION_PREFIX) and name in models:
                groups.setdefault(g, []).append(name)
    return {g: sorted(set(ms)) for g, ms in sorted(groups.items()) if len(set(ms)) >= 2}


def findings(results_dir: str | Path, frame: pd.DataFrame | None = None) -> Findings:
    """Every claim of the records under ``results_dir`` (read through ``load_frame``, or
    ``frame`` when the caller has already read them); ``suite.json`` there names the
    ablation groups."""
    from ..records.frame import load_frame
    from .leaderboard import build_table, narrow

    results_dir = Path(results_dir)
    frame = load_frame(results_dir) if frame is None else frame
    out = Findings(n_units=0 if frame.empty else len(frame))
    if frame.empty:
        return out
    tables = {m: build_table(frame, m) for m in [HEADLINE, *_probe_metrics(frame)]}

    trained: set[str] = set()
    untrained: set[str] = set()
    recipes = narrow(frame, ["file", "load_report.training.recipe"])
    for table in tables.values():
        for rk in table.rows:
            files = {f for (r, _), c in table.cells.items() if r == rk for f in c.files}
            rows = recipes[recipes["file"].isin(files)]
            (trained if _is_trained(rows) else untrained).add(table.row_label[rk])
    out.models = sorted(trained, key=str.lower)
    out.baselines = sorted(untrained - trained, key=str.lower)
    out.ablations = _ablations(results_dir, out.models)

    claims: list[Claim] = []
    for metric, table in tables.items():
        sides = _sides(frame, table, metric)
        for ck in table.cols:
            col = table.col_label[ck] + ("" if metric == HEADLINE else f": {metric}")
            (out.columns if metric == HEADLINE else out.probe_columns).append(col)
            for b in [*out.models, *out.baselines]:
                if (b, ck) not in sides:
                    out.missing.append((b, col))
            pairs = [("baselines", m, b) for m in out.models for b in out.baselines]
            pairs += [
                ("ablation", a, b)
                for ms in out.ablations.values()
                for i, a in enumerate(ms)
                for b in ms[i + 1 :]
            ]
            for section, m, b in pairs:
                if (m, ck) not in sides or (b, ck) not in sides:
                    continue
                a, o = sides[(m, ck)], sides[(b, ck)]
                test, p, note = _compare(a, o)
                claims.append(
                    Claim(section, metric, col, m, b, a.value, o.value, len(a.runs), len(o.runs),
                          test, p, note=note)
                )  # fmt: skip
        if metric == HEADLINE:
            out.best = [_best(table, ck) for ck in table.cols]

    adjusted = iter(holm([c.p for c in claims if c.p is not None]))
    for c in claims:
        if c.p is None:
            out.claims.append(c)
            continue
        q = next(adjusted)
        outcome = TIED
        if q < out.alpha and c.value != c.other_value:
            outcome = ABOVE if c.value > c.other_value else BELOW
        out.claims.append(replace(c, p_holm=q, outcome=outcome))
    out.missing = sorted(set(out.missing), key=lambda x: (x[1], x[0].lower(), x[0]))
    return out


def _best(table: Table, ck: str) -> Best:
    cells = sorted(
        ((table.row_label[rk], c) for (rk, k), c in table.cells.items() if k == ck),
        key=lambda x: (-x[1].value, x[0].lower(), x[0]),
    )
    top = cells[0][1].value
    best = [(lbl, c) for lbl, c in cells if c.value == top]
    rest = [(lbl, c) for lbl, c in cells if c.value != top]
    nxt = [(lbl, c) for lbl, c in rest if c.value == rest[0][1].value] if rest else []
    first = best[0][1]
    return Best(
        table.col_label[ck],
        tuple(lbl for lbl, _ in best),
        first.text(),
        first.value,
        first.lo,
        first.hi,
        tuple(lbl for lbl, _ in nxt),
        nxt[0][1].text() if nxt else "",
    )


# ---------------------------------------------------------------- the text

Segs = list[tuple[str, str]]


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def _names(names: list[str]) -> Segs:
    out: Segs = []
    for i, n in enumerate(names):
        if i:
            out.append((" and " if i == len(names) - 1 else ", ", "text"))
        out.append((n, "name"))
    return out


def _entry(claims: list[Claim]) -> Segs:
    """``<column> (<value> vs <other>, p=... <test>; vs <other>, ...)``: one column of one
    model against the others of one outcome group, in the group's order."""
    first = claims[0]
    parts = []
    for i, c in enumerate(claims):
        s = ("" if i == 0 else "vs ") + _fmt(c.metric, c.other_value)
        if c.p_holm is not None:
            s += f", {_p(c.p_holm)} {c.test}"
        parts.append(s)
    return [
        (first.column, "name"),
        (f" ({_fmt(first.metric, first.value)} vs " + "; ".join(parts) + ")", "text"),
    ]


def _outcome_phrase(outcome: str, others: list[str]) -> Segs:
    """The start of one outcome's sentence: ``Above pixels and random under ``."""
    if not others:  # a pair of models: the other is named at the start of the line
        head = {ABOVE: "Above", TIED: "Not separable", BELOW: "Below", UNTESTED: NO_INTERVAL}
        return [(head[outcome][0].upper() + head[outcome][1:] + " under ", "text")]
    head = {
        ABOVE: "Above ",
        TIED: "Not separable from ",
        BELOW: "Below ",
        UNTESTED: "No interval: not compared with ",
    }
    return [(head[outcome], "text"), *_names(others), (" under ", "text")]


def _claims_line(claims: list[Claim], name_others: bool) -> Segs:
    """One model's claims grouped by outcome, then by the set of others it holds for: one
    sentence per group, its columns' entries separated by commas."""
    col_order = {c: i for i, c in enumerate(dict.fromkeys(c.column for c in claims))}
    other_order = {o: i for i, o in enumerate(dict.fromkeys(c.other for c in claims))}
    segs: Segs = []
    for outcome in OUTCOMES:
        by_col: dict[str, list[Claim]] = {}
        for c in claims:
            if c.outcome == outcome:
                by_col.setdefault(c.column, []).append(c)
        groups: dict[tuple[str, ...], list[list[Claim]]] = {}
        for col in sorted(by_col, key=col_order.__getitem__):
            cs = sorted(by_col[col], key=lambda c: other_order[c.other])
            groups.setdefault(tuple(c.other for c in cs), []).append(cs)
        for others in sorted(groups, key=lambda o: (-len(o), [other_order[x] for x in o])):
            if segs:
                segs.append((". ", "text"))
            segs += _outcome_phrase(outcome, list(others) if name_others else [])
            for i, cs in enumerate(groups[others]):
                if i:
                    segs.append((", ", "text"))
                segs += _entry(cs)
    return [*segs, (".", "text")] if segs else [("No comparison.", "text")]


def _runs(claims: list[Claim], attr: str = "runs") -> str:
    ns = sorted({getattr(c, attr) for c in claims})
    if not ns:
        return ""
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return f"{n} training run" + ("" if n == "1" else "s")


def _blocks(f: Findings) -> Iterator[tuple[str, Segs]]:
    if not f.columns and not f.probe_columns:
        yield "p", [("No records with a top-1 metric or an invariance probe.", "text")]
        return
    used = [t for t in TESTS if any(c.test == t for c in f.claims)]
    yield (
        "p",
        [
            (
                f"Generated by ssl_eval.report.findings from {f.n_units} unit runs: every trained "
                "model against every baseline in every column and probe"
                + (", and the models of each ablation against each other" if f.ablations else "")
                + f"; {f.n_tests} tests, Holm-adjusted together (p: the adjusted p-value; above or "
                f"below: adjusted p < {f.alpha:g}). "
                + ("Tests: " + "; ".join(f"{t}, {TESTS[t]}" for t in used) + ". " if used else "")
                + "Values: top-1 and decodability in %, invariance scores as they are; a model "
                "with several training runs shows their mean.",
                "text",
            )
        ],
    )
    base = [("Baselines: ", "text"), *_names(f.baselines)] if f.baselines else []
    for metric_kind, title in ((HEADLINE, "Top-1"), ("probe", "Probes")):
        yield "p", [(f"{title} against the baselines. ", "text"), *base, (".", "text")]
        if not f.models or not f.baselines:
            yield "li", [("no trained model and baseline to compare.", "text")]
            continue
        for m in f.models:
            cs = f.claims_of("baselines", m, metric_kind)
            runs = _runs(cs)
            yield (
                "li",
                [
                    (m, "bold"),
                    (f" ({runs})" if runs else "", "text"),
                    (": ", "text"),
                    *_claims_line(cs, True),
                ],
            )
    for group, ms in f.ablations.items():
        yield (
            "p",
            [
                ("Within the suite group ", "text"),
                (group, "name"),
                (" (", "text"),
                *_names(ms),
                ("), each pair:", "text"),
            ],
        )
        for i, a in enumerate(ms):
            for b in ms[i + 1 :]:
                for metric_kind in (HEADLINE, "probe"):
                    cs = [c for c in f.claims_of("ablation", a, metric_kind) if c.other == b]
                    kind = "top-1" if metric_kind == HEADLINE else "probes"
                    yield (
                        "li",
                        [
                            (a, "bold"),
                            (f" ({_runs(cs)})" if cs else "", "text"),
                            (" against ", "text"),
                            (b, "bold"),
                            (f" ({_runs(cs, 'other_runs')})" if cs else "", "text"),
                            (f", {kind}: ", "text"),
                            *_claims_line(cs, False),
                        ],
                    )
    if f.best:
        yield (
            "p",
            [("Best top-1 per column (± half-width of its 95% interval), and the next:", "text")],
        )
        for b in f.best:
            segs: Segs = [(b.column, "name"), (": ", "text")]
            for i, name in enumerate(b.backbones):
                segs += [(", " if i else "", "text"), (name, "bold")]
            segs.append((f" {b.text}", "text"))
            if b.runner_up:
                segs.append((" (next: ", "text"))
                segs += _names(list(b.runner_up))
                segs.append((f" {b.runner_up_text})", "text"))
            yield "li", segs
    if f.missing:
        segs = [("No record, not compared: ", "text")]
        for i, (b, col) in enumerate(f.missing):
            segs += [("; " if i else "", "text"), (b, "name"), (" under ", "text"), (col, "name")]
        yield "p", [*segs, (".", "text")]
