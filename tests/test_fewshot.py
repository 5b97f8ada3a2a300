import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_eval.core.errors import UserError
from ssl_eval.protocols import fewshot
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.fewshot import (
    EpisodicParams,
    FewShotParams,
    _logreg,
    run_episodic,
    run_fewshot,
    sample_support,
)


def _blobs(n, seed, c=5, d=12, scale=2.5):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(c, d)) * scale
    y = rng.integers(0, c, n)
    return (means[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_sampler_takes_exactly_k_per_class():
    y = np.repeat(np.arange(6), [30, 12, 9, 50, 7, 25])
    for k in (1, 2, 5, 7):
        idx, capped = sample_support(y, k, np.random.default_rng(k))
        assert capped == {} and len(set(idx)) == len(idx)
        assert (np.bincount(y[idx], minlength=6) == k).all()


def test_small_class_is_an_error_or_a_recorded_cap():
    y = np.repeat(np.arange(3), [10, 3, 10])
    with pytest.raises(UserError, match="class 1 has only 3"):
        sample_support(y, 5, np.random.default_rng(0))
    idx, capped = sample_support(y, 5, np.random.default_rng(0), cap=True)
    assert capped == {1: 3} and np.bincount(y[idx]).tolist() == [5, 3, 5]


@pytest.mark.slow
def test_support_comes_from_train_only(monkeypatch):
    x, y = _blobs(400, 0)
    xt, yt = _blobs(100, 1)
    seen = []
    real = fewshot.sample_support

    def spy(labels, *a, **k):
        seen.append(labels)
        return real(labels, *a, **k)

    monkeypatch.setattr(fewshot, "sample_support", spy)
    train_idx, val_idx = np.arange(40, 400), np.arange(40)
    inp = ProtocolInputs(x, y, xt, yt, train_idx, val_idx, 5)
    run_fewshot(inp, FewShotParams(shots=(1, 5), seeds=2))
    assert len(seen) == 4 and all(
        np.array_equal(lab, y[train_idx]) for lab in seen
    )  # train rows, not val
    seen.clear()
    run_episodic(inp, EpisodicParams(episodes=20, queries=5))
    assert seen and all(lab is y for lab in seen)  # the train labels, never the test ones


def _split_inputs(seed=0, test_seed=1):
    x, y = _blobs(400, seed, scale=0.7)
    xt, yt = _blobs(300, test_seed, scale=0.7)
    return ProtocolInputs(x, y, xt, yt, np.arange(320), np.arange(320, 400), 5)


@pytest.mark.slow
def test_logreg_c_is_chosen_on_val_as_scikit_learn_would(monkeypatch):
    """An independent re-computation: per draw, scikit-learn at every C of the grid, the best
    validation top-1 (smallest C on ties) must be the recorded choice, and the reported test
    top-1 that of the chosen fit."""
    from sklearn.linear_model import LogisticRegression

    drawn = []
    real = fewshot.sample_support

    def spy(labels, *a, **k):
        drawn.append(real(labels, *a, **k)[0])
        return drawn[-1], {}

    monkeypatch.setattr(fewshot, "sample_support", spy)
    inp, cs = _split_inputs(), (0.01, 1.0, 100.0)
    p = FewShotParams(
        shots=(1, 3), seeds=3, classifiers=("logreg",), logreg_cs=cs, headline="logreg@3"
    )
    out = run_fewshot(inp, p)
    norm = F.normalize(torch.from_numpy(inp.train_x), dim=1).numpy()
    test = F.normalize(torch.from_numpy(inp.test_x), dim=1).numpy()
    sel = out.details["logreg_c"]
    assert sel["selected_on"] == "val" and sel["grid"] == list(cs)
    bests = []
    for j, (k, s) in enumerate((k, s) for k in (1, 3) for s in range(3)):
        rows = inp.train_idx[drawn[j]]
        # newton-cg: at C = 0.01 the logits are ~1e-2 and lbfgs stops early on its relative f tolerance
        fits = [
            LogisticRegression(C=c, solver="newton-cg", tol=1e-8, max_iter=10000).fit(
                norm[rows], inp.train_y[rows]
            )
            for c in cs
        ]
        val = [f.score(norm[inp.val_idx], inp.train_y[inp.val_idx]) for f in fits]
        best = val.index(max(val))
        assert sel["chosen"][f"K={k}"][s] == cs[best], (k, s, val)
        assert out.spread[f"top1@logreg/{k}shot"][s] == pytest.approx(
            fits[best].score(test, inp.test_y), abs=2 / 300
        )
        bests.append(cs[best])
    # the draws whose C is the grid's smallest or largest, counted from scikit-learn's choices
    lo, hi = bests.count(cs[0]), bests.count(cs[-1])
    assert lo + hi > 0  # this data's choices reach an edge: the record must say so
    (e,) = out.details["grid_edges"]
    assert (e["param"], e["lowest"], e["highest"], e["choices"]) == ("logreg_cs", lo, hi, 6)


@pytest.mark.slow
def test_the_choice_of_c_never_reads_the_test_split():
    p = FewShotParams(shots=(1, 5), seeds=3, logreg_cs=(0.01, 0.1, 1.0, 10.0, 100.0))
    a = run_fewshot(_split_inputs(test_seed=1), p)
    inp = _split_inputs(test_seed=2)
    inp.test_y = np.roll(inp.test_y, 7)  # other test images, scrambled labels
    b = run_fewshot(inp, p)
    assert a.details["logreg_c"]["chosen"] == b.details["logreg_c"]["chosen"]
    assert a.details["logreg_c"]["val_top1_mean"] == b.details["logreg_c"]["val_top1_mean"]
    assert a.metrics["top1@logreg/5shot"] != b.metrics["top1@logreg/5shot"]


def test_an_empty_grid_means_the_fixed_c_and_a_grid_needs_val():
    inp = _split_inputs()
    fixed = run_fewshot(
        inp, FewShotParams(shots=(2,), seeds=2, logreg_cs=(), logreg_c=1.0, headline="logreg@2")
    )
    one = run_fewshot(
        inp, FewShotParams(shots=(2,), seeds=2, logreg_cs=(1.0,), headline="logreg@2")
    )
    assert fixed.details["logreg_c"] == {"fixed": 1.0}
    assert one.details["logreg_c"]["chosen"] == {"K=2": [1.0, 1.0]}
    assert fixed.spread["top1@logreg/2shot"] == one.spread["top1@logreg/2shot"]
    inp.val_idx = np.arange(0)
    with pytest.raises(UserError, match="validation split.*logreg_cs=\\[\\]"):
        run_fewshot(inp, FewShotParams(shots=(2,), seeds=2, headline="logreg@2"))
    run_fewshot(
        inp, FewShotParams(shots=(2,), seeds=2, logreg_cs=(), headline="logreg@2")
    )  # fixed C: fine
    with pytest.raises(UserError, match="logreg_cs"):
        FewShotParams(logreg_cs=(1.0, 0.0))


@pytest.mark.slow
def test_fewshot_reports_mean_and_interval_over_seeds():
    x, y = _blobs(500, 0)
    xt, yt = _blobs(200, 1)
    out = run_fewshot(
        ProtocolInputs(x, y, xt, yt, np.arange(450), np.arange(450, 500), 5),
        FewShotParams(shots=(1, 5), seeds=5),
    )
    assert len(out.spread["top1@logreg/5shot"]) == 5
    assert out.metrics["top1"] == pytest.approx(np.mean(out.spread["top1@logreg/5shot"]))
    assert out.metrics["top1@prototype/5shot"] > 0.9


def test_episodic_mode():
    x, y = _blobs(600, 0, c=10)
    xt, yt = _blobs(400, 1, c=10)
    out = run_episodic(
        ProtocolInputs(x, y, xt, yt, np.arange(600), np.arange(0), 10),
        EpisodicParams(episodes=50, headline="prototype"),
    )
    assert len(out.spread["top1@prototype/5way5shot"]) == 50
    assert out.metrics["top1"] == out.metrics["top1@prototype/5way5shot"] > 0.9
    assert out.details["spread_over"] == "t-episodes"


@pytest.mark.slow
def test_batched_logreg_with_one_c_per_problem_and_a_warm_start_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(60, 3, c=4, scale=0.7)
    xq, _ = _blobs(200, 4, c=4, scale=0.7)
    xn, xqn = F.normalize(torch.from_numpy(x), dim=1), F.normalize(torch.from_numpy(xq), dim=1)
    cs = (0.01, 1.0, 30.0)
    xs, ys = xn[None].expand(3, -1, -1), torch.from_numpy(y)[None].expand(3, -1)
    cold = fewshot._fit_logreg(xs, ys, torch.tensor(cs), 4)
    warm = fewshot._fit_logreg(
        xs, ys, torch.tensor(cs), 4, init=fewshot._fit_logreg(xs, ys, torch.full((3,), 3.0), 4)
    )
    for e, c in enumerate(cs):
        ref = (
            LogisticRegression(C=c, tol=1e-10, max_iter=10000)
            .fit(xn.numpy(), y)
            .decision_function(xqn.numpy())
        )
        for W, b, _ in (cold, warm):
            ours = (xqn.double() @ W[e] + b[e]).numpy()
            # scikit-learn's multinomial logits are defined up to a shift per row
            np.testing.assert_allclose(
                ours - ours.mean(1, keepdims=True), ref - ref.mean(1, keepdims=True), atol=2e-3
            )


def test_batched_logreg_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(60, 3, c=4, scale=0.7)
    xq, _ = _blobs(200, 4, c=4, scale=0.7)
    xn, xqn = F.normalize(torch.from_numpy(x), dim=1), F.normalize(torch.from_numpy(xq), dim=1)
    p = FewShotParams(logreg_c=3.0)
    ours = _logreg(xn[None], torch.from_numpy(y)[None], xqn[None], p, 4)[0]
    ref = LogisticRegression(C=3.0, tol=1e-10, max_iter=10000).fit(xn.numpy(), y)
    np.testing.assert_allclose(ours.numpy(), ref.decision_function(xqn.numpy()), atol=2e-3)


def test_preflight_refuses_a_k_beyond_the_training_rows_before_extraction():
    from ssl_eval.protocols.base import DataShape

    shape = DataShape(train=90, val=10, test=50, num_classes=10, min_class_train=8, min_class_all=9)
    with pytest.raises(UserError, match="K=9 exceeds the 8 training images.*shots=\\[1,5\\]"):
        fewshot.preflight_fewshot(FewShotParams(shots=(1, 5, 9)), shape)
    fewshot.preflight_fewshot(FewShotParams(shots=(1, 5, 9), on_small_class="cap"), shape)
    fewshot.preflight_fewshot(FewShotParams(shots=(1, 8), headline="logreg@8"), shape)
    no_val = DataShape(
        train=100, val=0, test=50, num_classes=10, min_class_train=10, min_class_all=10
    )
    with pytest.raises(UserError, match="validation split"):
        fewshot.preflight_fewshot(FewShotParams(shots=(1, 5)), no_val)
    fewshot.preflight_fewshot(FewShotParams(shots=(1, 5), logreg_cs=()), no_val)
