"""Choices at the edge of their grid (protocols/_edges.py): a hyperparameter chosen on
validation at its grid's smallest or largest value is recorded (``details["grid_edges"]``),
printed by the run and listed under the leaderboard; an edge the parameter cannot pass (k = 1,
a weight decay of 0) and a choice inside the grid are not."""

import numpy as np
import pytest

from ssl_eval.cli import main
from ssl_eval.protocols._edges import describe, edge, grid_edges
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.knn import KnnParams, run_knn
from ssl_eval.protocols.linear import LinearParams, run_linear
from ssl_eval.report import write_report


def test_edge_counts_the_choices_at_either_end_and_skips_a_floor():
    assert edge("lrs", [0.1, 0.01, 1.0], [0.1]) is None  # inside
    assert edge("lrs", [0.1, 0.01, 1.0], [1.0]) == {
        "param": "lrs", "grid": [0.01, 1.0], "lowest": 0, "highest": 1, "choices": 1,
        "widen": "lrs",
    }  # fmt: skip
    assert edge("weight_decays", [0.0, 0.01], [0.0], floor=0.0) is None
    assert edge("weight_decays", [0.0, 0.01], [0.01], floor=0.0)["highest"] == 1
    assert edge("ks", [1, 5], [1], floor=1) is None
    assert edge("ks", [3, 5], [3], floor=1)["lowest"] == 1
    assert edge("lrs", [0.1], [0.1]) is None  # one value: nothing was chosen
    e = edge("logreg_cs", [0.01, 1, 100], [100, 1, 100, 0.01])
    assert (e["lowest"], e["highest"], e["choices"]) == (1, 2, 4)
    assert describe(e) == (
        "logreg_cs: 0.01, the lowest of the grid [0.01 .. 100] (1 of 4 choices); "
        "100, the highest of the grid [0.01 .. 100] (2 of 4 choices)"
    )
    assert grid_edges(None, None) == {} and grid_edges(e) == {"grid_edges": [e]}


def _blobs(n=400, d=8, classes=4, seed=0):
    g = np.random.default_rng(seed)
    centres = 4 * g.standard_normal((classes, d))
    y = np.arange(n) % classes
    x = (centres[y] + g.standard_normal((n, d))).astype(np.float32)
    return x, y


def _inputs():
    x, y = _blobs()
    xt, yt = _blobs(seed=1)
    return ProtocolInputs(x, y, xt, yt, np.arange(300), np.arange(300, 400), 4)


def test_knn_records_a_lowest_k_unless_it_is_one():
    # clean clusters: every k scores alike on validation, and the tie goes to the smaller k
    assert "grid_edges" not in run_knn(_inputs(), KnnParams(ks=(1, 50))).details
    out = run_knn(_inputs(), KnnParams(ks=(3, 50)))
    assert out.details["selected_k"] == 3
    assert out.details["grid_edges"] == [edge("ks", (3, 50), [3], floor=1)]
    fixed = run_knn(_inputs(), KnnParams(ks=(3, 50), select_k="3"))  # no choice was made
    assert "grid_edges" not in fixed.details


def _sheared(n: int, seed: int):
    """Two classes apart along x0 - x1 only, under noise shared by both dimensions: the class
    means' direction (the first steps from zero) is poor, a trained head is perfect."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 2
    noise = 3 * g.standard_normal(n)
    x0 = np.where(y == 1, 0.5, -0.5) + noise + 0.1 * g.standard_normal(n)
    return np.stack([x0, noise + 0.1 * g.standard_normal(n)], 1).astype(np.float32), y


def test_linear_records_an_edge_only_where_the_choice_is_one():
    (x, y), (xt, yt) = _sheared(400, 0), _sheared(400, 1)
    inp = ProtocolInputs(x, y, xt, yt, np.arange(300), np.arange(300, 400), 2)
    p = dict(weight_decays=(0.0,), epochs=3, min_steps=60, batch_size=64)
    # 1e-7 learns nothing; 10 and 1e30 both separate the classes, and the tie goes to 10
    inside = run_linear(inp, LinearParams(lrs=(1e-7, 10.0, 1e30), **p))
    assert inside.details["selected"]["lr"] == 10.0
    assert "grid_edges" not in inside.details
    top = run_linear(inp, LinearParams(lrs=(1e-7, 1e-6, 0.1), **p))
    assert top.details["selected"]["lr"] == 0.1
    assert top.details["grid_edges"] == [edge("lrs", (1e-7, 1e-6, 0.1), [0.1])]
    wd = run_linear(inp, LinearParams(lrs=(1e-7, 10.0, 1e30), weight_decays=(0.0, 0.5), epochs=3,
                                      min_steps=60, batch_size=64))  # fmt: skip
    assert wd.details["selected"]["weight_decay"] == 0.0 and "grid_edges" not in wd.details


@pytest.mark.slow
def test_run_warns_and_the_leaderboard_lists_the_edge(tmp_path, capsys):
    argv = ["run", "--backbone", "pixels", "--dataset", "digits", "--protocol", "knn"]
    argv += ["--image-size", "16", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main([*argv, "--set", "knn.ks=[1,50]", "--results-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "edge of its grid" not in err
    assert "edge of the grid" not in (tmp_path / "a" / "leaderboard.md").read_text()
    assert main([*argv, "--set", "knn.ks=[3,50]", "--results-dir", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "edge of its grid" in x)
    assert "pixels x digits x knn" in line and "ks: 3, the lowest of the grid [3 .. 50]" in line
    assert "--set knn.ks=" in line
    board = (tmp_path / "b" / "leaderboard.md").read_text()
    section = board.split("## Chosen at the edge of the grid", 1)[1].split("## Settings")[0]
    assert "- **pixels** / digits / knn: ks: 3, the lowest of the grid [3 .. 50]" in section
    # the report holds the same list after its leaderboard, the one without an edge none
    index = write_report(tmp_path / "b", cache_dir=tmp_path / "cache", progress=False)
    page, md = index.read_text(), (index.parent / "report.md").read_text()
    assert "<li><b>pixels</b> / digits / knn: ks: 3, the lowest of the grid [3 .. 50]</li>" in page
    assert "- **pixels** / digits / knn: ks: 3, the lowest of the grid \\[3 .. 50\\]" in md
    assert md.index("## Chosen at the edge") < md.index("## What the numbers say")
    clean = write_report(tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    assert "edge of the grid" not in clean.read_text()


def test_logreg_records_the_top_of_a_c_grid_too_strong_to_fit():
    from ssl_eval.protocols.logreg import LogregParams, run_logreg

    (x, y), (xt, yt) = _sheared(400, 0), _sheared(400, 1)
    inp = ProtocolInputs(x, y, xt, yt, np.arange(300), np.arange(300, 400), 2)
    # C from 1e-4 to 1e-2: the weakest regularisation (the largest C) fits best on validation
    strong = LogregParams(c_exp_min=-4.0, c_exp_max=-2.0, c_num=3, max_iter=200)
    out, cs = run_logreg(inp, strong), strong.grid()
    assert out.details["selected"]["C"] == cs[-1]
    assert out.details["grid_edges"] == [edge("C", cs, [cs[-1]], widen="c_exp_min, c_exp_max")]
    # C from 1e-4 to 1e4: 1 and above separate the classes, the tie goes to C = 1, inside
    wide = run_logreg(inp, LogregParams(c_exp_min=-4.0, c_exp_max=4.0, c_num=5, max_iter=200))
    assert wide.details["selected"]["C"] == 1.0 and "grid_edges" not in wide.details


def test_knnseg_records_its_k_at_an_edge_unless_it_is_one(tmp_path):
    from test_dense_probes import _bundle, _inputs, _pixels

    from ssl_eval.protocols.dense_knn import KnnsegParams, run_knnseg

    # pixel tokens: every k is exact on validation, and the tie goes to the smaller k
    one = run_knnseg(_inputs(_pixels(), _bundle(), tmp_path / "a"), KnnsegParams(ks=(1, 3)))
    assert one.details["k"] == 1 and "grid_edges" not in one.details
    three = run_knnseg(_inputs(_pixels(), _bundle(), tmp_path / "b"), KnnsegParams(ks=(3, 5)))
    assert three.details["k"] == 3
    assert three.details["grid_edges"] == [edge("ks", (3, 5), [3], floor=1)]
