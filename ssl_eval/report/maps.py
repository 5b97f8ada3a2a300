"""t-SNE maps of each backbone's test features (from the feature cache), and the diagnostics
section: rankme, alignment, uniformity per backbone, and how each ranks the backbones against
their linear-probe accuracy (Spearman)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.runtime import warn
from .figures import Figure, file_name, mpl_text, plt, to_png

if TYPE_CHECKING:
    import pandas as pd

# test images per map: 500 (0.6 s a map on the 2-core CPU, where 1,000 took about 1.2 s: the
# default suite draws 13 maps inside its time budget); a picture, no number depends on it
TSNE_POINTS = 500
TSNE_SEED = 0
TSNE_ITERATIONS = 500
PCA_DIMS = 50
DIAGNOSTICS = ("rankme", "alignment", "uniformity")
MIN_FOR_CORRELATION = 3


def test_features(cache_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The test features and labels of cache entry ``key``, or None where it is absent or
    unreadable (the entry layout of ssl_eval/features/extraction.py)."""
    entry = Path(cache_dir) / "features" / str(key)
    try:
        feats = np.load(entry / "features.npy", mmap_mode="r")
        labels = np.load(entry / "labels.npy")
    except (OSError, ValueError, EOFError):
        return None
    if feats.ndim != 2 or len(feats) != len(labels):
        return None
    return feats, labels


def tsne_jobs(
    frame: pd.DataFrame, cache_dir: Path
) -> Iterator[tuple[str, Callable[[], Figure | None]]]:
    """One t-SNE map per dataset x backbone whose test features are in the cache."""
    col = "details.feature_cache.test"
    if frame.empty or col not in frame.columns:
        return
    rows = frame[frame[col].notna()].sort_values("time")
    rows = rows.drop_duplicates(["dataset", "backbone", col], keep="last")
    rows = rows.drop_duplicates(["dataset", "backbone"], keep="last")
    for _, r in rows.iterrows():
        name, dataset, key = str(r["backbone"]), str(r["dataset"]), str(r[col])
        yield f"t-SNE {dataset} {name}", lambda n=name, d=dataset, k=key: _tsne(cache_dir, n, d, k)


def _tsne(cache_dir: Path, name: str, dataset: str, key: str) -> Figure | None:
    loaded = test_features(cache_dir, key)
    if loaded is None:
        warn(
            f"report: no cached test features of {name} on {dataset} ({key}); skipping its t-SNE map"
        )
        return None
    from sklearn.manifold import TSNE

    feats, labels = loaded
    rng = np.random.default_rng(TSNE_SEED)
    idx = np.sort(rng.choice(len(labels), size=min(TSNE_POINTS, len(labels)), replace=False))
    x = np.asarray(feats[idx], dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if x.shape[1] > PCA_DIMS:  # the usual first step: t-SNE on the leading components
        from sklearn.decomposition import PCA

        x = PCA(PCA_DIMS, random_state=TSNE_SEED).fit_transform(x)
    y = np.asarray(labels)[idx]
    perplexity = float(min(30, max(2, (len(idx) - 1) // 3)))
    xy = TSNE(
        2, perplexity=perplexity, init="pca", max_iter=TSNE_ITERATIONS, random_state=TSNE_SEED
    ).fit_transform(x)
    p = plt()
    fig, ax = p.subplots(figsize=(4.2, 4.0))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=y, s=6, cmap="tab10" if y.max() < 10 else "tab20")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(mpl_text(f"{dataset}: {name} ({len(idx)} test images)"), fontsize=9)
    fig.colorbar(sc, ax=ax, label="label")
    return Figure(file_name("tsne", dataset, name), f"{dataset}: t-SNE of {name}", to_png(fig))


@dataclass
class Diagnostics:
    dataset: str
    metrics: list[str]
    values: dict[str, dict[str, float]]  # backbone -> metric -> value
    linear: dict[str, float] = field(default_factory=dict)  # backbone -> linear top-1
    spearman: dict[str, tuple[float, int]] = field(default_factory=dict)  # metric -> (rho, n)


def _newest(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.sort_values("time").drop_duplicates("backbone", keep="last")


def diagnostics(frame: pd.DataFrame) -> list[Diagnostics]:
    """Per dataset with diagnostics records: the metrics per backbone and, where at least three
    backbones also have a linear top-1 on that dataset, each metric's rank correlation with it
    (the linear column setting most backbones share)."""
    from scipy.stats import spearmanr

    if frame.empty or "protocol.type" not in frame.columns:
        return []
    out = []
    for dataset, g in frame[frame["protocol.type"] == "diagnostics"].groupby("dataset"):
        g = _newest(g)
        metrics = [m for m in DIAGNOSTICS if m in g.columns and g[m].notna().any()]
        if not metrics:
            continue
        values = {
            str(r["backbone"]): {m: float(r[m]) for m in metrics if not _nan(r[m])}
            for _, r in g.iterrows()
        }
        d = Diagnostics(str(dataset), metrics, values)
        lin = frame[(frame["protocol.type"] == "linear") & (frame["dataset"] == dataset)]
        if "top1" in lin.columns:
            lin = lin[lin["top1"].notna()]
        if not lin.empty and "top1" in lin.columns:
            common = lin["setting.column_hash"].value_counts().index[0]
            lin = _newest(lin[lin["setting.column_hash"] == common])
            d.linear = {str(b): float(v) for b, v in zip(lin["backbone"], lin["top1"], strict=True)}
        for m in metrics:
            names = [b for b in d.linear if m in values.get(b, {})]
            if len(names) >= MIN_FOR_CORRELATION:
                a = [values[b][m] for b in names]
                b = [d.linear[n] for n in names]
                rho = (
                    float(spearmanr(a, b).statistic)
                    if len(set(a)) > 1 and len(set(b)) > 1
                    else math.nan
                )
                d.spearman[m] = (rho, len(names))
        out.append(d)
    return out


def _nan(v: object) -> bool:
    try:
        return math.isnan(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True
