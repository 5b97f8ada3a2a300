import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_eval.core.errors import UserError
from ssl_eval.features.stream import FeatureRows
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.linear import LinearParams, feature_stats, run_linear, schedule, train_heads

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


@pytest.mark.slow
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
        single = train_heads(
            xt, yt, 5, LinearParams(lrs=(lr,), weight_decays=(wd,), epochs=2, batch_size=64), seed=3
        )
        torch.testing.assert_close(grid.weight[:, h], single.weight[:, 0], rtol=1e-4, atol=1e-6)


def test_diverged_heads_lose_the_selection():
    x, y = _separable(800)
    inp = ProtocolInputs(x * 1e4, y, x[:100] * 1e4, y[:100], np.arange(700), np.arange(700, 800), 5)
    heads = train_heads(
        torch.from_numpy(x * 1e4),
        torch.from_numpy(y),
        5,
        LinearParams(lrs=(1e30, 0.1), weight_decays=(0.0,), epochs=3, batchnorm=False),
        rows=torch.arange(700),
    )
    assert heads.diverged == 1 and heads.diverged_mask.tolist() == [
        True,
        False,
    ]  # the 1e30 head diverges
    out = run_linear(
        inp, LinearParams(lrs=(1e30, 0.1), weight_decays=(0.0,), epochs=3, batchnorm=False)
    )
    assert out.details["selected"]["lr"] == 0.1 and out.details["diverged_heads"] == 1
    assert out.metrics["top1"] > 0.9


def test_every_head_diverged_is_an_error_not_a_chance_level_number():
    x, y = _separable(800)
    inp = ProtocolInputs(x * 1e4, y, x[:100] * 1e4, y[:100], np.arange(700), np.arange(700, 800), 5)
    with pytest.raises(UserError, match="every head diverged"):
        run_linear(inp, LinearParams(lrs=(1e30,), weight_decays=(0.0,), epochs=3, batchnorm=False))


def _sgd_reference(xs, y, C, lr, wd, epochs, bs, seed, steps, rows=None):
    """One head with autograd and torch.optim.SGD (momentum 0.9, weight decay on weight and
    bias) under a per-step cosine schedule, on already standardised features ``xs``."""
    import torch.nn.functional as F

    n = len(rows) if rows is not None else len(xs)
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(xs.shape[1], C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        if rows is not None:
            order = rows[order]
        for s in range(0, n, bs):
            i = order[s : s + bs]
            opt.zero_grad()
            F.cross_entropy(xs[i] @ w + b, y[i]).backward()
            opt.step()
            sched.step()
    return w.detach(), b.detach()


def test_every_head_equals_torch_sgd_on_standardised_rows():
    """The fused grid equals plain autograd + torch.optim.SGD for each (lr, wd), on a subset of
    rows standardised with that subset's statistics, with min_steps raising the epochs."""
    rng = np.random.default_rng(5)
    N, D, C = 700, 12, 4
    x = torch.from_numpy(
        (rng.normal(size=(N, D)) * rng.uniform(0.5, 3, D) + rng.normal(size=D) * 4).astype(
            np.float32
        )
    )
    y = torch.from_numpy(rng.integers(0, C, N))
    rows = torch.from_numpy(np.sort(rng.choice(N, 600, replace=False)))
    p = LinearParams(
        lrs=(0.05, 0.5), weight_decays=(0.0, 1e-2), epochs=2, batch_size=128, min_steps=20
    )
    epochs, per_epoch = schedule(600, p)
    assert (epochs, per_epoch) == (4, 5)  # 2 epochs = 10 steps < 20: raised to 4 epochs
    grid = train_heads(x, y, C, p, seed=11, rows=rows)
    assert (grid.epochs, grid.steps) == (4, 20)
    sub = x[rows].double()
    xs = ((x.double() - sub.mean(0)) / sub.std(0)).float()
    for h, (lr, wd) in enumerate(grid.settings):
        w, b = _sgd_reference(xs, y, C, lr, wd, epochs, 128, 11, epochs * per_epoch, rows=rows)
        torch.testing.assert_close(grid.weight[:, h], w, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(grid.bias[h], b, rtol=1e-4, atol=2e-5)


def test_feature_stats_match_numpy_on_a_row_subset():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5000, 9)) * rng.uniform(0.1, 10, 9) + rng.normal(size=9) * 50).astype(
        np.float32
    )
    rows = rng.choice(5000, 3001, replace=False)
    mean, inv_std = feature_stats(torch.from_numpy(x), torch.from_numpy(rows), chunk=777)
    ref = x[rows].astype(np.float64)
    np.testing.assert_allclose(mean.numpy()[0], ref.mean(0), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(1 / inv_std.numpy()[0], ref.std(0, ddof=1), rtol=1e-5)


def test_small_datasets_get_min_steps_and_the_record_says_so():
    x, y = _separable(400)
    inp = ProtocolInputs(x, y, x[:50], y[:50], np.arange(350), np.arange(350, 400), 5)
    out = run_linear(inp, LinearParams(epochs=3, batch_size=128, min_steps=30))
    assert out.details["epochs_run"] == 10 and out.details["steps"] == 30  # 3 steps an epoch
    assert schedule(45000, LinearParams())[0] == 3  # CIFAR-size: the card's 3 epochs (264 steps)


def _fp16_memmap(tmp_path, name, a):
    np.save(tmp_path / name, a.astype(np.float16))
    return np.load(tmp_path / name, mmap_mode="r")


def test_heads_streamed_from_a_memmap_match_heads_trained_on_an_in_memory_copy(tmp_path):
    """Streaming (float16 memmap, listed rows, a statistics chunk that does not divide N) must
    train the heads an explicit float32 copy of those rows trains: the same batches in the same
    order; only the statistics' sums are grouped differently (float32 rounding)."""
    x, y = _separable(1000)
    mm = _fp16_memmap(tmp_path, "x.npy", x)
    rows = np.flatnonzero(np.arange(1000) % 5 != 0)
    p = LinearParams(lrs=(0.01, 0.1), weight_decays=(0.0, 1e-2), epochs=2, batch_size=64)
    a = train_heads(
        FeatureRows(mm), torch.from_numpy(y), 5, p, 1, torch.from_numpy(rows), stats_chunk=97
    )
    copy = np.asarray(mm, dtype=np.float32)[rows]
    b = train_heads(torch.from_numpy(copy), torch.from_numpy(y[rows]), 5, p, 1)
    np.testing.assert_allclose(a.mean.numpy()[0], copy.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(1 / a.inv_std.numpy()[0], copy.std(0, ddof=1), rtol=1e-5)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-5)


def test_run_linear_on_a_memmap_equals_run_linear_in_memory_and_records_its_chunks(tmp_path):
    x, y = _separable(1200)
    xt, yt = _separable(300, seed=1)
    x16, xt16 = x.astype(np.float16).astype(np.float32), xt.astype(np.float16).astype(np.float32)
    tr, va = np.flatnonzero(np.arange(1200) % 6 != 2), np.flatnonzero(np.arange(1200) % 6 == 2)
    p = LinearParams(epochs=2, batch_size=128)
    mm = ProtocolInputs(
        _fp16_memmap(tmp_path, "x.npy", x), y, _fp16_memmap(tmp_path, "t.npy", xt), yt, tr, va, 5
    )
    a = run_linear(mm, p)
    b = run_linear(ProtocolInputs(x16, y, xt16, yt, tr, va, 5), p)
    assert a.metrics == b.metrics and a.details == b.details
    assert (a.per_sample["top1"] == b.per_sample["top1"]).all()
    assert a.details["chunks"] == {"stats": 4096, "eval": 8192, "batch": 128}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    pytest.skip(f"no {field} in /proc/self/status")


@pytest.mark.slow
def test_training_on_a_memmap_holds_release_mb_of_it_not_a_folio_per_batch_row(tmp_path):
    """A mini-batch gathers rows from all over the file and every scattered row maps its whole
    folio (up to 2 MB): gathered at once, a 512-row batch held up to 1 GB of the bank, so the
    linear probe's peak grew with N (the defect). Peak RSS (VmHWM, reset first) while training
    on a 64 MB float16 memmap must stay within release_mb (8) plus the small buffers."""
    np.save(tmp_path / "x.npy", np.ones((32768, 1024), np.float16))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = torch.from_numpy(np.arange(32768) % 5)
    p = LinearParams(lrs=(0.01,), weight_decays=(0.0,), epochs=1, min_steps=0, batch_size=512)
    # a first small run allocates what any run allocates once (threads, allocator pools)
    train_heads(FeatureRows(x[:1024], release_mb=8), y[:1024], 5, p, 0, stats_chunk=256)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    base, threads = _status_mb("VmRSS"), torch.get_num_threads()
    torch.set_num_threads(1)  # fast on a loaded 2-core machine; the memory is the same
    try:
        train_heads(FeatureRows(x, release_mb=8), y, 5, p, 0, stats_chunk=256)
    finally:
        torch.set_num_threads(threads)
    assert _status_mb("VmHWM") - base < 8 + 12  # release_mb + batches, stats chunk, heads


def test_a_gather_read_in_groups_returns_the_rows_asked_for_in_their_order(tmp_path):
    """release_mb 8 reads 4 rows at a time (2 MB folios): the 37 scattered, repeated rows must
    come back exactly as one numpy gather gives them."""
    x = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float16)
    mm = _fp16_memmap(tmp_path, "x.npy", x)
    idx = np.random.default_rng(1).integers(0, 5000, 37)
    got = FeatureRows(mm, release_mb=8).take(idx)
    np.testing.assert_array_equal(got.numpy(), x[idx].astype(np.float32))
