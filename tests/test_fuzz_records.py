"""Fuzzing the record reader (tests/fuzzing.py): any edit of a real record file, any bytes
or a truncated file is read, or refused in one line (``ValueError``, which ``load_records``
and the frame turn into a warning naming the file); never another exception."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fuzzing import FEW, FUZZ, mutated_docs, one_line
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_eval.core.files import sha256_json
from ssl_eval.records.frame import unit_row, units_of
from ssl_eval.records.schema import ResultRecord
from ssl_eval.records.store import load_records, read_unit_file
from ssl_eval.report.leaderboard import build_table

# ---------------------------------------------------------------- record files


@pytest.fixture(scope="module")
def real_record_file(tmp_path_factory):
    """A record file as ``ssl-eval run`` writes it (pixels, k-NN, digits)."""
    from ssl_eval.cli import main

    tmp = tmp_path_factory.mktemp("rec")
    args = ["run", "--backbone", "pixels", "--dataset", "digits", "--protocol", "knn"]
    args += ["--no-progress", "--no-leaderboard", "--results-dir", str(tmp / "r")]
    assert main([*args, "--cache-dir", str(tmp / "c")]) == 0
    (path,) = (tmp / "r" / "records").glob("*.json")
    return json.loads(path.read_text())


def _check_records(recs: list[ResultRecord]) -> None:
    for r in recs:
        assert isinstance(r, ResultRecord)
        json.dumps(r.to_dict(), default=str)
    if recs:  # what the leaderboard builds from them: their frame rows, then the table
        build_table(pd.DataFrame([unit_row(Path("fuzzed.json"), g) for g in units_of(recs)]))


@FEW
@given(data=st.data())
@pytest.mark.slow
def test_any_edit_of_a_record_file_is_read_or_refused_in_one_line(real_record_file, data):
    doc = data.draw(mutated_docs(real_record_file))
    recs = doc.get("records")
    for rec in recs if isinstance(recs, list) else []:
        try:
            _check_records([ResultRecord.from_dict(rec)])
        except ValueError as e:
            one_line(e)


@FEW
@given(data=st.data())
@pytest.mark.slow
def test_any_record_file_is_read_or_skipped_with_a_warning(
    real_record_file, tmp_path_factory, data
):
    text = json.dumps(data.draw(mutated_docs(real_record_file)), default=str)
    raw = data.draw(
        st.one_of(
            st.just(text.encode()),
            st.integers(0, len(text)).map(lambda n: text[:n].encode()),  # truncated
            st.binary(max_size=100),
        )
    )
    folder = tmp_path_factory.mktemp("store")
    path = folder / "records" / "u-r.json"
    path.parent.mkdir()
    path.write_bytes(raw)
    try:
        _check_records(read_unit_file(path))
    except ValueError as e:
        one_line(e)
    recs = load_records(folder)  # never raises: a bad file is skipped with a warning
    _check_records(recs)


@settings(FUZZ, max_examples=1)
@given(depth=st.sampled_from([100_000]))
def test_a_deeply_nested_record_file_is_refused_in_one_line(tmp_path, depth):
    path = tmp_path / "records" / "u-r.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"[" * depth)
    with pytest.raises(ValueError) as e:
        read_unit_file(path)
    one_line(e.value)
    assert load_records(tmp_path) == []


def test_the_frame_reader_skips_what_the_record_reader_refuses(real_record_file, tmp_path):
    from ssl_eval.records.frame import load_frame

    recs = tmp_path / "records"
    recs.mkdir()
    (recs / "good-r.json").write_text(json.dumps(real_record_file))
    (recs / "deep-r.json").write_bytes(b"[" * 100_000)
    (recs / "bytes-r.json").write_bytes(b"\xff\x00{")
    two = [{**r, "unit": f"u{i}"} for i, r in enumerate(real_record_file["records"] * 2)]
    (recs / "two-r.json").write_text(json.dumps({"records": two, "sha256": sha256_json(two)}))
    frame = load_frame(tmp_path)  # a file of two units' records gives one row per unit
    assert sorted(frame["file"]) == ["good-r.json"] + ["two-r.json"] * len(two)
    units = frame.loc[frame["file"] == "two-r.json", "unit"]
    assert sorted(units) == sorted(f"u{i}" for i in range(len(two)))
