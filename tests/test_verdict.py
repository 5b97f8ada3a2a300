"""The verdict on retrained models (issue 18): a retrained model is another model.

Trained end to end through ``ssl-eval suite`` on a test-sized recipe: a reference of four
training seeds, then another training seed (the honest proxy for another machine's float
rounding) must reproduce it; the same recipe trained by a trainer with a real bug (labels
misaligned with their images), every recipe and setting unchanged, must fail with REGRESSION
rows; a single-run reference must answer "unverifiable", not pass. The statistics are checked
against their formulas, and Holm's correction by a row whose raw p-value lies between 0.05/m
and 0.05."""

import json
import math

import numpy as np
import pytest

from ssl_eval.cli import main
from ssl_eval.core.stats import pack_bits, prediction_test
from ssl_eval.report.baseline import frame_rows, group_runs
from ssl_eval.report.gate import _holm, check

SLOW_FIXTURES = ("ref",)  # module fixtures that train or start processes (conftest)

TINY = """
name: tiny
version: 1
datasets: [shapes]
image_size: 16
baselines: [pixels]
protocols: [knn]
train_defaults:
  arch: cifar_resnet_tiny
  dataset: shapes
  train_subset: 3000
  epochs: 10
  batch_size: 128
  seed: SEED
  monitor: {every: 1000, knn_bank: 200, knn_queries: 100}
models:
  - name: supervised
    method: supervised
    config:
      aug: {global_views: [{size: 16, crop_scale: [0.75, 1.0], jitter_p: 0.0, gray_p: 0.0}]}
"""


def _suite(tmp, seed: int):
    p = tmp / f"tiny-{seed}.yaml"
    p.write_text(TINY.replace("SEED", str(seed)))
    return p


def _run(suite, results, cache, *extra):
    return main(
        [
            "suite",
            str(suite),
            "--results-dir",
            str(results),
            "--cache-dir",
            str(cache),
            "--no-progress",
            "--no-report",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A reference of four training runs (seeds 0-3) and one of a single run (seed 0)."""
    root = tmp_path_factory.mktemp("verdict")
    cache = root / "cache"
    assert (
        _run(_suite(root, 0), root / "ref", cache, "--train-seeds", "4", "--reference", "none") == 0
    )
    assert (
        main(["baseline", "--results-dir", str(root / "ref"), "--out", str(root / "ref.json")]) == 0
    )
    assert _run(_suite(root, 0), root / "one", cache, "--reference", "none") == 0
    assert (
        main(["baseline", "--results-dir", str(root / "one"), "--out", str(root / "one.json")]) == 0
    )
    return root


@pytest.mark.slow
def test_reference_rows_hold_every_training_run(ref):
    rows = json.loads((ref / "ref.json").read_text())["rows"]
    sup = [r for r in rows if r["backbone"] == "supervised"]
    assert len(sup) == 1 and [r["train_seed"] for r in sup[0]["runs"]] == [0, 1, 2, 3]
    assert len({r["weights"] for r in sup[0]["runs"]}) == 4
    assert sup[0]["value"] == pytest.approx(np.mean([r["value"] for r in sup[0]["runs"]]))
    (pix,) = [r for r in rows if r["backbone"] == "pixels"]
    assert len(pix["runs"]) == 1  # the same weights everywhere: one run
    board = (ref / "ref" / "leaderboard.md").read_text()
    assert "(n=4)ʳ" in board  # one row, the mean and the t interval over the four runs


@pytest.mark.slow
def test_another_training_seed_reproduces_a_multi_seed_reference(ref, capsys):
    code = _run(_suite(ref, 7), ref / "s7", ref / "cache", "--reference", str(ref / "ref.json"))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "REPRODUCED" in out and "NOT REPRODUCED" not in out
    line = next(x for x in out.splitlines() if "supervised x shapes x knn" in x)
    assert line.startswith("OK") and "prediction test over 4 training runs" in line, line
    assert "training seed 7; baseline seeds 0,1,2,3" in line
    pix = next(x for x in out.splitlines() if "pixels x shapes x knn" in x)
    assert "paired McNemar" in pix  # the same weights: judged on the same test images
    assert "reproduction, two-sided" in out


@pytest.mark.slow
def test_a_trainer_bug_with_every_setting_unchanged_is_a_regression(ref, capsys, monkeypatch):
    """The supervised loss sees each image with its neighbour's label (a misaligned batch):
    recipe, config and setting are those of the reference, only the trained model is worse."""
    from ssl_eval.train.methods import supervised

    real = supervised.Supervised.forward

    def misaligned(self, views, progress, labels=None):
        return real(self, views, progress, labels=labels.roll(1))

    monkeypatch.setattr(supervised.Supervised, "forward", misaligned)
    code = _run(_suite(ref, 7), ref / "bug", ref / "cache", "--reference", str(ref / "ref.json"))
    out = capsys.readouterr().out
    assert code == 1, out
    line = next(x for x in out.splitlines() if "supervised x shapes x knn" in x)
    assert line.startswith("REGRESSION") and "prediction test over 4 training runs" in line, line
    assert "NOT REPRODUCED" in out
    # the regression gate (one-sided) fails it too, and the setting did not change
    code = main(["check", "--baseline", str(ref / "ref.json"), "--results-dir", str(ref / "bug")])
    out = capsys.readouterr().out
    assert code == 1 and "0 changed setting(s)" in out, out


def test_a_single_run_reference_cannot_judge_a_retrained_model(ref, capsys):
    s7 = ref / "s7"
    if not (s7 / "records").is_dir():
        assert _run(_suite(ref, 7), s7, ref / "cache", "--reference", "none") == 0
        capsys.readouterr()
    base = ["check", "--baseline", str(ref / "one.json"), "--results-dir", str(s7)]
    code = main(base)
    out = capsys.readouterr().out
    assert code == 0, out  # a warning, never a silent pass or fail
    line = next(x for x in out.splitlines() if "supervised x shapes x knn" in x)
    assert line.startswith("UNVERIFIABLE") and "one training run" in line, line
    assert "1 unverifiable" in out
    assert main([*base, "--strict"]) == 1
    assert "(fails: --strict)" in capsys.readouterr().out


# ---------------------------------------------------------------- the statistics themselves


def test_prediction_test_is_the_t_prediction_interval_without_the_test_term():
    from scipy.stats import t

    ref_runs, new = [0.40, 0.43, 0.38, 0.41, 0.44], 0.35
    n = len(ref_runs)
    s = np.std(ref_runs, ddof=1)
    expected = t.cdf((new - np.mean(ref_runs)) / (s * math.sqrt(1 + 1 / n)), n - 1)
    diff, se, df, p = prediction_test(ref_runs, [new], 0.0)
    assert df == pytest.approx(n - 1) and p == pytest.approx(expected, rel=1e-9)
    # the test-image term widens it, the degrees of freedom stay the seeds' n - 1
    _, se2, df2, p2 = prediction_test(ref_runs, [new], 0.01)
    assert se2 == pytest.approx(math.sqrt(se**2 + 0.01**2)) and df2 == n - 1 and p2 > p
    # identical seeds: the test-image term alone, never a zero tolerance
    _, se3, df3, p3 = prediction_test([0.4, 0.4, 0.4], [0.39], 0.01)
    assert se3 == pytest.approx(0.01) and df3 == 2
    assert p3 == pytest.approx(t.cdf(-1.0, 2), rel=1e-6)


def _row(backbone, correct, weights="w", recipe=None, seed=None):
    correct = np.asarray(correct, dtype=bool)
    return {
        "backbone": backbone,
        "dataset": "d",
        "protocol": "knn",
        "seed": 0,
        "metric": "top1",
        "value": float(correct.mean()),
        "ci95": None,
        "setting": {
            "hash": f"{backbone}-{weights}",
            "row": "r",
            "column": "c",
            "summary": {"column": {"p": 1}, "row": {"backbone": backbone, "weights": weights}},
        },
        "recipe": recipe,
        "train_seed": seed,
        "weights": weights,
        "per_sample_correct": pack_bits(correct),
        "n_test": len(correct),
        "time": "t",
    }


def test_holm_keeps_a_row_between_alpha_over_m_and_alpha():
    """Four rows; one lost 15 and gained 5 of 20 discordant images: one-sided McNemar
    p = P(X >= 15 | 20, 1/2) = 0.0207, above 0.05/4 and below 0.05. Holm keeps it (0.083);
    a gate without the correction would fail it."""
    base_bits = np.zeros(400, dtype=bool)
    base_bits[:200] = True
    worse = base_bits.copy()
    worse[:15] = False  # lost 15
    worse[200:205] = True  # gained 5
    names = ["a", "b", "c", "d"]
    baseline = [_row(n, base_bits) for n in names]
    current = [_row("a", worse)] + [_row(n, base_bits) for n in names[1:]]
    res = check(baseline, current)
    (fa,) = [f for f in res.findings if f.backbone == "a"]
    assert fa.p_value == pytest.approx(sum(math.comb(20, i) for i in range(15, 21)) / 2**20)
    assert 0.05 / 4 < fa.p_value < 0.05
    assert fa.kind == "ok" and res.exit_code == 0, fa.line()
    assert _holm([fa.p_value, 1, 1, 1])[0] == pytest.approx(4 * fa.p_value)
    # alone (m = 1) the same drop is a regression
    assert check(baseline[:1], current[:1]).findings[0].kind == "regression"


def test_one_sided_gate_lists_a_rise_the_two_sided_question_fails_it():
    base_bits = np.zeros(400, dtype=bool)
    base_bits[:200] = True
    better = base_bits.copy()
    better[200:260] = True
    res = check([_row("a", base_bits)], [_row("a", better)])
    assert res.findings[0].kind == "improvement" and res.exit_code == 0
    res2 = check([_row("a", base_bits)], [_row("a", better)], two_sided=True)
    assert res2.findings[0].kind == "improvement" and res2.exit_code == 1
    assert "reproduction, two-sided" in res2.verdict()


def test_group_runs_joins_training_seeds_of_one_recipe_only():
    bits = np.ones(10, dtype=bool)
    rows = [_row("m", bits, weights=f"w{s}", recipe="r", seed=s) for s in (2, 0, 1)]
    rows.append(_row("m", bits, weights="w9", recipe="other", seed=0))
    for r in rows:
        r["setting"]["hash"] = r["weights"] + r["recipe"]
    groups = group_runs(rows)
    assert sorted(len(g["runs"]) for g in groups) == [1, 3]
    (g3,) = [g for g in groups if len(g["runs"]) == 3]
    assert [r["train_seed"] for r in g3["runs"]] == [0, 1, 2]


def test_frame_rows_carry_training_seed_and_weights(ref):
    rows = [r for r in frame_rows(ref / "ref") if r["backbone"] == "supervised"]
    assert sorted(r["train_seed"] for r in rows) == [0, 1, 2, 3]
    assert all(r["recipe"] and r["weights"] for r in rows)
    assert len({r["recipe"] for r in rows}) == 1  # the seed is not part of the recipe


def test_the_one_sided_question_says_a_rise_of_an_error_fails():
    """The gate's verdict names its question; with RMSE rows, a 'drop fails, a rise is listed'
    read backwards (a rise of RMSE is the regression): the words say worsening."""
    row = {"backbone": "b", "dataset": "nyu-depth", "protocol": "lindepth@dinov3", "seed": 0,
           "metric": "rmse", "value": 0.5, "ci95": [0.495, 0.505],
           "setting": {"hash": "h", "summary": {}}, "time": "t"}  # fmt: skip
    res = check([row], [row | {"value": 0.6, "ci95": [0.595, 0.605]}])
    assert res.findings[0].kind == "regression"
    assert "a rise is listed" not in res.verdict() and "a rise of RMSE" in res.verdict()
