"""Property tests (hypothesis) over everything that reads what a user or a disk hands over:
protocol cards, ``--set`` assignments, record files and checkpoint files. Any input ends in a
valid object or a one-line error of the kind the caller expects (``UserError``; ``ValueError``
for a record file, which readers turn into a warning); never another exception, never a hang.

Example counts are bounded and the search derandomized, so CI sees the same inputs every time
and the file runs in well under a minute. Each crash the fuzzer found is kept as an @example.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
from html.parser import HTMLParser

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ssl_eval.backbones.adapters import detect_family
from ssl_eval.backbones.catalog import _ensure_loaded
from ssl_eval.backbones.checkpoints import read_checkpoint
from ssl_eval.backbones.trained_format import FORMAT
from ssl_eval.config import apply_set, parse_set
from ssl_eval.errors import UserError
from ssl_eval.fsutil import sha256_json
from ssl_eval.leaderboard import build_table
from ssl_eval.protocols.base import PROTOCOL_TYPES
from ssl_eval.protocols.cards import load_card, load_cards, parse_card
from ssl_eval.results import ResultRecord, load_records, read_unit_file

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


def _check_records(recs: list[ResultRecord]) -> None:
    for r in recs:
        assert isinstance(r, ResultRecord)
        json.dumps(r.to_dict(), default=str)
    if recs:
        build_table(recs)  # what the leaderboard builds from them


@FEW
@given(data=st.data())
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
    from ssl_eval.frame import load_frame

    recs = tmp_path / "records"
    recs.mkdir()
    (recs / "good-r.json").write_text(json.dumps(real_record_file))
    (recs / "deep-r.json").write_bytes(b"[" * 100_000)
    (recs / "bytes-r.json").write_bytes(b"\xff\x00{")
    two = [{**r, "unit": f"u{i}"} for i, r in enumerate(real_record_file["records"] * 2)]
    (recs / "two-r.json").write_text(json.dumps({"records": two, "sha256": sha256_json(two)}))
    frame = load_frame(tmp_path)  # a file of two units' records would give a row two values
    assert len(frame) == 1 and list(frame["file"]) == ["good-r.json"]


# ---------------------------------------------------------------- checkpoints

KEY_PARTS = [
    "module.",
    "state_dict.",
    "model.",
    "teacher.",
    "student.",
    "backbone.",
    "base_encoder.",
    "momentum_encoder.",
    "resnet.net.0.",
    "encoder.",
    "head.",
    "blocks.0.",
    "blocks.0.0.",
    "layer1.0.",
    "layer4.0.",
    "stages.0.0.",
    "downsample_layers.0.0.",
]
KEY_LEAVES = [
    "conv1.weight",
    "bn1.weight",
    "bn1.running_mean",
    "fc.weight",
    "fc.bias",
    "cls_token",
    "pos_embed",
    "mask_token",
    "reg_token",
    "storage_tokens",
    "register_tokens",
    "patch_embed.proj.weight",
    "attn.qkv.weight",
    "ls1.gamma",
    "gamma_1",
    "norm.weight",
    "fc_norm.weight",
    "decoder_embed.weight",
    "gamma",
    "weight",
    "linear.weight",
    "layers.0.weight",
]
keys = st.tuples(st.lists(st.sampled_from(KEY_PARTS), max_size=3), st.sampled_from(KEY_LEAVES))
tensors = st.lists(st.integers(0, 3), max_size=4).map(lambda s: torch.zeros(s))
leaves = st.one_of(tensors, tensors, scalars)


@st.composite
def state_dicts(draw):
    sd: dict = {}
    for parts, leaf in draw(st.lists(keys, max_size=12)):
        node = sd
        if draw(st.booleans()):  # nested containers, as training scripts save them
            for p in parts:
                node = node.setdefault(p.rstrip("."), {})
                if not isinstance(node, dict):
                    break
            else:
                node[leaf] = draw(leaves)
        else:
            sd["".join(parts) + leaf] = draw(leaves)
    extra = draw(st.dictionaries(st.sampled_from(["arch", "epoch", "args"]), scalars, max_size=2))
    if draw(st.booleans()):
        extra["pytorch-lightning_version"] = "2.0"
    return {**sd, **extra}


def _t(*shape):
    return torch.zeros(shape)


_ensure_loaded()  # every family registers its detector on import

# the least each detector accepts, in its authors' layout; mutated below
LAYOUTS = {
    "supervised": {
        "conv1.weight": _t(2, 3, 7, 7),
        "layer1.0.downsample.0.weight": _t(1),
        "layer4.0.conv3.weight": _t(1),
        "fc.weight": _t(2, 2),
    },
    "cifar_resnet": {"conv1.weight": _t(2, 3, 3, 3), "layer3.0.conv1.weight": _t(1)},
    "simclr": {"resnet": {"net.0.0.weight": _t(2, 3, 7, 7)}, "head": {"w": _t(1)}},
    "mocov3": {"state_dict": {"module.base_encoder.conv1.weight": _t(2, 3, 7, 7)}},
    "dino": {
        "teacher": {
            "backbone.cls_token": _t(1, 1, 4),
            "backbone.pos_embed": _t(1, 5, 4),
            "backbone.blocks.0.attn.qkv.weight": _t(12, 4),
        }
    },
    "dinov2": {"cls_token": _t(1, 1, 4), "pos_embed": _t(1, 5, 4), "blocks.0.ls1.gamma": _t(4)},
    "mae": {
        "model": {
            "cls_token": _t(1, 1, 4),
            "blocks.0.attn.qkv.weight": _t(12, 4),
            "decoder_embed.weight": _t(4, 4),
        }
    },
    "solo": {"pytorch-lightning_version": "2.0", "state_dict": {"backbone.conv1.weight": _t(1)}},
}


@st.composite
def mutated_layouts(draw):
    """A family's layout with keys dropped, shapes changed, a container added and decoys."""
    name = draw(st.sampled_from(sorted(LAYOUTS)))
    flat: dict = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(LAYOUTS[name])
    for k in list(flat):
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "reshape", "plain"]))
        if action == "drop":
            del flat[k]
        elif action == "reshape":
            flat[k] = draw(tensors)
        elif action == "plain":
            flat[k] = draw(scalars)
    prefix = draw(st.sampled_from(["", "", "module.", "state_dict.", "model."]))
    out = {prefix + k: v for k, v in flat.items()}
    for parts, leaf in draw(st.lists(keys, max_size=3)):
        out["".join(parts) + leaf] = draw(leaves)
    return out


def _as_file(tmp_path, obj, name="w.pt"):
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


@FUZZ
@given(sd=st.one_of(mutated_layouts(), mutated_layouts(), state_dicts(), values))
@example(sd={"cls_token": torch.zeros(()), "pos_embed": torch.zeros(0)})
def test_any_state_dict_is_detected_or_refused_in_one_line(tmp_path, sd):
    path = _as_file(tmp_path, sd)
    try:
        family = detect_family(read_checkpoint(path))
    except UserError as e:
        one_line(e)
        return
    assert family.name


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_is_detected_as_its_family(tmp_path, name):
    """The fuzzer's seeds reach every detector: unmutated, each is its family's."""
    assert detect_family(read_checkpoint(_as_file(tmp_path, LAYOUTS[name]))).name == name


REAL = io.BytesIO()
torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.weight": torch.zeros(2, 2)}, REAL)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(0, len(REAL.getvalue())), st.binary(max_size=4)).map(
            lambda t: REAL.getvalue()[: t[0]] + t[1] + REAL.getvalue()[t[0] + len(t[1]) :]
        ),
        st.integers(0, len(REAL.getvalue())).map(lambda n: REAL.getvalue()[:n]),
    ),
    suffix=st.sampled_from([".pt", ".pth", ".safetensors", ".bin"]),
)
def test_any_bytes_as_a_checkpoint_are_refused_in_one_line_or_read(tmp_path, data, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(data)
    try:
        ckpt = read_checkpoint(path)
    except UserError as e:
        one_line(e)
        return
    assert ckpt.flat and all(isinstance(v, torch.Tensor) for v in ckpt.flat.values())
    try:
        detect_family(ckpt)
    except UserError as e:
        one_line(e)


SIDECAR = {
    "format": FORMAT,
    "format_version": 1,
    "architecture": {"name": "cifar_resnet_tiny", "kwargs": {}},
    "preprocessing": {
        "resize": 16,
        "crop": 16,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
    },
    "feature_kind": "avgpool",
}


def _read_sidecar(folder, raw: bytes):
    from ssl_eval.backbones.trained_format import read_sidecar, sidecar_preprocessing

    (folder / "backbone.json").write_bytes(raw)
    try:
        pre = sidecar_preprocessing(read_sidecar(folder))
    except UserError as e:
        one_line(e)
        return
    assert len(pre.mean) == 3 and len(pre.std) == 3
    assert all(isinstance(x, float) for x in pre.mean + pre.std)


@FUZZ
@given(doc=mutated_docs(SIDECAR))
@example(doc={**SIDECAR, "preprocessing": {"mean": 5, "std": None}})
@example(doc={**SIDECAR, "format_version": [1]})
def test_any_edit_of_a_trained_sidecar_is_read_or_refused_in_one_line(tmp_path, doc):
    """The sidecar a trained backbone is rebuilt from (format, architecture, preprocessing)."""
    _read_sidecar(tmp_path, json.dumps(doc).encode())


@FUZZ
@given(raw=st.binary(max_size=60))
@example(raw=b"[" * 100_000)
@example(raw=b"\xff")
def test_any_bytes_as_a_trained_sidecar_are_refused_in_one_line(tmp_path, raw):
    _read_sidecar(tmp_path, raw)


def test_a_library_message_of_several_lines_reaches_the_user_in_one_line(tmp_path):
    """torch's refusal of a damaged file is paragraphs long: the CLI prints one line of it."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    (tmp_path / "w.pt").write_bytes(b"\x00")
    args = ["run", "--backbone", f"ckpt:{tmp_path / 'w.pt'}", "--dataset", "digits"]
    r = subprocess.run(
        [sys.executable, "-m", "ssl_eval.cli", *args, "--results-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        cwd=ROOT,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("building")]
    assert len(lines) == 1 and "corrupt or truncated" in lines[0], r.stderr
    assert "Unsupported operand" in lines[0] and "Weights only load failed" not in lines[0]


def test_the_cli_prints_any_user_error_on_one_line(tmp_path, monkeypatch, capsys):
    """The last net: a UserError whose text carries a library's line breaks is printed on one
    line (the message kept whole)."""
    from ssl_eval import evaluate
    from ssl_eval.cli import main

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


@settings(FUZZ, max_examples=30)
@given(backbone=HOSTILE, card=HOSTILE, dataset=HOSTILE)
@example(backbone="<script>x</script>|y", card="my|card", dataset="d")
@example(backbone="a\\|b", card="c\\", dataset="|")
def test_any_name_keeps_the_leaderboard_and_report_tables_whole(
    tmp_path_factory, backbone, card, dataset
):
    """A backbone, card or dataset name with pipes, backticks, backslashes, line breaks or
    HTML reaches leaderboard.md, report.md and the HTML report as text: every markdown row
    keeps its cells, the HTML holds no tag the name brought."""
    from test_results import _rec

    from ssl_eval.fsutil import atomic_write_json
    from ssl_eval.leaderboard import write_leaderboard
    from ssl_eval.report import html, markdown, table

    folder = tmp_path_factory.mktemp("names")
    for i, rec in enumerate([_rec(backbone, dataset, card, 0.5), _rec("x", dataset, card, 0.2)]):
        doc = {"schema_version": 2, "records": [rec], "sha256": sha256_json([rec])}
        atomic_write_json(folder / "records" / f"u{i}-r.json", doc)
    _, md_path = write_leaderboard(folder)
    _tables_hold(md_path.read_text().splitlines())
    from ssl_eval.frame import load_frame

    tab = table.build_table(load_frame(folder))
    _tables_hold(markdown.leaderboard_md(tab))
    page = _Tags()
    page.feed(html.leaderboard_html(tab))
    allowed = {"p", "label", "select", "option", "table", "thead", "tbody", "tr", "th", "td"}
    assert page.tags <= allowed, page.tags
