"""The generated "what the numbers say" (ssl_eval/report/findings.py): on the committed records
of a real suite run (read-only) and on copies of them rewritten through the library's writer
(tests/test_gate.py's ``_worsen``: the per-image data, the value and the interval agree, as in a
genuinely worse run), so that the outcome of a claim is the test's choice."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from test_gate import _worsen

from ssl_eval.core.files import sha256_json
from ssl_eval.core.stats import holm, interval_z_test, pack_bits, t_test_1samp, unpack_bits, welch_t
from ssl_eval.records.frame import load_frame
from ssl_eval.records.store import read_unit_file, records_dir, write_unit
from ssl_eval.report import write_report
from ssl_eval.report.findings import TITLE, findings
from ssl_eval.report.gate import _holm
from ssl_eval.report.leaderboard import build_table

SLOW_FIXTURES = ("default",)  # module fixtures that train or start processes (conftest)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "results" / "reference" / "default"
QUICK = ROOT / "results" / "reference" / "quick"
# a small results folder cut from the default reference: the SimCLR ablation pair, the
# supervised model and the two baselines (the ablation group comes from its suite.json)
SUBSET = ("simclr", "simclr-crop", "supervised", "pixels", "random:cifar_resnet_tiny")


@functools.cache
def _reference(path: Path):
    return findings(path)


@pytest.fixture(scope="module")
def default():
    return _reference(DEFAULT)


def _copy(
    src: Path, dst: Path, backbones: tuple[str, ...] | None = None, first_run: bool = True
) -> Path:
    """The record files of ``src`` (of ``backbones`` only, when given; with ``first_run``,
    only the training-seed-0 run of a trained model, so that each model has one run) and its
    suite.json."""
    (dst / "records").mkdir(parents=True)
    for p in sorted((src / "records").glob("*.json")):
        rec = read_unit_file(p)[0]
        seed = (rec.load_report.get("training") or {}).get("seed")
        if first_run and seed not in (None, 0):
            continue
        if backbones is None or rec.backbone in backbones:
            shutil.copyfile(p, dst / "records" / p.name)
    shutil.copyfile(src / "suite.json", dst / "suite.json")
    return dst


@pytest.fixture
def subset(tmp_path):
    return _copy(DEFAULT, tmp_path / "r", SUBSET)


def _claim(f, model, other, column, metric="top1", section="baselines"):
    (c,) = [
        c
        for c in f.claims
        if (c.section, c.model, c.other, c.column, c.metric)
        == (section, model, other, column, metric)
    ]
    return c


def _line(text: str, model: str, section: str = "Top-1") -> str:
    """The model's line of one section ("Top-1" or "Probes") of the generated text."""
    part = text.split(f"{section} against the baselines.", 1)[1]
    return next(x for x in part.splitlines() if x.startswith(f"- **{model}** "))


def _sentences(line: str) -> list[tuple[str, str]]:
    """A model's line as (what it says of whom, under which columns) per outcome sentence."""
    body = line.split("): ", 1)[1].removesuffix(".")
    return [tuple(x.split(" under ", 1)) for x in re.split(r"\. (?=[A-Z])", body)]


def _top1(results: Path, backbone: str, protocol: str) -> tuple[float, int]:
    """(top-1 in %, test images) of the unit's record."""
    for p in sorted(records_dir(results).glob("*.json")):
        for r in read_unit_file(p):
            if (r.backbone, r.protocol["name"], r.metric) == (backbone, protocol, "top1"):
                return 100 * r.value, r.details["n_test"]
    raise AssertionError(f"no {backbone} x {protocol}")


# ---------------------------------------------------------------- the statistics


def test_holm_is_the_gates_and_steps_down():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = list(rng.random(rng.integers(0, 15)) ** 3)
        assert holm(p) == _holm(p)
    # 0.01 * 4, then max(0.04, 0.02 * 3), then 0.03 * 2, then max(., 0.04): monotone, capped
    assert holm([0.04, 0.01, 0.02, 0.03]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


def test_t_tests_and_interval_test_against_scipy():
    v = [0.36, 0.35, 0.33]
    ref = sps.ttest_1samp(v, 0.19)
    t, df, p = t_test_1samp(v, 0.19)
    assert (t, df) == (pytest.approx(ref.statistic), 2) and p == pytest.approx(ref.pvalue)
    a, b = [0.3, 0.35, 0.32, 0.4], [0.2, 0.22, 0.3]
    ref = sps.ttest_ind(a, b, equal_var=False)
    t, df, p = welch_t(a, b)
    assert (t, p) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert df == pytest.approx(ref.df)
    assert t_test_1samp([0.3, 0.3], 0.3)[2] == 1.0 and t_test_1samp([0.3, 0.3], 0.2)[2] == 0.0
    # two 95% intervals of half-width 1.96 (se 1): the difference 2 has se sqrt(2)
    z, p = interval_z_test(12.0, 1.959964, 10.0, 1.959964)
    assert z == pytest.approx(2 / math.sqrt(2), rel=1e-5)
    assert p == pytest.approx(2 * sps.norm.sf(2 / math.sqrt(2)), rel=1e-5)


# ---------------------------------------------------------------- the reference records


@pytest.mark.slow
@pytest.mark.parametrize("ref", [DEFAULT, QUICK], ids=["default", "quick"])
def test_every_trained_model_and_column_has_its_claims(ref):
    """Nothing can be left out: every (trained model, column) pair, top-1 and probe, has a
    claim against every baseline with a cell there, and the model's line shows each; a pair
    without a cell is listed as not compared (a column only the ViT has, its arch protocols',
    lists every baseline so)."""
    default = _reference(ref)
    frame = load_frame(ref)
    recipe = frame["load_report.training.recipe"]
    trained = set(frame.loc[recipe.notna(), "backbone"])
    baselines = set(frame.loc[recipe.isna(), "backbone"])
    assert sorted(trained) == sorted(default.models) and len(trained) >= 3
    assert sorted(baselines) == sorted(default.baselines) and len(baselines) >= 2
    text = default.markdown()
    probe_metrics = [c for c in frame.columns if c.startswith(("decode_", "inv_")) and "." not in c]
    assert len(probe_metrics) >= 2
    n_claims, lacking = 0, set()
    for metric in ["top1", *probe_metrics]:
        table = build_table(frame, metric)
        assert table.cols
        for ck in table.cols:
            has = {table.row_label[r] for (r, k) in table.cells if k == ck}
            column = table.col_label[ck] + ("" if metric == "top1" else f": {metric}")
            lacking |= {(b, column) for b in trained | baselines if b not in has}
            for m in sorted(trained & has):
                if not baselines & has:  # an arch protocol's column (the ViT's probes): no
                    continue  # baseline to compare with; the baselines are listed as lacking
                line = _line(text, m, "Top-1" if metric == "top1" else "Probes")
                assert f"{column} (" in line, (m, column)
                for b in sorted(baselines & has):
                    _claim(default, m, b, column, metric)
                    n_claims += 1
    assert len(default.claims_of("baselines")) == n_claims
    assert set(default.missing) == lacking
    for b, column in lacking:
        assert f"{b} under {column}" in text.split("No record, not compared: ", 1)[1]


@pytest.mark.slow
def test_every_claim_is_printed_whatever_its_outcome(default):
    """A claim that contradicts the story reads like one that agrees: the same entry, with
    both values, the adjusted p and the test, under its outcome."""
    text = default.markdown()
    heads = {
        "above": "Above ",
        "below": "Below ",
        "not separable": "Not separable from ",
        "not compared": "No interval: not compared with ",
    }
    for c in default.claims_of("baselines"):
        line = _line(text, c.model, "Top-1" if c.metric == "top1" else "Probes")
        entry = _entry(line, heads[c.outcome], c.other, c.column)
        fmt = "{:.3f}" if c.metric.startswith("inv_") else "{:.2f}"
        assert entry.startswith(f"{fmt.format(c.value)} vs "), (c, entry)
        assert f" {fmt.format(c.other_value)}" in entry
        if c.p_holm is not None:
            assert c.test in entry
    outcomes = {c.outcome for c in default.claims}
    assert (
        {"above", "not separable"}
        <= outcomes
        <= {"above", "below", "not separable", "not compared"}
    )


def test_the_story_the_records_tell(default):
    """A few claims this reference makes by a wide margin, each with the test that fits."""
    d = default
    knn = _claim(d, "simclr", "pixels", "shapes / knn")
    # the reference holds 3 training runs per model: each run paired with the fixed baseline
    assert (knn.test, knn.outcome) == ("McNemar, every run", "above")
    few = _claim(d, "simclr", "pixels", "shapes / fewshot")
    assert few.test == "t over runs"  # few-shot keeps no per-image data: the runs' spread
    inv = _claim(d, "simclr", "pixels", "shapes / invariance: inv_colour", "inv_colour")
    assert inv.test == "t over runs"  # an invariance score has no interval of one run
    dec = _claim(d, "simclr", "pixels", "shapes / invariance: decode_colour", "decode_colour")
    assert dec.test == "t over runs" and dec.value < dec.other_value  # pixels keep colour best
    abl = _claim(d, "simclr", "simclr-crop", "shapes / knn", section="ablation")
    assert abl.outcome == "above" and "simclr-crop" in d.ablations["ablation"]
    for b in d.best:
        if b.column.endswith(("attentive@capi", "linear@dinov2")):  # the ViT's probes: MAE alone
            assert b.backbones == ("mae",) and b.runner_up == (), b
            continue
        assert b.backbones == ("supervised",), b
        assert f"- {b.column}: **supervised** {b.text} (next: " in d.markdown()


def test_holm_decides(default):
    """The outcome follows the Holm-adjusted p-value over every test of the section, never the
    raw one: a claim with a raw p under 0.05 whose adjusted p is not is "not separable"."""
    tested = [c for c in default.claims if c.p is not None]
    assert default.n_tests == len(tested)
    assert [c.p_holm for c in tested] == holm([c.p for c in tested])
    for c in tested:
        assert (c.outcome == "not separable") == (c.p_holm >= 0.05), c
    text = default.markdown()
    assert f"; {len(tested)} tests, Holm-adjusted together" in text
    between = [c for c in tested if c.p < 0.05 <= c.p_holm]
    assert between  # this reference has some: without Holm they would read as separated
    for c in between:
        if c.section == "baselines":
            line = _line(text, c.model, "Top-1" if c.metric == "top1" else "Probes")
            entry = _entry(line, "Not separable from ", c.other, c.column)
            assert f"p={c.p_holm:.2g} {c.test}" in entry


@pytest.mark.slow
def test_text_is_deterministic_and_names_no_path(default, tmp_path):
    text = default.markdown()
    assert text.startswith(f"## {TITLE}\n\n") and text.endswith(".\n")
    assert findings(_copy(DEFAULT, tmp_path / "copy", first_run=False)).markdown() == text
    assert str(DEFAULT) not in text and "reference" not in text


# ---------------------------------------------------------------- controlled outcomes


def _entry(line: str, head: str, other: str, column: str) -> str:
    """The entry of ``column`` in the sentence of ``line`` that starts with ``head`` and
    names ``other``; AssertionError when there is not exactly one."""
    (cols,) = [
        cols
        for who, cols in _sentences(line)
        if who.startswith(head) and other in who and f"{column} (" in cols
    ]
    return cols.split(f"{column} (", 1)[1].split(")", 1)[0]


@pytest.mark.slow
def test_a_worse_run_flips_the_claim(subset):
    col = "shapes / linear"
    v, n = _top1(subset, "simclr", "linear")
    u, _ = _top1(subset, "pixels", "linear")
    before = findings(subset)
    assert _claim(before, "simclr", "pixels", col).outcome == "above"
    assert _entry(_line(before.markdown(), "simclr"), "Above ", "pixels", col).startswith(
        f"{v:.2f} vs {u:.2f}, p<0.001 McNemar"
    )
    _worsen(subset, "simclr", "linear", round((v - u) / 100 * n))  # down to pixels' value
    f = findings(subset)
    tied = _claim(f, "simclr", "pixels", col)
    assert (tied.outcome, tied.test) == ("not separable", "McNemar")
    assert tied.value == pytest.approx(u, abs=0.05)
    entry = _entry(_line(f.markdown(), "simclr"), "Not separable from ", "pixels", col)
    assert entry.startswith(f"{tied.value:.2f} vs {u:.2f}, p=1 McNemar")
    _worsen(subset, "simclr", "linear", round(u / 2 / 100 * n))  # half of pixels' value
    f = findings(subset)
    below = _claim(f, "simclr", "pixels", col)
    assert below.outcome == "below" and below.value == pytest.approx(u / 2, abs=0.05)
    entry = _entry(_line(f.markdown(), "simclr"), "Below ", "pixels", col)
    assert entry.startswith(f"{below.value:.2f} vs {u:.2f}, p<0.001 McNemar")


def _retrain(results: Path, backbone: str, protocol: str, n_flip: int, seed: int) -> None:
    """Another training run of the unit's recipe (other weights, training seed ``seed``) whose
    top-1 has ``n_flip`` more wrong test images, written through the library's writer."""
    (p,) = [
        p
        for p in sorted(records_dir(results).glob("*.json"))
        if read_unit_file(p)[0].backbone == backbone
        and read_unit_file(p)[0].protocol["name"] == protocol
    ][:1]
    weights = f"{seed:064x}"
    out = []
    for rec in read_unit_file(p):
        summary = {"row": dict(rec.setting["summary"]["row"], weights=weights)}
        summary["column"] = rec.setting["summary"]["column"]
        setting = {
            "hash": sha256_json(summary)[:16],
            "row": sha256_json(summary["row"])[:16],
            "column": rec.setting["column"],
            "summary": summary,
        }
        training = dict(rec.load_report["training"], seed=seed)
        rec = dataclasses.replace(
            rec,
            weights=dict(rec.weights, sha256=weights),
            load_report=dict(rec.load_report, training=training),
            setting=setting,
        )
        if rec.metric == "top1":
            n = rec.details["n_test"]
            c = unpack_bits(rec.details["per_sample_correct"], n).copy()
            c[np.flatnonzero(c)[:n_flip]] = False
            d = dict(rec.details, per_sample_correct=pack_bits(c))
            lo, hi = rec.ci95
            shift = rec.value - c.mean()
            rec = dataclasses.replace(
                rec, value=float(c.mean()), ci95=[lo - shift, hi - shift], details=d
            )
        out.append(rec)
    write_unit(results, rec.unit, f"20990101T000000Z-{seed:06x}", out)


@pytest.mark.slow
def test_several_training_runs_are_tested_by_their_spread(subset):
    """Three training runs of SimCLR's recipe, at v, v - d and v - 2d with d a quarter of its
    lead over pixels: each run is paired with the fixed pixels model on the same test images
    (McNemar per run; the claim holds for every run at the largest p), and without per-image
    data the one-sample t over the runs (2 degrees of freedom) is the test."""
    from ssl_eval.report.findings import _compare, _Side

    col = "shapes / linear"
    v, n = _top1(subset, "simclr", "linear")
    u, _ = _top1(subset, "pixels", "linear")
    before = findings(subset)
    assert _claim(before, "simclr", "pixels", col).test == "McNemar"
    d = (v - u) / 4
    _retrain(subset, "simclr", "linear", round(d / 100 * n), 1)
    _retrain(subset, "simclr", "linear", round(2 * d / 100 * n), 2)
    runs = sorted(
        100 * r.value
        for p in records_dir(subset).glob("*.json")
        for r in read_unit_file(p)
        if (r.backbone, r.protocol["name"], r.metric) == ("simclr", "linear", "top1")
    )
    assert len(runs) == 3
    f = findings(subset)
    c = _claim(f, "simclr", "pixels", col)
    assert (c.test, c.runs, c.other_runs) == ("McNemar, every run", 3, 1)
    assert c.value == pytest.approx(np.mean(runs)) and c.other_value == pytest.approx(u)
    assert c.outcome == "above"  # every run is far above pixels on the same images
    # runs on both sides of the other value: no claim for every run (p = 1)
    bits = [
        np.r_[np.ones(60, bool), np.zeros(40, bool)],
        np.r_[np.ones(40, bool), np.zeros(60, bool)],
    ]
    one = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    split = _Side("m", 50.0, 5.0, [60.0, 40.0], None, bits)
    assert _compare(split, _Side("b", 50.0, 5.0, [50.0], one))[:2] == ("McNemar, every run", 1.0)
    # without per-image data: the one-sample t over the runs, as scipy computes it
    t_side = _Side("m", float(np.mean(runs)), None, runs, None, None)
    test, p, _ = _compare(t_side, _Side("b", u, 1.0, [u], None))
    assert test == "t over runs" and p == pytest.approx(sps.ttest_1samp(runs, u).pvalue)


# ---------------------------------------------------------------- the report


@pytest.mark.slow
def test_report_writes_and_shows_the_findings(subset, tmp_path):
    index = write_report(subset, cache_dir=tmp_path / "no-cache", progress=False)
    out = index.parent
    text = findings(subset).markdown()
    assert (out / "findings.md").read_text() == text
    md = (out / "report.md").read_text()
    body = text.split("\n", 2)[2]  # the section without its heading
    assert f"## {TITLE}\n\n{body}" in md
    assert md.index("## Leaderboard") < md.index(f"## {TITLE}")
    page = index.read_text()
    assert '<div id="findings">' in page and TITLE in page
    assert "<li><b>simclr</b> (1 training run): Above pixels and" in page
    assert "No interval: not compared with pixels and random:cifar_resnet_tiny" in page
