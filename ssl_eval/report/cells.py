"""One leaderboard cell: the records of one setting (any seeds, any training runs) -> a value
in the metric's display unit and its 95% interval, and what marks the interval's kind.

The interval of a cell is one of (and the markdown marks which):
  * ``t-seeds``: the t interval over seeds, where the setting depends on the seed and at least
    two seeds ran (the value is then the mean over seeds);
  * ``t-runs``: the t interval over training runs of one recipe (other trained weights, same
    everything else; the value is the mean of each run's mean over its seeds);
  * otherwise the newest record's own interval: the bootstrap over test images
    (``bootstrap-test``), or for protocols that repeat themselves, the t interval over their
    draws (few-shot) or episodes.
An interval is clipped to the metric's range [0, 100]; an error (RMSE) is cut at 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..core.stats import mean_ci
from ..records.schema import LOWER_IS_BETTER

HEADLINE = "top1"
KIND_MARK = {"bootstrap": "ᵇ", "t-seeds": "ˢ", "t-draws": "ᵈ", "t-episodes": "ᵉ", "t-runs": "ʳ"}
KIND_TEXT = {
    "t-runs": "95% t interval over training runs of one recipe (mean over its training seeds)",
    "bootstrap": "95% bootstrap interval over test images (one run)",
    "t-seeds": "95% t interval over seeds (mean over seeds)",
    "t-draws": "95% t interval over the protocol's support draws",
    "t-episodes": "95% t interval over the protocol's episodes",
}


@dataclass
class Cell:
    value: float  # percent
    lo: float | None  # percent, clipped to [0, 100]
    hi: float | None
    kind: str  # bootstrap | t-seeds | t-draws | t-episodes | "" (no interval)
    n: int  # seeds averaged (t-seeds), draws / episodes, else 1
    files: list[str]  # the record files behind the value
    clipped: bool = False  # the interval reached past [0, 100] and was cut there

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    def text(self) -> str:
        s = f"{self.value:.2f}"
        if self.lo is not None:
            if self.clipped:  # cut at the metric's range: shown as the interval itself
                s += f" [{self.lo:.2f}, {self.hi:.2f}]"
            else:
                s += f" ± {self.half_width:.2f}"
        if self.kind in ("t-seeds", "t-runs"):
            s += f" (n={self.n})"
        return s + KIND_MARK.get(self.kind, "")


def _interval_kind(ci_method: object) -> str:
    if not isinstance(ci_method, str) or not ci_method:
        return ""
    if ci_method == "bootstrap-test":
        return "bootstrap"
    return "t-episodes" if "episode" in ci_method else "t-draws"


def _clip(lo: float, hi: float, metric: str = HEADLINE) -> tuple[float, float, bool]:
    if metric in LOWER_IS_BETTER:  # an error: at least 0, no upper end
        return max(lo, 0.0), hi, lo < 0.0
    return max(lo, 0.0), min(hi, 1.0), lo < 0.0 or hi > 1.0


def _scale(metric: str) -> float:
    """Fractions are shown in percent; errors (RMSE in metres, AbsRel) as they are."""
    return 1.0 if metric in LOWER_IS_BETTER else 100.0


def _present(v: object) -> bool:
    return v is not None and v == v  # NaN is a value the frame lacks


def cell_columns(metric: str = HEADLINE) -> list[str]:
    """The frame columns a cell of ``metric`` is made of (``make_cell`` reads no other)."""
    return [
        "setting.row.weights",
        "seed",
        "seed_dependent",
        "time",
        "run_id",
        "file",
        metric,
        *(f"{metric}.{k}" for k in ("lo", "hi", "n", "ci_method")),
    ]


def narrow(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Only ``columns`` (those present) of ``frame``: pandas copies every column on each
    sort and selection, and a results folder's frame has hundreds."""
    return frame[[c for c in dict.fromkeys(columns) if c in frame.columns]]


def make_cell(rows: pd.DataFrame, metric: str = HEADLINE) -> Cell:
    """The cell of one setting's frame rows (any seeds): the newest row per seed, then the t
    interval over seeds where the setting depends on the seed, else the newest row's own.
    Rows of several training runs of one recipe (other trained weights, same everything
    else) give the mean over the runs (each run's mean over its seeds) and the t interval over
    the runs: a retrained model is another model, and the runs' spread is the honest one."""
    rows = narrow(rows, cell_columns(metric))
    k = _scale(metric)
    weights = rows.get("setting.row.weights")
    if weights is not None and weights.nunique(dropna=False) >= 2:
        per_run = [make_cell(g, metric) for _, g in rows.groupby(weights.astype(str), sort=False)]
        m, _, lo, hi = mean_ci(np.array([c.value / k for c in per_run]))
        lo, hi, cut = _clip(lo, hi, metric)
        files = [f for c in per_run for f in c.files]
        return Cell(k * m, k * lo, k * hi, "t-runs", len(per_run), files, cut)
    if len(rows) == 1:  # most cells: one record, newest of its seed by itself
        newest = rows
    else:
        rows = rows.assign(_seed=rows["seed"].where(rows["seed_dependent"].astype(bool), None))
        newest = (
            rows.sort_values(["time", "run_id"], kind="stable")
            .groupby("_seed", dropna=False, sort=False)
            .tail(1)
            .sort_values(["seed", "time"], kind="stable")
        )
    files = newest["file"].astype(str).tolist()
    if len(newest) >= 2:
        m, _, lo, hi = mean_ci(newest[metric].astype(float).to_numpy())
        lo, hi, cut = _clip(lo, hi, metric)
        return Cell(k * m, k * lo, k * hi, "t-seeds", len(newest), files, cut)
    r = newest.iloc[0]
    value = k * float(r[metric])
    lo, hi = r.get(f"{metric}.lo"), r.get(f"{metric}.hi")
    if not (_present(lo) and _present(hi)):
        return Cell(value, None, None, "", 1, files)
    lo, hi, cut = _clip(float(lo), float(hi), metric)
    n = r.get(f"{metric}.n")
    n = int(n) if _present(n) else 1
    kind = _interval_kind(r.get(f"{metric}.ci_method"))
    return Cell(value, k * lo, k * hi, kind, n, files, cut)
