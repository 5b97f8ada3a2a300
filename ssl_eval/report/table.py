"""The report's leaderboard, from the frame (``ssl_eval.records.frame.load_frame``): one row per
backbone, one column per dataset x protocol setting, each cell the headline metric with its 95%
interval and the setting it was measured under.

A column is one column setting (``setting.column_hash``): the same protocol on the same dataset
under other parameters gets a column of its own, its label marked with the start of its hash.
A row is one row setting (``setting.row_hash``), likewise marked when one backbone name has two.
In a cell, the newest record of each seed counts; where the setting depends on the seed and two
or more seeds ran, the value is their mean with the t interval over seeds, otherwise the newest
record's own interval (``<metric>.ci_method`` says which).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.stats import mean_ci

if TYPE_CHECKING:
    import pandas as pd

HEADLINE = "top1"


@dataclass
class Cell:
    value: float  # percent
    lo: float | None
    hi: float | None
    method: str  # how the interval was made ("" when there is none)
    n: int  # records (seeds) behind the value
    setting: str  # the full setting, readable (the cell's title)

    def text(self) -> str:
        if self.lo is None or self.hi is None:
            return f"{self.value:.1f}"
        return f"{self.value:.1f} [{self.lo:.1f}, {self.hi:.1f}]"


@dataclass
class Column:
    key: str  # setting.column_hash
    dataset: str
    protocol: str
    label: str
    protocol_type: str = ""


@dataclass
class Table:
    columns: list[Column] = field(default_factory=list)
    rows: list[str] = field(default_factory=list)  # row labels (backbone names)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)  # (row, column key)

    @property
    def datasets(self) -> list[str]:
        return sorted({c.dataset for c in self.columns})

    @property
    def protocols(self) -> list[str]:
        return sorted({c.protocol for c in self.columns})


def _num(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def describe_setting(summary_json: object) -> str:
    """A setting summary (canonical JSON) as ``key=value`` lines, for a hover title."""
    try:
        summary = json.loads(str(summary_json))
    except (TypeError, ValueError):
        return str(summary_json)
    lines: list[str] = []

    def walk(obj: object, prefix: str) -> None:
        if isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            text = json.dumps(obj) if isinstance(obj, list | dict) else str(obj)
            lines.append(f"{prefix}={text}")

    walk(summary, "")
    return "\n".join(lines)


def _row_labels(frame: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(backbone, row hash) -> the row label: the backbone name, marked with its row hash where
    one name has more than one row setting."""
    pairs = sorted(
        {
            (str(b), str(h))
            for b, h in zip(frame["backbone"], frame["setting.row_hash"], strict=True)
        }
    )
    count = Counter(b for b, _ in pairs)
    return {(b, h): (b if count[b] == 1 else f"{b} #{h[:6]}") for b, h in pairs}


def _pct(x: float | None) -> float | None:
    return None if x is None else 100 * x


def _cell(rows: pd.DataFrame, metric: str, setting: str) -> Cell | None:
    rows = rows[rows[metric].notna()].sort_values("time")
    if rows.empty:
        return None
    newest = rows.iloc[-1]
    per_seed = rows.drop_duplicates("seed", keep="last")
    if bool(newest.get("seed_dependent")) and len(per_seed) >= 2:
        m, _, lo, hi = mean_ci(per_seed[metric].astype(float).to_numpy())
        method, n = "t-seeds", len(per_seed)
    else:
        m, lo, hi = float(newest[metric]), newest.get(f"{metric}.lo"), newest.get(f"{metric}.hi")
        lo, hi = _num(lo), _num(hi)
        method, n = str(newest.get(f"{metric}.ci_method") or ""), 1
        if method == "nan":
            method = ""
    lo = None if lo is None else max(0.0, lo)
    hi = None if hi is None else min(1.0, hi)
    title = f"{setting}\ninterval={method or 'none'}\nrecords={n}"
    return Cell(100 * m, _pct(lo), _pct(hi), method, n, title)


def build_table(frame: pd.DataFrame, metric: str = HEADLINE) -> Table:
    """The leaderboard of every row of ``frame`` that has ``metric``."""
    table = Table()
    if frame.empty or metric not in frame.columns:
        return table
    frame = frame[frame[metric].notna()]
    if frame.empty:
        return table
    labels = _row_labels(frame)
    table.rows = sorted(set(labels.values()), key=str.lower)
    groups = frame.groupby(["dataset", "protocol", "setting.column_hash"], sort=True)
    per_pair = Counter((d, p) for d, p, _ in groups.groups)
    for (dataset, protocol, chash), rows in groups:
        label = f"{dataset} / {protocol}"
        if per_pair[(dataset, protocol)] > 1:
            label += f" #{str(chash)[:6]}"
        ptype = rows["protocol.type"].dropna()
        col = Column(
            str(chash), str(dataset), str(protocol), label, str(ptype.iloc[0]) if len(ptype) else ""
        )
        table.columns.append(col)
        for (b, h), cell_rows in rows.groupby(["backbone", "setting.row_hash"]):
            setting = describe_setting(cell_rows.sort_values("time").iloc[-1]["setting.summary"])
            cell = _cell(cell_rows, metric, setting)
            if cell is not None:
                table.cells[(labels[(str(b), str(h))], col.key)] = cell
    return table
