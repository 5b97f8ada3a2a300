import numpy as np
import pytest
from scipy.stats import binomtest

from ssl_eval.core.stats import (
    bootstrap_ci,
    mcnemar,
    mean_ci,
    pack_bits,
    paired_bootstrap,
    unpack_bits,
)


@pytest.mark.slow
def test_bootstrap_interval_covers_the_true_accuracy_at_about_95_percent():
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for t in range(trials):
        correct = rng.random(400) < 0.7
        lo, hi = bootstrap_ci(correct, resamples=1000, seed=t)
        covered += lo <= 0.7 <= hi
    assert 0.91 <= covered / trials <= 0.985


def test_t_interval_over_seeds_covers_at_about_95_percent():
    rng = np.random.default_rng(1)
    trials, covered = 2000, 0
    for _ in range(trials):
        _, _, lo, hi = mean_ci(rng.normal(0.8, 0.02, size=5))
        covered += lo <= 0.8 <= hi
    assert 0.93 <= covered / trials <= 0.97


def test_bootstrap_is_seeded():
    x = np.random.default_rng(2).random(100) < 0.5
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)


def test_mcnemar_exact():
    a = np.array([1] * 30 + [0] * 10 + [1] * 50 + [0] * 10, dtype=bool)
    b = np.array([0] * 30 + [1] * 10 + [1] * 50 + [0] * 10, dtype=bool)
    r = mcnemar(a, b)
    assert (r["a_only"], r["b_only"]) == (30, 10)
    assert r["p_value"] == binomtest(10, 40, 0.5).pvalue


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(4)
    a = rng.random(2000) < 0.70
    better = a | (rng.random(2000) < 0.2)
    assert paired_bootstrap(a, better)["p_value"] < 0.01
    same = a.copy()
    flip = rng.choice(2000, 40, replace=False)
    same[flip[:20]] = ~same[flip[:20]]
    assert paired_bootstrap(a, same)["p_value"] > 0.05


def test_pack_bits_round_trip():
    x = np.random.default_rng(5).random(1001) < 0.5
    assert (unpack_bits(pack_bits(x), 1001) == x).all()
