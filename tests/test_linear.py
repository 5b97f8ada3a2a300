import numpy as np
import torch

from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.linear import LinearParams, run_linear, train_heads

W_TRUE = np.random.default_rng(123).normal(size=(20, 5))


def _separable(n, seed=0, margin=1.0):
    """Linearly separable with a margin: labels are argmax(x @ W), points near a boundary dropped."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * n, 20)).astype(np.float32)
    logits = x @ W_TRUE
    top2 = np.sort(logits, 1)[:, -2:]
    keep = (top2[:, 1] - top2[:, 0]) > margin
    x = x[keep][:n]
    return x, (x @ W_TRUE).argmax(1)


def test_linear_probe_reaches_100_percent_on_separable_features():
    x, y = _separable(3000)
    xt, yt = _separable(1000, seed=1)
    inp = ProtocolInputs(x, y, xt, yt, np.arange(2700), np.arange(2700, 3000), 5)
    out = run_linear(inp, LinearParams(epochs=30))
    assert out.metrics["top1"] >= 0.98, out.metrics


def test_linear_probe_is_deterministic_under_a_seed():
    x, y = _separable(1000)
    inp = ProtocolInputs(x, y, x[:200], y[:200], np.arange(900), np.arange(900, 1000), 5, seed=7)
    a = run_linear(inp, LinearParams(epochs=3))
    b = run_linear(inp, LinearParams(epochs=3))
    assert a.metrics == b.metrics and a.details == b.details


def test_every_head_matches_an_independently_trained_single_head():
    """Training many heads at once must equal training each alone (no cross-talk)."""
    x, y = _separable(500)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    p = LinearParams(lrs=(0.1, 1.0), weight_decays=(0.0, 1e-2), epochs=2, batch_size=64)
    grid = train_heads(xt, yt, 5, p, seed=3)
    for h, (lr, wd) in enumerate(grid.settings):
        single = train_heads(xt, yt, 5, LinearParams(lrs=(lr,), weight_decays=(wd,), epochs=2, batch_size=64), seed=3)
        torch.testing.assert_close(grid.weight[:, h], single.weight[:, 0], rtol=1e-4, atol=1e-6)


def test_diverged_heads_lose_the_selection():
    x, y = _separable(800)
    inp = ProtocolInputs(x * 1e4, y, x[:100] * 1e4, y[:100], np.arange(700), np.arange(700, 800), 5)
    out = run_linear(inp, LinearParams(lrs=(1e6, 0.1), weight_decays=(0.0,), epochs=3, batchnorm=False))
    assert np.isfinite(out.metrics["top1"])
