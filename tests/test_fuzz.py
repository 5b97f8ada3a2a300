"""Property tests (hypothesis; settings and strategies in tests/fuzzing.py) over what a user
types: protocol cards (parsed and as files), ``--set`` on cards and on the trainer, names that
reach the leaderboard and the report, and the CLI's error line. Any input ends in a valid
object or a one-line ``UserError``, never another exception, never a hang. Record files:
test_fuzz_records.py; checkpoints and trained sidecars: test_fuzz_checkpoints.py. Each crash
the fuzzers found is kept as an @example."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser

import pytest
from fuzzing import FUZZ, assert_finite, one_line, scalars, values
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ssl_eval.core.config import apply_set, parse_set
from ssl_eval.core.errors import UserError
from ssl_eval.core.files import sha256_json
from ssl_eval.protocols.base import PROTOCOL_TYPES
from ssl_eval.protocols.cards import load_card, load_cards, parse_card

# ---------------------------------------------------------------- cards

PARAM_NAMES = sorted(
    {f for t in PROTOCOL_TYPES.names() for f in PROTOCOL_TYPES.get(t).params.__dataclass_fields__}
)
card_keys = st.sampled_from(
    ["name", "version", "type", "description", "selection_split", "params", "other"]
)


@st.composite
def raw_cards(draw):
    """Parsed card documents near the real ones: real keys, real types and param names, any
    values."""
    raw = {
        "name": draw(st.one_of(st.text(max_size=10), values)),
        "version": draw(st.one_of(st.integers(-2, 5), values)),
        "type": draw(st.one_of(st.sampled_from(PROTOCOL_TYPES.names()), values)),
    }
    params = draw(
        st.one_of(
            st.dictionaries(st.sampled_from(PARAM_NAMES), values, max_size=4),
            st.dictionaries(st.sampled_from(PARAM_NAMES), scalars, max_size=3),
            values,
        )
    )
    raw["params"] = params
    extra = draw(st.dictionaries(card_keys, values, max_size=2))
    for k in draw(st.sets(st.sampled_from(["name", "version", "type", "params"]), max_size=1)):
        raw.pop(k)
    return {**raw, **extra} if draw(st.booleans()) else raw


@pytest.mark.slow
@FUZZ
@given(raw=st.one_of(raw_cards(), values))
@example(raw={"name": "x", "version": 1, "type": "linear", "params": {"lrs": [float("nan")]}})
@example(raw={"name": "x", "version": 1, "type": "knn", "params": {"k": 2**70}})
def test_any_parsed_card_is_a_card_or_one_line(raw):
    try:
        card = parse_card(copy.deepcopy(raw), "fuzz.yaml")
    except UserError as e:
        one_line(e)
        return
    assert_finite(card.params)  # a card that loads holds numbers, and can be recorded
    json.dumps(card.to_record(), default=str)


CARD = b"name: x\nversion: 1\ntype: linear\nparams:\n  epochs: 3\n"


@pytest.mark.slow
@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.tuples(st.integers(0, len(CARD)), st.binary(max_size=8)).map(
            lambda t: CARD[: t[0]] + t[1] + CARD[t[0] :]
        ),
    )
)
@example(data=b"[" * 5000)  # deeper than the YAML parser's recursion
@example(data=b"{a: " * 3000)
@example(data=b"\xff\xfe")
def test_any_card_file_is_a_card_or_one_line(tmp_path, data):
    p = tmp_path / "card.yaml"
    p.write_bytes(data)
    try:
        load_card(str(p))
    except UserError as e:
        one_line(e)


# ---------------------------------------------------------------- --set

assignments = st.one_of(
    st.text(max_size=40),
    st.tuples(
        st.sampled_from(PARAM_NAMES + ["params.epochs", "linear.lrs", "knn.k", "a.b.c", ""]),
        st.sampled_from(["=", "", "==", " = "]),
        st.one_of(st.text(max_size=20), values.map(json.dumps)),
    ).map("".join),
)


@pytest.mark.slow
@FUZZ
@given(assignment=assignments)
@example(assignment="k=" + "[" * 5000)
@example(assignment="=1")
@example(assignment="a..b=1")
def test_any_set_assignment_is_parsed_or_one_line(assignment):
    try:
        key, _ = parse_set(assignment)
        assert key
        out = apply_set({"a": {"b": 1}, "c": 2}, assignment)
        assert isinstance(out, dict)
    except UserError as e:
        one_line(e)


@pytest.mark.slow
@FUZZ
@given(overrides=st.lists(assignments, max_size=3))
@example(overrides=["k=.nan"])
@example(overrides=["lrs=[.inf]"])
@example(overrides=["linear.lrs=[.nan]"])
def test_any_set_on_real_cards_is_a_card_or_one_line(overrides):
    try:
        cards = load_cards(["knn", "linear"], overrides)
    except UserError as e:
        one_line(e)
        return
    for c in cards:
        assert_finite(c.params)
        json.dumps(c.to_record(), default=str)


TRAIN_KEYS = [
    "epochs",
    "batch_size",
    "image_size",
    "optim.base_lr",
    "optim.weight_decay",
    "optim.momentum",
    "optim.warmup_epochs",
    "optim.name",
    "method_cfg.temperature",
    "method_cfg.proj_dim",
    "aug.global_views",
    "aug.local_views",
    "monitor.knn_bank",
    "arch",
]


@FUZZ
@given(
    overrides=st.lists(
        st.tuples(st.sampled_from(TRAIN_KEYS), values.map(json.dumps)).map("=".join),
        max_size=3,
    )
)
@example(overrides=["method_cfg.temperature=.nan"])
@example(overrides=["optim.weight_decay=.inf"])
def test_any_trainer_set_is_a_config_or_one_line(overrides):
    """``ssl-eval train --set``: a valid, finite training config or a one-line refusal."""
    from ssl_eval.train.resolve import resolve_config

    try:
        cfg = resolve_config("simclr", 16, overrides=overrides)
    except UserError as e:
        one_line(e)
        return
    assert_finite(cfg)


def test_the_cli_prints_any_user_error_on_one_line(tmp_path, monkeypatch, capsys):
    """The last net: a UserError whose text carries a library's line breaks is printed on one
    line (the message kept whole)."""
    from ssl_eval.cli import main
    from ssl_eval.orchestrate import evaluate

    def fail(*a, **k):
        raise UserError("cannot adapt w.pt:\n\tMissing key(s): a, b\n\tUnexpected key(s): c")

    monkeypatch.setattr(evaluate, "run", fail)
    assert main(["run", "--backbone", "pixels", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "ssl-eval: error: cannot adapt w.pt: Missing key(s): a, b Unexpected key(s): c\n"


# ---------------------------------------------------------------- names in tables

HOSTILE = st.lists(
    st.sampled_from(list("ab|`\\<>&\"'/* \n\r\t_[]()!#:-") + ["<script>", "</td>", "| x |"]),
    min_size=1,
    max_size=8,
).map("".join)
_PIPE = re.compile(r"(?<!\\)(?:\\\\)*\|")  # a pipe not escaped by a backslash


def _cells(line: str) -> int:
    return len(_PIPE.findall(line))


def _tables_hold(lines: list[str]) -> None:
    """Every markdown table row has as many cell separators as its header."""
    header = None
    for line in lines:
        if line.startswith("|"):
            header = header if header is not None else _cells(line)
            assert _cells(line) == header, line
        else:
            header = None


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)


@pytest.mark.slow
@settings(FUZZ, max_examples=30)
@given(backbone=HOSTILE, card=HOSTILE, dataset=HOSTILE)
@example(backbone="<script>x</script>|y", card="my|card", dataset="d")
@example(backbone="a\\|b", card="c\\", dataset="|")
@example(backbone="\r", card="a", dataset="a")  # a carriage return split a markdown row
def test_any_name_keeps_the_leaderboard_and_report_tables_whole(
    tmp_path_factory, backbone, card, dataset
):
    """A backbone, card or dataset name with pipes, backticks, backslashes, line breaks or
    HTML reaches leaderboard.md, report.md and the HTML report as text: every markdown row
    keeps its cells, the HTML holds no tag the name brought."""
    from test_results import _rec

    from ssl_eval.core.files import atomic_write_json
    from ssl_eval.report import html, markdown
    from ssl_eval.report.leaderboard import headline_table, write_leaderboard

    folder = tmp_path_factory.mktemp("names")
    for i, rec in enumerate([_rec(backbone, dataset, card, 0.5), _rec("x", dataset, card, 0.2)]):
        doc = {"schema_version": 2, "records": [rec], "sha256": sha256_json([rec])}
        atomic_write_json(folder / "records" / f"u{i}-r.json", doc)
    _, md_path = write_leaderboard(folder)
    _tables_hold(md_path.read_text().splitlines())
    from ssl_eval.records.frame import load_frame

    tab = headline_table(load_frame(folder))
    _tables_hold(markdown.leaderboard_md(tab))
    page = _Tags()
    page.feed(html.leaderboard_html(tab))
    allowed = {"p", "label", "select", "option", "table", "thead", "tbody", "tr", "th", "td", "b"}
    assert page.tags <= allowed, page.tags
