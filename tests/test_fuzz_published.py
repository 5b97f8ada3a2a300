"""Property tests (hypothesis; tests/fuzzing.py) over published-numbers files (``--published
FILE`` on ``reproduce`` and ``report``): the shipped file with values replaced, removed or
retyped at any depth, and any bytes (read_yaml's own faults are fuzzed on card files in
tests/test_fuzz.py), load as a valid ``Published`` or end in a one-line ``UserError``. Each
crash found stays as an @example."""

from __future__ import annotations

import math

import pytest
import yaml
from fuzzing import FEW, mutated_docs, one_line
from hypothesis import example, given
from hypothesis import strategies as st

from ssl_eval.core.errors import UserError
from ssl_eval.protocols.published import EVALUATIONS, METRICS, load_published, published_path

SHIPPED = yaml.safe_load(published_path().read_text())
# three entries carry every field (the first two an own-head evaluation, the third a paper's
# figure) and the datasets section: the mutations reach all of them
# at a tenth of the whole file's cost per example
SMALL = SHIPPED | {"entries": SHIPPED["entries"][:3]}


def _load_or_one_line(p) -> None:
    try:
        pub = load_published(p)
    except UserError as e:
        one_line(e)
        return
    for e in pub.entries:  # what loads is what the schema promises
        assert e.metric in METRICS and math.isfinite(e.value) and 0 < e.value <= 100
        assert e.evaluation in EVALUATIONS
        assert e.source.strip() and "\n" not in e.source.strip()
    keys = [(e.tag, e.dataset, e.recipe, e.metric) for e in pub.entries]
    assert len(keys) == len(set(keys))


@pytest.mark.slow
@FEW
@given(doc=mutated_docs(SMALL))
@example(doc=SMALL | {"entries": [{"dataset": "d"}]})  # a missing field was a TypeError
@example(doc=SMALL | {"entries": [SMALL["entries"][0] | {"evaluation": None}]})
@example(doc=SMALL | {"entries": [SMALL["entries"][0] | {"evaluation": "own"}]})
def test_any_edit_of_the_published_file_loads_or_is_one_line(tmp_path, doc):
    p = tmp_path / "published.yaml"
    p.write_text(yaml.safe_dump(doc))
    _load_or_one_line(p)


@FEW
@given(data=st.binary(max_size=200))
@example(data=b"version: 1\nentries: {}\n")
@example(data=b"version: 1\nentries: [1]\ndatasets: [x]\n")
@example(data=b"\xff\xfe")
def test_any_bytes_as_a_published_file_load_or_are_one_line(tmp_path, data):
    p = tmp_path / "published.yaml"
    p.write_bytes(data)
    _load_or_one_line(p)
