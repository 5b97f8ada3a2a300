import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_eval.errors import UserError
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


def test_support_comes_from_train_only(monkeypatch):
    x, y = _blobs(400, 0)
    xt, yt = _blobs(100, 1)
    seen = []
    real = fewshot.sample_support

    def spy(labels, *a, **k):
        seen.append(labels)
        return real(labels, *a, **k)

    monkeypatch.setattr(fewshot, "sample_support", spy)
    inp = ProtocolInputs(x, y, xt, yt, np.arange(360), np.arange(360, 400), 5)
    run_fewshot(inp, FewShotParams(shots=(1, 5), seeds=2))
    run_episodic(inp, EpisodicParams(episodes=20, queries=5))
    assert seen and all(lab is y for lab in seen)  # the train labels, never the test ones


def test_fewshot_reports_mean_and_interval_over_seeds():
    x, y = _blobs(500, 0)
    xt, yt = _blobs(200, 1)
    out = run_fewshot(ProtocolInputs(x, y, xt, yt, np.arange(450), np.arange(450, 500), 5),
                      FewShotParams(shots=(1, 5), seeds=5))
    assert len(out.spread["top1@logreg/5shot"]) == 5
    assert out.metrics["top1"] == pytest.approx(np.mean(out.spread["top1@logreg/5shot"]))
    assert out.metrics["top1@prototype/5shot"] > 0.9


def test_episodic_mode():
    x, y = _blobs(600, 0, c=10)
    xt, yt = _blobs(400, 1, c=10)
    out = run_episodic(ProtocolInputs(x, y, xt, yt, np.arange(600), np.arange(0), 10),
                       EpisodicParams(episodes=50, headline="prototype"))
    assert len(out.spread["top1@prototype/5way5shot"]) == 50
    assert out.metrics["top1"] == out.metrics["top1@prototype/5way5shot"] > 0.9
    assert out.details["spread_over"] == "t-episodes"


def test_batched_logreg_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(60, 3, c=4, scale=0.7)
    xq, _ = _blobs(200, 4, c=4, scale=0.7)
    xn, xqn = F.normalize(torch.from_numpy(x), dim=1), F.normalize(torch.from_numpy(xq), dim=1)
    p = FewShotParams(logreg_c=3.0)
    ours = _logreg(xn[None], torch.from_numpy(y)[None], xqn[None], p, 4)[0]
    ref = LogisticRegression(C=3.0, tol=1e-10, max_iter=10000).fit(xn.numpy(), y)
    np.testing.assert_allclose(ours.numpy(), ref.decision_function(xqn.numpy()), atol=2e-3)
