"""Uncertainty for every number: bootstrap confidence intervals on the test set, t intervals
across seeds or episodes, and paired tests between two backbones on the same test images."""

from __future__ import annotations

import base64
import math

import numpy as np

DEFAULT_RESAMPLES = 1000


def bootstrap_ci(
    correct: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image scores (e.g. 0/1 correctness)."""
    x = np.asarray(correct, dtype=np.float64)
    n = len(x)
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, (1 << 24) // n)  # bound the index matrix to ~128 MB
    for s in range(0, resamples, chunk):
        b = min(chunk, resamples - s)
        means[s : s + b] = x[rng.integers(0, n, size=(b, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_stat(
    statistic, n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(idx)``, a metric computed on the test
    images of an index array (mean per-class accuracy, mAP): ``resamples`` draws of ``n``
    indices with replacement, NaN draws (a resample the metric is undefined on) left out."""
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(resamples)])
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_sum_ci(
    parts: np.ndarray,
    statistic,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic of summed per-image parts: ``parts``
    (n, k), one row per test image (e.g. its per-class intersections and areas);
    ``statistic((b, k) sums) -> (b,)`` (e.g. the mIoU of each resample's summed areas). The
    resamples draw images as ``bootstrap_ci`` does (same seed, same draws)."""
    x = np.asarray(parts, dtype=np.float64)
    n = len(x)
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    chunk = max(1, (1 << 22) // max(n, x.shape[1]))
    for s in range(0, resamples, chunk):
        b = min(chunk, resamples - s)
        idx = rng.integers(0, n, size=(b, n))
        counts = np.zeros((b, n))
        np.add.at(counts, (np.arange(b)[:, None], idx), 1.0)
        stats[s : s + b] = statistic(counts @ x)
    lo, hi = np.nanquantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _t_quantile(df: int, level: float = 0.95) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.5 + level / 2, df))
    except ImportError:  # scipy comes with scikit-learn; normal approximation otherwise
        return 1.959963984540054


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, std, lo, hi): a t interval for the mean of independent runs (seeds, episodes)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, 0.0, m, m
    sd = float(v.std(ddof=1))
    h = _t_quantile(len(v) - 1, level) * sd / math.sqrt(len(v))
    return m, sd, m - h, m + h


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact McNemar test on paired 0/1 outcomes: two-sided binomial test on discordant pairs."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    n01 = int((~a & b).sum())  # b right, a wrong
    n10 = int((a & ~b).sum())
    n = n01 + n10
    if n == 0:
        p = 1.0
    else:
        from scipy.stats import binomtest

        p = float(binomtest(min(n01, n10), n, 0.5).pvalue)
    return {"a_only": n10, "b_only": n01, "p_value": p}


def paired_bootstrap(
    correct_a, correct_b, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> dict:
    """Difference of means (b - a) with a paired bootstrap interval and a two-sided p-value."""
    d = np.asarray(correct_b, dtype=np.float64) - np.asarray(correct_a, dtype=np.float64)
    lo, hi = bootstrap_ci(d, resamples, seed)
    rng = np.random.default_rng(seed + 1)
    n = len(d)
    centred = d - d.mean()
    means = np.array([centred[rng.integers(0, n, n)].mean() for _ in range(resamples)])
    p = float((np.abs(means) >= abs(d.mean())).mean())
    return {"diff": float(d.mean()), "ci95": [lo, hi], "p_value": max(p, 1.0 / resamples)}


def pack_bits(correct: np.ndarray) -> str:
    """0/1 vector -> compact base64 (1 bit per test image), stored in result records."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack_bits(s: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(s), dtype=np.uint8))[:n].astype(bool)


def prediction_test(
    reference: list[float], new: list[float], test_se: float
) -> tuple[float, float, float, float]:
    """Is the mean of ``new`` (m training runs of a recipe) where the reference's ``reference``
    (n >= 2 runs of the same recipe, on the same test images) predicts it?

    The statistic is the difference of the two means over the prediction standard error
    ``sqrt(s^2 (1/n + 1/m) + test_se^2)``: ``s`` is the spread between the reference's runs
    (training noise, as seen through these test images), ``test_se`` the test-image sampling
    noise of one run (its recorded interval). The seeds already see that noise through the
    shared test images, so adding it again is conservative; it is the floor that keeps a
    reference whose few seeds happened to agree from claiming a zero tolerance. The statistic
    is referred to a t distribution with the reference's n - 1 degrees of freedom (few seeds
    estimate s poorly, and the tails say so). A Welch-Satterthwaite count that treats
    ``test_se`` as known gives more degrees of freedom and was measured to cry wolf: on the
    quick reference's five runs, holding one out, SimCLR's fine-tuning run of seed 2 (25.25
    against 29.53 +- 0.72 for the other four) came out a regression at df 17 (docs/suite.md).
    Returns (difference new - reference, standard error, degrees of freedom, the one-sided
    p-value that ``new`` is lower), the upper one being ``1 - p``."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(new, dtype=np.float64)
    n, m = len(ref), len(cur)
    if n < 2 or m < 1:
        raise ValueError("a prediction test needs at least two reference runs and one new run")
    s2 = float(ref.var(ddof=1))
    a = s2 * (1 / n + 1 / m)
    b = float(test_se) ** 2
    se = math.sqrt(a + b)
    diff = float(cur.mean() - ref.mean())
    df = float(n - 1)
    if se == 0:
        return diff, 0.0, df, (0.0 if diff < 0 else 1.0 if diff > 0 else 0.5)
    return diff, se, df, _t_cdf(diff / se, df)


def _t_cdf(x: float, df: float) -> float:
    if math.isinf(df):
        return 0.5 * math.erfc(-x / math.sqrt(2))
    try:
        from scipy.stats import t

        return float(t.cdf(x, df))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return 0.5 * math.erfc(-x / math.sqrt(2))


def holm(pvals: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down; family-wise error over all of ``pvals``): the i-th
    smallest is multiplied by ``m - i`` (i from 0), made monotone and capped at 1. A claim is
    significant at family-wise level alpha when its adjusted p-value is below alpha."""
    m = len(pvals)
    order = sorted(range(m), key=lambda i: (pvals[i], i))
    adj, running = [1.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(pvals[i])))
        adj[i] = running
    return adj


def _t_two_sided(t: float, df: float) -> float:
    return min(1.0, 2 * _t_cdf(-abs(t), df))


def t_test_1samp(values, mu: float) -> tuple[float, int, float]:
    """One-sample t test of ``values`` (n >= 2 independent runs) against the fixed value
    ``mu``: (t, degrees of freedom, two-sided p). Runs that agree exactly (no spread) give p = 0
    when their mean differs from ``mu`` and 1 when it equals it."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        raise ValueError("a one-sample t test needs at least two values")
    diff = float(v.mean()) - float(mu)
    se = float(v.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return (math.copysign(math.inf, diff) if diff else 0.0), n - 1, (1.0 if diff == 0 else 0.0)
    t = diff / se
    return t, n - 1, _t_two_sided(t, n - 1)


def welch_t(a, b) -> tuple[float, float, float]:
    """Welch's two-sample t test of the means of ``a`` and ``b`` (each n >= 2 independent
    runs): (t of mean(a) - mean(b), Welch-Satterthwaite degrees of freedom, two-sided p)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("Welch's t test needs at least two values on each side")
    va, vb = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)
    diff = float(x.mean() - y.mean())
    if va + vb == 0:
        return (math.copysign(math.inf, diff) if diff else 0.0), math.inf, float(diff == 0)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
    t = diff / math.sqrt(va + vb)
    return t, df, _t_two_sided(t, df)


def interval_z_test(a: float, a_half: float, b: float, b_half: float, level: float = 0.95):
    """Two values compared through their recorded intervals: each half-width is read as
    ``z * se`` of a normal approximation (z = 1.96 at 95%), and the difference ``a - b`` is
    tested against ``sqrt(se_a^2 + se_b^2)``: (z, two-sided p). Two intervals of width zero
    give p = 0 for different values and 1 for equal ones."""
    from statistics import NormalDist

    q = NormalDist().inv_cdf(0.5 + level / 2)
    se = math.hypot(float(a_half) / q, float(b_half) / q)
    diff = float(a) - float(b)
    if se == 0:
        return (math.copysign(math.inf, diff) if diff else 0.0), (1.0 if diff == 0 else 0.0)
    z = diff / se
    return z, math.erfc(abs(z) / math.sqrt(2))
