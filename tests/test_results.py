import json
import os

import pytest

from ssl_eval.core.files import atomic_write_json
from ssl_eval.records.schema import ResultRecord
from ssl_eval.records.store import load_records
from ssl_eval.report.leaderboard import write_leaderboard


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]  # no temp file left behind


def _rec(
    backbone,
    dataset,
    protocol,
    value,
    time="2026-01-01T00:00:00+00:00",
    run_id="r1",
    seed=0,
    params=None,
    image_size=None,
    fingerprint="fp",
    ci95=None,
    ptype=None,
    seeded=True,
):
    """A complete schema-2 record whose setting is built as the evaluator builds it."""
    from ssl_eval.records.schema import make_setting

    proto = {
        "name": protocol,
        "version": 1,
        "type": ptype or protocol,
        "params": params or {"x": 1},
    }
    ds = {"name": dataset, "fingerprint": {"f": fingerprint}}
    weights = {"source": "file", "sha256": f"sha-{backbone}"}
    setting = make_setting(
        backbone,
        weights,
        {"crop": 32},
        "model",
        proto,
        ds,
        {"val_fraction": 0.1, "split_seed": 0},
        {"dtype": "float16", "image_size": image_size, "feature_kind": None},
    )
    return {
        "schema_version": 2,
        "run_id": run_id,
        "time": time,
        "unit": f"{backbone}-{protocol}",
        "backbone": backbone,
        "weights": weights,
        "load_report": {},
        "preprocessing": {"crop": 32},
        "feature_kind": "model",
        "protocol": proto,
        "dataset": ds,
        "split": {"val_fraction": 0.1, "split_seed": 0},
        "metric": "top1",
        "value": value,
        "seed": seed,
        "wall_time_s": 0.0,
        "peak_memory_mb": 0.0,
        "device": "cpu",
        "packages": {},
        "code_version": "test",
        "ci95": ci95,
        "ci_method": "bootstrap-test" if ci95 else "",
        "setting": setting,
        "seed_dependent": seeded,
    }


def _board(tmp_path, recs):
    atomic_write_json(tmp_path / "records" / "x-r1.json", {"schema_version": 2, "records": recs})
    csv_path, md_path = write_leaderboard(tmp_path)
    return csv_path.read_text(), md_path.read_text()


def test_leaderboard_marks_best_and_uses_newest(tmp_path):
    recs = [
        _rec("a", "d", "knn", 0.5),
        _rec("b", "d", "knn", 0.7),
        _rec("a", "d", "knn", 0.9, time="2026-02-01T00:00:00+00:00", run_id="r2"),
        _rec("b", "d", "linear", 0.6),
    ]
    csv_text, md = _board(tmp_path, recs)
    assert "| a | **90.00** |  |" in md and "| b | 70.00 | **60.00** |" in md
    lines = csv_text.splitlines()
    assert (
        lines[0]
        == "backbone,d / knn,d / knn ±,d / knn interval,d / linear,d / linear ±,d / linear interval"
    )
    assert lines[-1] == "best,a,,,b,,"


def test_leaderboard_shows_interval_and_aggregates_seeds(tmp_path):
    recs = [
        _rec("a", "d", "linear", 0.80, ci95=[0.78, 0.82]),
        _rec("b", "d", "linear", 0.70, run_id="s0", seed=0, ci95=[0.68, 0.72]),
        _rec("b", "d", "linear", 0.72, run_id="s1", seed=1, ci95=[0.70, 0.74]),
    ]
    _, md = _board(tmp_path, recs)
    assert "| a | **80.00 ± 2.00ᵇ** |" in md  # one run: the bootstrap interval, marked as such
    assert "| b | 71.00 ± 12.71 (n=2)ˢ |" in md  # t interval over the two seeds (t_0.975,1 = 12.71)
    assert "ᵇ 95% bootstrap interval over test images" in md and "ˢ 95% t interval over seeds" in md


def test_different_settings_never_share_a_cell(tmp_path):
    """Two seeds run with different learning-rate grids are two settings, not one mean; a run at
    another image size gets a column of its own instead of disappearing behind the default."""
    recs = [
        _rec("a", "d", "linear", 0.80, seed=0, params={"lrs": [0.1]}, ci95=[0.78, 0.82]),
        _rec(
            "a", "d", "linear", 0.81, seed=1, params={"lrs": [0.1]}, ci95=[0.79, 0.83], run_id="r2"
        ),
        _rec(
            "a", "d", "linear", 0.10, seed=1, params={"lrs": [30.0]}, ci95=[0.08, 0.12], run_id="r3"
        ),
        _rec("a", "d", "knn", 0.70, ci95=[0.68, 0.72], seeded=False),
        _rec(
            "a",
            "d",
            "knn",
            0.20,
            ci95=[0.18, 0.22],
            seeded=False,
            image_size=4,
            time="2026-03-01T00:00:00+00:00",
        ),
    ]
    csv_text, md = _board(tmp_path, recs)
    header = md.splitlines()[4]
    assert header == "| backbone | d / knn | d / knn [@4px] | d / linear | d / linear [lrs=30] |"
    assert (
        "| a | **70.00 ± 2.00ᵇ** | **20.00 ± 2.00ᵇ** | **80.50 ± 6.35 (n=2)ˢ** | **10.00 ± 2.00ᵇ** |"
        in md
    )
    assert "## Settings" in md and "protocol.params.lrs=30" in md
    assert "d / linear [lrs=30]" in csv_text.splitlines()[0]


def test_two_datasets_of_one_name_are_two_columns(tmp_path):
    recs = [
        _rec("a", "val_set", "knn", 0.5, fingerprint="one"),
        _rec("a", "val_set", "knn", 0.6, fingerprint="two"),
    ]
    _, md = _board(tmp_path, recs)
    header = md.splitlines()[4]
    assert header.count("val_set#") == 2 and "knn" in header


def test_seed_independent_setting_shows_its_bootstrap_interval_not_a_zero_spread(tmp_path):
    recs = [
        _rec("a", "d", "knn", 0.70, seed=s, run_id=f"s{s}", ci95=[0.68, 0.72], seeded=False)
        for s in range(3)
    ]
    _, md = _board(tmp_path, recs)
    assert "70.00 ± 2.00ᵇ" in md and "(n=3)" not in md and "± 0.00" not in md


def test_interval_is_clipped_to_the_metric_range(tmp_path):
    recs = [_rec("a", "d", "linear", v, seed=s, run_id=f"s{s}") for s, v in enumerate([0.99, 1.0])]
    _, md = _board(tmp_path, recs)
    row = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert "100.00]" in row and "[" in row  # asymmetric: [lo, 100.00], never above 100
    lo = float(row.split("[")[1].split(",")[0])
    assert 0 <= lo <= 99.5


def test_markdown_names_are_escaped(tmp_path):
    _, md = _board(tmp_path, [_rec("a|b", "d", "my|card", 0.5)])
    assert "a\\|b" in md and "my\\|card" in md


def test_compare_refuses_records_of_different_settings(tmp_path):
    from ssl_eval.core.errors import UserError
    from ssl_eval.report.compare import compare

    recs = [
        _rec("a", "d", "linear", 0.8, params={"lrs": [0.1]}),
        _rec("b", "d", "linear", 0.7, params={"lrs": [30.0]}),
    ]
    atomic_write_json(tmp_path / "records" / "x-r1.json", {"schema_version": 2, "records": recs})
    with pytest.raises(
        UserError, match=r"different settings \(b has: lrs=30\).*--allow-different-settings"
    ):
        compare(tmp_path, "a", "b")
    rows = compare(tmp_path, "a", "b", allow_different_settings=True)
    assert rows[0]["settings_differ"] == "lrs=30"


def test_unreadable_record_file_is_skipped(tmp_path, capsys):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "bad.json").write_text("{not json")
    assert load_records(tmp_path) == []
    assert "skipping" in capsys.readouterr().err


def test_record_reader_is_typed_and_skips_records_missing_fields(tmp_path, capsys):
    good = _rec("a", "d", "knn", 0.5)
    broken = {k: v for k, v in good.items() if k != "value"}
    atomic_write_json(
        tmp_path / "records" / "good-r1.json", {"schema_version": 2, "records": [good]}
    )
    atomic_write_json(
        tmp_path / "records" / "bad-r1.json", {"schema_version": 2, "records": [broken]}
    )
    recs = load_records(tmp_path)
    assert [(r.backbone, r.value) for r in recs] == [("a", 0.5)]
    assert isinstance(recs[0], ResultRecord)
    assert "bad-r1.json" in capsys.readouterr().err


def _write_raw(tmp_path, name, data: bytes):
    (tmp_path / "records").mkdir(exist_ok=True)
    (tmp_path / "records" / name).write_bytes(data)


@pytest.mark.parametrize(
    "name,content",
    [
        ("utf8-r1.json", b'{"schema_version": 2, "records": [\xff\xfe]}'),
        ("shape-r1.json", b"[1, 2, 3]"),
        ("records-str-r1.json", b'{"records": "nope"}'),
        ("dataset-str-r1.json", None),  # a record whose dataset is a string
        ("value-str-r1.json", None),  # a record whose value is text
        ("newer-r1.json", None),  # a record of a newer schema
        ("checksum-r1.json", None),  # edited after writing
    ],
)
def test_bad_record_files_are_skipped_with_a_warning_naming_them(tmp_path, capsys, name, content):
    good = _rec("a", "d", "knn", 0.5)
    atomic_write_json(
        tmp_path / "records" / "good-r1.json", {"schema_version": 2, "records": [good]}
    )
    if content is None:
        bad = dict(good)
        if name.startswith("dataset"):
            bad["dataset"] = "d"
        elif name.startswith("value"):
            bad["value"] = "high"
        elif name.startswith("newer"):
            bad["schema_version"] = 99
        body = {"schema_version": 2, "records": [bad]}
        if name.startswith("checksum"):
            from ssl_eval.core.files import sha256_json

            body["sha256"] = sha256_json([bad])
            body["records"][0] = dict(bad, value=0.99)  # a number changed by hand
        content = json.dumps(body).encode()
    _write_raw(tmp_path, name, content)
    recs = load_records(tmp_path)
    assert [(r.backbone, r.value) for r in recs] == [("a", 0.5)]
    assert name in capsys.readouterr().err
    write_leaderboard(tmp_path)  # the table still builds


def test_a_damaged_record_does_not_count_as_done(tmp_path, capsys):
    from ssl_eval.records.store import unit_done

    good = _rec("a", "d", "knn", 0.5)
    atomic_write_json(tmp_path / "records" / "u1-r1.json", {"schema_version": 2, "records": [good]})
    assert unit_done(tmp_path, "u1")
    p = tmp_path / "records" / "u1-r1.json"
    p.write_bytes(p.read_bytes()[:40])  # truncated
    assert not unit_done(tmp_path, "u1") and "counts as not done" in capsys.readouterr().err


def test_a_column_at_the_backbones_own_size_is_labelled_so(tmp_path):
    """When most records of a protocol ran at --image-size N, the column at the backbone's own
    size is labelled 'native size' (the label read 'size None')."""
    recs = [
        _rec("a", "d", "knn", 0.70, ci95=[0.68, 0.72], seeded=False, image_size=4),
        _rec("b", "d", "knn", 0.60, ci95=[0.58, 0.62], seeded=False, image_size=4),
        _rec("c", "d", "knn", 0.50, ci95=[0.48, 0.52], seeded=False),
    ]
    _, md = _board(tmp_path, recs)
    assert md.splitlines()[4] == "| backbone | d / knn | d / knn [native size] |"


def test_compare_of_backbones_with_dense_records_only_says_it_pairs_top1(tmp_path):
    """compare pairs top-1 on the same test images: two backbones with only mIoU records were
    'no results for backbone ...; have: []'; the line says they have mIoU records, which
    compare does not pair, and where their numbers are."""
    from ssl_eval.core.errors import UserError
    from ssl_eval.report.compare import compare

    recs = [_rec(b, "shapes-seg", "knnseg@capi", 0.2) | {"metric": "miou"} for b in "ab"]
    atomic_write_json(tmp_path / "records" / "x-r1.json", {"schema_version": 2, "records": recs})
    with pytest.raises(UserError) as e:
        compare(tmp_path, "a", "b")
    assert "have: []" not in str(e.value) and "miou" in str(e.value), str(e.value)
    assert "top-1" in str(e.value) and "leaderboard" in str(e.value)
