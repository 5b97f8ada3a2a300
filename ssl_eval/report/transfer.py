"""The transfer table: backbones x the datasets of the ``transfer`` collection, each cell in the
dataset's own metric (top-1, mean per-class accuracy or VOC2007's 11-point mAP,
``data/transfer.py``) with its 95% interval, and each backbone's average over the datasets it
has, with the datasets that average covers.

What is averaged is comparable only within one protocol: one table per single-label protocol
of the transfer records (``linear``, ``knn`` ...), each dataset's column the setting of that
protocol most backbones were run under (VOC2007 joins every table with its multi-label
protocol, as the literature's tables put its SVM mAP beside the others' linear numbers). A
backbone that lacks a dataset averages fewer datasets: its average says which it covers and is
marked, for averages over other datasets are no comparison. The interval of an average is the
half-widths of its cells combined as independent errors: sqrt(sum h_i^2) / n."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING

from ..data.transfer import COLLECTIONS, dataset_metric
from .leaderboard import SECTIONS, Cell, _md, build_table

if TYPE_CHECKING:
    import pandas as pd

METRIC_TEXT = {
    "top1": "top-1",
    "mean_per_class": "mean per-class accuracy",
    "map11": "11-point mAP",
}


@dataclass
class TransferTable:
    protocol: str  # the single-label protocol of the table (its cards' name)
    datasets: list[str]  # in the collection's order, those with a column
    rows: list[str]  # backbone labels
    cells: dict[tuple[str, str], Cell]  # (backbone label, dataset)
    columns: dict[str, str]  # dataset -> the column's label (dataset / protocol [setting])
    notes: list[str] = field(default_factory=list)

    def average(self, row: str) -> tuple[float, float | None, list[str]]:
        """(mean over the row's datasets, its half-width or None, the datasets covered)."""
        got = [d for d in self.datasets if (row, d) in self.cells]
        cells = [self.cells[row, d] for d in got]
        mean = sum(c.value for c in cells) / len(cells)
        if any(c.half_width is None for c in cells):
            return mean, None, got
        return mean, math.sqrt(sum(c.half_width**2 for c in cells)) / len(cells), got


def transfer_tables(frame: pd.DataFrame) -> list[TransferTable]:
    """One table per single-label protocol among the transfer records (none: [])."""
    if frame.empty or "dataset" not in frame:
        return []
    per_ds = {}
    for d in COLLECTIONS["transfer"]:
        sub = frame[frame["dataset"] == d]
        if not sub.empty:
            t = build_table(sub, dataset_metric(d))
            if t.cells:
                per_ds[d] = t

    def protocol(t, c) -> str:
        return t.col_summary[c]["protocol"]["name"]

    single = sorted(
        {protocol(t, c) for d, t in per_ds.items() if dataset_metric(d) != "map11" for c in t.cols}
    )
    multi = sorted(
        {protocol(t, c) for d, t in per_ds.items() if dataset_metric(d) == "map11" for c in t.cols}
    )
    out = []
    for p in single or multi:
        table = TransferTable(p, [], [], {}, {})
        for d, t in per_ds.items():
            want = multi if dataset_metric(d) == "map11" else [p]
            cols = [c for c in t.cols if protocol(t, c) in want]
            if not cols:
                continue
            filled = Counter(c for (_, c) in t.cells)
            col = min(cols, key=lambda c: (-filled[c], t.col_label[c]))
            if len(cols) > 1:
                table.notes.append(
                    f"{d}: {len(cols) - 1} other setting(s) of {'/'.join(want)} left out "
                    f"(the table shows {t.col_label[col]}, the one most backbones ran)"
                )
            table.datasets.append(d)
            table.columns[d] = t.col_label[col]
            for r in t.rows:
                if (r, col) in t.cells:
                    label = t.row_label[r]
                    table.cells[label, d] = t.cells[r, col]
                    if label not in table.rows:
                        table.rows.append(label)
        table.rows.sort(key=str.lower)
        out.append(table)
    return out


def _avg_text(t: TransferTable, row: str) -> tuple[str, bool]:
    mean, half, got = t.average(row)
    full = len(got) == len(t.datasets)
    s = f"{mean:.2f}" + (f" ± {half:.2f}" if half is not None else "")
    return (s if full else f"{s} † ({len(got)}/{len(t.datasets)}: {', '.join(got)})"), full


def _legend(t: TransferTable) -> list[str]:
    metrics = "; ".join(f"{d}: {METRIC_TEXT[dataset_metric(d)]}" for d in t.datasets)
    lines = [
        f"Each cell in its dataset's metric (%, ± half-width of the 95% interval): {metrics}. "
        "The average is over the datasets a backbone has, its interval the cells' half-widths "
        "combined as independent errors; † marks an average over fewer datasets "
        f"(not comparable with the full ones over all {len(t.datasets)}: "
        f"{', '.join(t.datasets)}).",
    ]
    return lines + [f"Left out: {n}." for n in t.notes]


def transfer_md(tables: list[TransferTable]) -> list[str]:
    """Markdown lines of every table (empty without transfer records)."""
    out: list[str] = []
    for t in tables:
        out += [f"### Transfer, {_md(t.protocol)}", ""]
        out.append(
            "| backbone | " + " | ".join(_md(t.columns[d]) for d in t.datasets) + " | average |"
        )
        out.append("|---|" + "---:|" * (len(t.datasets) + 1))
        for r in t.rows:
            cells = [t.cells.get((r, d)) for d in t.datasets]
            avg, _ = _avg_text(t, r)
            out.append(
                f"| {_md(r)} | "
                + " | ".join("–" if c is None else c.text() for c in cells)
                + f" | {_md(avg)} |"
            )
        out += ["", *(_md(x) for x in _legend(t)), ""]
    return out


def transfer_html(tables: list[TransferTable]) -> str:
    parts = []
    for t in tables:
        head = "".join(f"<th>{escape(t.columns[d])}</th>" for d in t.datasets)
        body = []
        for r in t.rows:
            tds = "".join(
                '<td class="na">&ndash;</td>' if c is None else f"<td>{escape(c.text())}</td>"
                for c in (t.cells.get((r, d)) for d in t.datasets)
            )
            body.append(f"<tr><td>{escape(r)}</td>{tds}<td>{escape(_avg_text(t, r)[0])}</td></tr>")
        parts.append(
            f"<h3>Transfer, {escape(t.protocol)}</h3><table><thead><tr><th>backbone</th>{head}"
            f"<th>average</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
            + "".join(f'<p class="note">{escape(x)}</p>' for x in _legend(t))
        )
    return "".join(parts)


SECTIONS.append(("Transfer", lambda frame: transfer_md(transfer_tables(frame))))
