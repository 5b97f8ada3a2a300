import json
import os

import pytest

from ssl_eval.fsutil import atomic_write_json
from ssl_eval.leaderboard import write_leaderboard
from ssl_eval.results import ResultRecord, load_records


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


def _rec(backbone, dataset, protocol, value, time="2026-01-01T00:00:00+00:00", run_id="r1"):
    """A complete record (every schema field) with the given identity and value."""
    return {
        "schema_version": 1, "run_id": run_id, "time": time, "unit": f"{backbone}-{protocol}",
        "backbone": backbone, "weights": {}, "load_report": {}, "preprocessing": {},
        "feature_kind": "model", "protocol": {"name": protocol}, "dataset": {"name": dataset},
        "split": {}, "metric": "top1", "value": value, "seed": 0, "wall_time_s": 0.0,
        "peak_memory_mb": 0.0, "device": "cpu", "packages": {}, "code_version": "test",
    }


def test_leaderboard_marks_best_and_uses_newest(tmp_path):
    recs = [
        _rec("a", "d", "knn", 0.5), _rec("b", "d", "knn", 0.7),
        _rec("a", "d", "knn", 0.9, time="2026-02-01T00:00:00+00:00", run_id="r2"),
        _rec("b", "d", "linear", 0.6),
    ]
    atomic_write_json(tmp_path / "records" / "x-r1.json", {"schema_version": 1, "records": recs})
    csv_path, md_path = write_leaderboard(tmp_path)
    md = md_path.read_text()
    assert "| a | **90.00** |  |" in md and "| b | 70.00 | **60.00** |" in md
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "backbone,d / knn,d / knn ±,d / linear,d / linear ±" and lines[-1] == "best,a,,b,"


def test_leaderboard_shows_interval_and_aggregates_seeds(tmp_path):
    recs = [
        _rec("a", "d", "knn", 0.80) | {"ci95": [0.78, 0.82]},
        _rec("b", "d", "knn", 0.70, run_id="s0") | {"seed": 0, "ci95": [0.68, 0.72]},
        _rec("b", "d", "knn", 0.72, run_id="s1") | {"seed": 1, "ci95": [0.70, 0.74]},
    ]
    atomic_write_json(tmp_path / "records" / "x-r1.json", {"schema_version": 1, "records": recs})
    _, md_path = write_leaderboard(tmp_path)
    md = md_path.read_text()
    assert "| a | **80.00 ± 2.00** |" in md
    assert "| b | 71.00 ± 12.71 (n=2) |" in md  # t interval over the two seeds (t_0.975,1 = 12.71)


def test_unreadable_record_file_is_skipped(tmp_path, capsys):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "bad.json").write_text("{not json")
    assert load_records(tmp_path) == []
    assert "skipping" in capsys.readouterr().err


def test_record_reader_is_typed_and_skips_records_missing_fields(tmp_path, capsys):
    good = _rec("a", "d", "knn", 0.5)
    broken = {k: v for k, v in good.items() if k != "value"}
    atomic_write_json(tmp_path / "records" / "good-r1.json", {"schema_version": 1, "records": [good]})
    atomic_write_json(tmp_path / "records" / "bad-r1.json", {"schema_version": 1, "records": [broken]})
    recs = load_records(tmp_path)
    assert [(r.backbone, r.value) for r in recs] == [("a", 0.5)]
    assert isinstance(recs[0], ResultRecord)
    assert "bad-r1.json" in capsys.readouterr().err
