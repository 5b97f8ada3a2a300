"""Shared hypothesis settings, strategies and checks for the fuzz tests (tests/test_fuzz*.py):
any input ends in a valid object or a one-line error of the kind the caller expects, never
another exception, never a hang. Searches are derandomized (CI sees the same inputs every time)
and example counts bounded."""

from __future__ import annotations

import copy
import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ssl_eval.core.files import sha256_json

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
FEW = settings(FUZZ, max_examples=25)


def one_line(e: BaseException) -> None:
    text = str(e)
    assert text and "\n" not in text and "\r" not in text, repr(text)


def assert_finite(obj) -> None:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        for v in obj:
            assert_finite(v)
    elif isinstance(obj, float):
        assert math.isfinite(obj)


# JSON-like values: what YAML or JSON can hand to a reader
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_docs(draw, doc):
    """The real record file with a few of its values (at any depth) replaced, removed or
    retyped; the checksum usually redone, so the record itself is read and checked."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        node = doc
        try:
            for k in path[:-1]:
                node = node[k]
            if draw(st.booleans()) and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = draw(values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed or retyped the way there
    if draw(st.integers(0, 4)) and isinstance(doc, dict) and isinstance(doc.get("records"), list):
        doc["sha256"] = sha256_json(doc["records"])
    return doc
