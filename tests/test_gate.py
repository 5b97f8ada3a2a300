"""The regression gate: ``ssl-eval baseline`` / ``check`` / ``export`` on records of real runs.

A regression is injected by rewriting a record through the library's own writer (its checksum
stays valid), turning correct test images into wrong ones: the per-image data, the value and
the interval all say the same thing, as in a genuinely worse run."""

import dataclasses
import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from ssl_eval.cli import main
from ssl_eval.core.stats import pack_bits, unpack_bits
from ssl_eval.records.store import read_unit_file, records_dir, write_unit
from ssl_eval.report.baseline import frame_rows
from ssl_eval.report.gate import _setting_difference, check

SLOW_FIXTURES = ("store",)  # module fixtures that train or start processes (conftest)

RUN = ["--dataset", "digits", "--protocol", "knn,linear", "--image-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    r = root / "r"
    args = ["run", "--backbone", "pixels,random:resnet10t", *RUN, "--results-dir", str(r)]
    args += ["--cache-dir", str(root / "cache")]
    assert main(args) == 0
    assert main(["baseline", "--results-dir", str(r), "--out", str(root / "base.json")]) == 0
    return root


def _copy(store, tmp_path):
    dst = tmp_path / "r"
    shutil.copytree(store / "r", dst)
    return dst


def _worsen(results, backbone, protocol, n_flip):
    """Rewrite the unit's records so that ``n_flip`` correct test images become wrong."""
    for p in sorted(records_dir(results).glob("*.json")):
        recs = read_unit_file(p)
        if recs[0].backbone != backbone or recs[0].protocol["name"] != protocol:
            continue
        out = []
        for rec in recs:
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
        p.unlink()
        unit, _, run_id = p.stem.partition("-")
        write_unit(results, unit, run_id, out)
        return
    raise AssertionError(f"no unit {backbone} x {protocol}")


def _check(store, results, *extra, capsys=None):
    code = main(
        ["check", "--baseline", str(store / "base.json"), "--results-dir", str(results), *extra]
    )
    return code, (capsys.readouterr().out if capsys else "")


@pytest.mark.slow
def test_same_records_pass_and_junit_parses(store, tmp_path, capsys):
    code, out = _check(store, store / "r", "--junit", str(tmp_path / "j.xml"), capsys=capsys)
    assert code == 0 and "PASS: 4 row(s) compared" in out, out
    root = ET.parse(tmp_path / "j.xml").getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == 4


@pytest.mark.slow
def test_injected_regression_fails_with_old_new_and_tolerance(store, tmp_path, capsys):
    r = _copy(store, tmp_path)
    _worsen(r, "random:resnet10t", "linear", 60)  # 60 of ~540 test images
    code, out = _check(
        store,
        r,
        "--junit",
        str(tmp_path / "j.xml"),
        "--summary",
        str(tmp_path / "s.md"),
        capsys=capsys,
    )
    assert code == 1, out
    line = next(x for x in out.splitlines() if x.startswith("REGRESSION"))
    assert "random:resnet10t x digits x linear" in line and "->" in line and "McNemar" in line
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1"
    assert "| regression (fails) | random:resnet10t |" in (tmp_path / "s.md").read_text()


def test_small_drop_within_tolerance_passes_auto_but_not_a_zero_tolerance(store, tmp_path, capsys):
    r = _copy(store, tmp_path)
    _worsen(r, "pixels", "knn", 2)
    assert _check(store, r, capsys=capsys)[0] == 0
    code, out = _check(store, r, "--tolerance", "0", capsys=capsys)
    assert code == 1 and "tolerance 0.00 points" in out


def test_missing_rows_fail_unless_allowed(store, tmp_path, capsys):
    r = _copy(store, tmp_path)
    victim = next(
        p for p in records_dir(r).glob("*.json") if read_unit_file(p)[0].backbone == "pixels"
    )
    victim.unlink()
    code, out = _check(store, r, capsys=capsys)
    assert code == 1 and "MISSING" in out
    assert _check(store, r, "--allow-missing", capsys=capsys)[0] == 0


def test_changed_setting_fails_unless_allowed(store, tmp_path, capsys):
    r = _copy(store, tmp_path)
    for p in records_dir(r).glob("*.json"):
        if read_unit_file(p)[0].protocol["name"] == "knn":
            p.unlink()
    args = ["run", "--backbone", "pixels", *RUN, "--results-dir", str(r), "--protocol", "knn"]
    assert main([*args, "--set", "temperature=0.2", "--cache-dir", str(store / "cache")]) == 0
    capsys.readouterr()
    code, out = _check(store, r, "--allow-missing", capsys=capsys)
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith("CHANGED"))
    assert "pixels x digits x knn" in line and "temperature: 0.07 -> 0.2" in line
    assert _check(store, r, "--allow-missing", "--allow-changed-setting", capsys=capsys)[0] == 0


def test_retrained_same_recipe_is_compared_other_weights_are_a_changed_setting(store):
    (row,) = [
        x for x in frame_rows(store / "r") if x["backbone"] == "pixels" and x["protocol"] == "knn"
    ]
    other = json.loads(json.dumps(row))
    other["setting"]["hash"] = "x"
    other["setting"]["summary"]["row"]["weights"] = "another-sha"
    assert _setting_difference(row, other)[0] == "changed"  # no recipe: other weights
    row["recipe"] = other["recipe"] = "r1"
    assert _setting_difference(row, other)[0] == "retrained"
    other["recipe"] = "r2"
    assert _setting_difference(row, other)[0] == "changed"
    row2 = dict(row, recipe="r1")
    other2 = dict(other, recipe="r1")
    res = check([row2], [other2])  # one training run in the baseline: no tolerance to judge by
    assert [f.kind for f in res.findings] == ["unverifiable"] and res.exit_code == 0
    assert check([row2], [other2], strict=True).exit_code == 1


def test_usage_errors_are_one_line(store, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for args in (
        ["check", "--baseline", str(bad)],
        ["check", "--baseline", str(tmp_path / "none.json")],
        ["check", "--baseline", str(store / "base.json"), "--tolerance", "lots"],
        ["baseline", "--results-dir", str(store / "r"), "--out", str(store / "base.json")],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ssl-eval: error:"), err
    out = tmp_path / "b2.json"
    assert main(["baseline", "--results-dir", str(store / "r"), "--out", str(out)]) == 0
    assert main(["baseline", "--results-dir", str(store / "r"), "--out", str(out), "--update"]) == 0


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_round_trips_the_frame(store, tmp_path, fmt):
    from ssl_eval.records.frame import load_frame

    out = tmp_path / f"x.{fmt}"
    assert (
        main(["export", "--format", fmt, "--results-dir", str(store / "r"), "--out", str(out)]) == 0
    )
    frame = load_frame(store / "r")
    back = pd.read_csv(out) if fmt == "csv" else pd.read_json(out, lines=True)
    assert len(back) == len(frame) == 4
    assert sorted(back["backbone"]) == sorted(frame["backbone"])
    np.testing.assert_allclose(sorted(back["top1"]), sorted(frame["top1"]))


def _row(backbone, protocol, value, setting):
    return {
        "backbone": backbone,
        "dataset": "shapes",
        "protocol": protocol,
        "seed": 0,
        "metric": "top1",
        "value": value,
        "ci95": [value - 0.02, value + 0.02],
        "setting": {
            "hash": setting,
            "row": "r",
            "column": "c",
            "summary": {"row": {}, "column": {}},
        },
        "recipe": None,
        "train_seed": None,
        "weights": None,
        "per_sample_correct": None,
        "n_test": None,
        "time": "2026-12-06T00:00:00Z",
    }


def test_a_row_the_reference_lacks_is_listed_not_judged(tmp_path):
    """A suite that adds a protocol (mae x attentive) checked against a reference without it:
    the new row is neither passed nor failed. It is listed as NEW with 'no reference, not
    judged', left out of the rows compared, counted in the verdict under that name, and a
    JUnit skip, never a passing test case."""
    from ssl_eval.report.gate import junit_xml, summary_markdown

    base = [_row("mae", "linear", 0.40, "h1")]
    current = [_row("mae", "linear", 0.40, "h1"), _row("mae", "attentive@capi", 0.45, "h2")]
    res = check(base, current, two_sided=True)
    new = [f for f in res.findings if f.kind == "new"]
    assert [(f.backbone, f.protocol, f.new) for f in new] == [("mae", "attentive@capi", 0.45)]
    assert res.exit_code == 0 and not res.failed(new[0])
    assert "no reference, not judged" in new[0].line()
    verdict = res.verdict()
    assert "PASS: 1 row(s) compared" in verdict
    assert "1 new (no reference, not judged)" in verdict
    suite = ET.fromstring(junit_xml(res)).find("testsuite")
    assert suite.get("tests") == "2" and suite.get("skipped") == "1"
    case = next(c for c in suite.findall("testcase") if "attentive" in c.get("classname"))
    assert case.find("skipped") is not None and case.find("system-out") is None
    assert "no reference, not judged" in summary_markdown(res, tmp_path / "b.json")
