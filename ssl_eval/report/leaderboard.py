"""Result records -> leaderboard tables (CSV and markdown), never edited by hand (the paired
comparison of two backbones is ``report.compare``).

One cell holds the records of one setting (results.make_setting): rows are backbones (the row
side of the setting), columns are ``dataset / protocol`` (the column side). Records of the
same protocol under another setting (other params, another image size, another split) get a
column of their own, labelled with what differs from the column most records share
(``linear [lrs=30]``, ``knn @64px``; labels.py); a footnote lists every column's full setting.
A newer record of the same setting and seed replaces the older one. What a cell holds and which
interval it carries: cells.py (``Cell``, ``make_cell`` and the rest stay importable from here).

Dense probes' headline metrics stand in columns beside top-1 (``DENSE_HEADLINES``): mIoU in %
like top-1, RMSE in metres (lower is better: its best is the smallest; its interval is cut at
0 only).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..core.errors import UserError
from ..core.files import atomic_write_text, sha256_json
from ..protocols._edges import describe as describe_edge
from ..records.frame import load_frame
from ..records.schema import DENSE_HEADLINES, LOWER_IS_BETTER
from .cells import HEADLINE, KIND_MARK, KIND_TEXT, Cell, cell_columns, make_cell, narrow
from .cells import _clip as _clip
from .labels import _flat, _short, _summary_text, difference_labels

# more sections of leaderboard.md: (title, frame -> markdown lines, [] for none), registered by
# the modules that build them on this module's tables (the transfer table, report/transfer.py)
SECTIONS: list[tuple[str, Callable[[pd.DataFrame], list[str]]]] = []


@dataclass
class Table:
    rows: list[str]  # row keys, in display order
    cols: list[str]  # column keys
    row_label: dict[str, str]
    col_label: dict[str, str]
    col_summary: dict[str, dict]
    row_summary: dict[str, dict]
    cells: dict[tuple[str, str], Cell]
    metric: str = HEADLINE
    col_metric: dict[str, str] = dataclasses.field(default_factory=dict)  # merged tables

    def metric_of(self, col: str) -> str:
        return self.col_metric.get(col, self.metric)

    def best(self, col: str) -> float:
        pick = min if self.metric_of(col) in LOWER_IS_BETTER else max
        return pick(c.value for (_, k), c in self.cells.items() if k == col)

    def dataset_of(self, col: str) -> str:
        return str(self.col_summary[col]["dataset"]["name"])

    def protocol_of(self, col: str) -> str:
        return str(self.col_summary[col]["protocol"]["name"])

    def protocol_type_of(self, col: str) -> str:
        return str(self.col_summary[col]["protocol"].get("type") or "")

    def cell_title(self, row: str, col: str) -> str:
        """A cell's whole setting as ``key=value`` lines (``column.*`` and ``row.*``), then its
        interval and the record files behind it: the report's hover title."""
        cell = self.cells[(row, col)]
        flat = _flat({"column": self.col_summary[col], "row": self.row_summary[row]})
        lines = [f"{k}={_short(v)}" for k, v in sorted(flat.items())]
        lines.append(f"interval={KIND_TEXT.get(cell.kind, 'none')}")
        return "\n".join([*lines, f"records={len(cell.files)}"])

    @property
    def kinds(self) -> list[str]:
        """The interval kinds of the table's cells (their marks are explained under it)."""
        return sorted({c.kind for c in self.cells.values() if c.kind})

    @property
    def legend(self) -> str:
        """What each interval mark of the table's cells means (``ᵇ 95% bootstrap ...; ...``)."""
        return "; ".join(f"{KIND_MARK[k]} {KIND_TEXT[k]}" for k in self.kinds)


def _row_keys(frame: pd.DataFrame, rows: list[dict]) -> list[str]:
    """The row key of each frame row. A row is a backbone (tag and weights; for a model of
    ssl-eval's trainer, tag and training recipe, so its training runs share a row); its preprocessing
    and feature kind split it into several rows only where records disagree on them. A record
    run with an ``--image-size`` or ``--feature-kind`` override (whose column says so) joins
    the row of its backbone's own preprocessing."""
    col = "load_report.training.recipe"
    recipes = [
        r if isinstance(r, str) and r else None
        for r in (frame[col] if col in frame.columns else [None] * len(frame))
    ]
    base = [
        sha256_json({k: row.get(k) for k in ("backbone", "weights")})[:16]
        if not recipe
        else sha256_json({"backbone": row.get("backbone"), "recipe": recipe})[:16]
        for row, recipe in zip(rows, recipes, strict=True)
    ]
    variant = [
        sha256_json({k: row[k] for k in ("preprocessing", "feature_kind")})[:16]
        if "preprocessing" in row and "feature_kind" in row
        else None
        for row in rows
    ]
    keys = pd.DataFrame({"base": base, "variant": variant}, index=frame.index)
    out = keys["base"].copy()
    for b, group in keys.groupby("base"):
        seen = group["variant"].dropna().value_counts(sort=False)
        if len(seen) <= 1:
            continue
        common = seen.sort_values(ascending=False, kind="stable").index[0]
        out[group.index] = b + ":" + group["variant"].fillna(common)
    return out.tolist()


def build_table(frame: pd.DataFrame, metric: str = HEADLINE) -> Table:
    """The leaderboard of every row of ``frame`` (``ssl_eval.records.frame.load_frame``) that has
    ``metric``: rows are row settings, columns column settings, one cell per pair."""
    empty = Table([], [], {}, {}, {}, {}, {})
    if frame.empty or metric not in frame.columns:
        return empty
    frame = frame[frame[metric].notna()]
    if frame.empty:
        return empty
    summaries = [json.loads(s) for s in frame["setting.summary"]]
    frame = frame.assign(
        _row=_row_keys(frame, [s["row"] for s in summaries]),
        _col=frame["setting.column_hash"].astype(str),
    )
    row_summary: dict[str, dict] = {}
    col_summary: dict[str, dict] = {}
    row_tag: dict[str, str] = {}
    for rk, ck, tag, s in zip(
        frame["_row"], frame["_col"], frame["backbone"], summaries, strict=True
    ):
        if rk not in row_summary or len(s["row"]) > len(row_summary[rk]):
            row_summary[rk] = s["row"]
        col_summary[ck] = s["column"]
        row_tag[rk] = str(tag)
    counts_row = Counter(frame["_row"])
    counts_col = Counter(frame["_col"])

    # datasets: one name with several contents gets the content hash in its label
    fps: dict[str, set] = {}
    for s in col_summary.values():
        fps.setdefault(s["dataset"]["name"], set()).add(s["dataset"]["fingerprint"])

    def ds_label(s: dict) -> str:
        name = s["dataset"]["name"]
        return f"{name}#{str(s['dataset']['fingerprint'])[:6]}" if len(fps[name]) > 1 else name

    col_label = {}
    groups: dict[tuple, list[str]] = {}
    for k, s in col_summary.items():
        groups.setdefault((ds_label(s), s["protocol"]["name"]), []).append(k)
    for (ds, proto), keys in groups.items():
        labels = difference_labels({k: _without_dataset(col_summary[k]) for k in keys}, counts_col)
        for k in keys:
            col_label[k] = f"{ds} / {proto}" + (f" [{labels[k]}]" if labels[k] else "")
    row_label = {}
    tags: dict[str, list[str]] = {}
    for k, tag in row_tag.items():
        tags.setdefault(tag, []).append(k)
    for tag, keys in tags.items():
        labels = difference_labels({k: row_summary[k] for k in keys}, counts_row)
        for k in keys:
            row_label[k] = tag + (f" [{labels[k]}]" if labels[k] else "")
    cell_rows = narrow(frame, [*cell_columns(metric), "_row", "_col"])
    cells = {(rk, ck): make_cell(g, metric) for (rk, ck), g in cell_rows.groupby(["_row", "_col"])}
    rows = sorted(row_label, key=lambda k: row_label[k])
    cols = sorted(col_label, key=lambda k: col_label[k])
    cols = _beside_linear(
        cols, {k: (ds_label(s), s["protocol"].get("type")) for k, s in col_summary.items()}
    )
    return Table(rows, cols, row_label, col_label, col_summary, row_summary, cells, metric)


EDGES_TITLE = "Chosen at the edge of the grid"
EDGES_TEXT = (
    "These cells chose a hyperparameter on validation at its grid's smallest or largest value: "
    "the best may lie beyond the grid, so each is the best of the grid searched. Widen the "
    "card's grid (--set) to know more."
)


def grid_edge_cells(t: Table, frame: pd.DataFrame) -> list[tuple[str, str, str, str]]:
    """(row label, column label, records, what) of each cell some of whose records chose a
    hyperparameter at the edge of its grid (``details.grid_edges``, protocols/_edges.py);
    ``records`` is "k of n records" where the cell holds several."""
    col = "details.grid_edges"
    if col not in frame.columns:
        return []
    by_file = {
        str(f): json.loads(e)
        for f, e in zip(frame["file"], frame[col], strict=True)
        if isinstance(e, str) and e
    }
    out = []
    for r in t.rows:
        for c in t.cols:
            cell = t.cells.get((r, c))
            found = [by_file[f] for f in (cell.files if cell else []) if f in by_file]
            if found:
                what = "; ".join(sorted({describe_edge(e) for edges in found for e in edges}))
                n = f"{len(found)} of {len(cell.files)} records" if len(cell.files) > 1 else ""
                out.append((t.row_label[r], t.col_label[c], n, what))
    return out


def edge_items(cells: list[tuple[str, str, str, str]], esc: Callable[[str], str]) -> list[str]:
    """``grid_edge_cells`` as markdown list items, each text through ``esc`` (leaderboard.md's
    escaping or the report's)."""
    return [
        f"- **{esc(r)}** / {esc(c)}{esc(f' ({n})') if n else ''}: {esc(what)}"
        for r, c, n, what in cells
    ]


def edge_lines(t: Table, frame: pd.DataFrame) -> list[str]:
    """``grid_edge_cells`` as a markdown section; [] when there are none."""
    cells = grid_edge_cells(t, frame)
    if not cells:
        return []
    return ["", f"## {EDGES_TITLE}", "", EDGES_TEXT, "", *edge_items(cells, _md)]


METRIC_LABEL = {"miou": "mIoU %", "rmse": "RMSE m"}
NOTE = (
    "Best per column in bold. Top-1 and mIoU in %, RMSE in metres (lower is better), each with "
    "the half-width of its 95% interval; a model of ssl-eval's trainer is one row per recipe "
    "(its training runs together)."
)
UNITS = {HEADLINE: "top-1 (%)", "miou": "mIoU (%)", "rmse": "RMSE (m, lower is better)"}


def headline_table(frame: pd.DataFrame) -> Table:
    """Top-1 columns, then the dense probes' mIoU and RMSE columns, in one table."""
    parts = [build_table(frame, HEADLINE)] + [build_table(frame, m) for m in DENSE_HEADLINES]
    out = Table([], [], {}, {}, {}, {}, {}, HEADLINE)
    for t in parts:
        for c in t.cols:
            if c in out.col_label:  # a column of one setting under two metrics: kept once
                continue
            out.cols.append(c)
            out.col_metric[c] = t.metric
            extra = "" if t.metric == HEADLINE else f" ({METRIC_LABEL[t.metric]})"
            out.col_label[c] = t.col_label[c] + extra
            out.col_summary[c] = t.col_summary[c]
            out.cells.update({(r, k): v for (r, k), v in t.cells.items() if k == c})
        for r in t.rows:
            if r not in out.row_label:
                out.rows.append(r)
                out.row_label[r], out.row_summary[r] = t.row_label[r], t.row_summary[r]
    out.rows.sort(key=lambda k: out.row_label[k])
    return out


def _beside_linear(cols: list[str], kind: dict[str, tuple]) -> list[str]:
    """Each attentive-probe column moved right after its dataset's linear-probe columns, so a
    row reads linear and attentive side by side (as the efficient-probing leaderboard sets LP
    beside EP); ``kind`` maps a column to (dataset label, protocol type). Columns of a table
    without both keep their order."""
    moved = [
        k
        for k in cols
        if kind[k][1] == "attentive" and any(kind[c] == (kind[k][0], "linear") for c in cols)
    ]
    out = [k for k in cols if k not in moved]
    for k in moved:
        last = max(
            i
            for i, c in enumerate(out)
            if kind[c][0] == kind[k][0] and kind[c][1] in ("linear", "attentive")
        )
        out.insert(last + 1, k)
    return out


def _without_dataset(s: dict) -> dict:
    return {k: v for k, v in s.items() if k != "dataset"}


# ---------------------------------------------------------------- files


def leaderboard_frame(t: Table) -> pd.DataFrame:
    """The table as a DataFrame (what ``leaderboard.csv`` holds): one row per backbone, for
    each column its value, ``±`` half-width and interval kind; a last row ``best`` names the
    best backbone(s) of each column."""
    data: dict[str, list] = {"backbone": [t.row_label[b] for b in t.rows] + ["best"]}
    for c in t.cols:
        label = t.col_label[c]
        cells = [t.cells.get((b, c)) for b in t.rows]
        best = t.best(c)
        winners = ";".join(
            t.row_label[b] for b, x in zip(t.rows, cells, strict=True) if x and x.value == best
        )
        data[label] = [f"{x.value:.2f}" if x else "" for x in cells] + [winners]
        data[f"{label} ±"] = [
            f"{x.half_width:.2f}" if x and x.half_width is not None else "" for x in cells
        ] + [""]
        data[f"{label} interval"] = [x.kind if x else "" for x in cells] + [""]
    return pd.DataFrame(data)


def write_leaderboard(results_dir: Path, metric: str = HEADLINE) -> tuple[Path, Path]:
    results_dir = Path(results_dir)
    frame = load_frame(results_dir)
    if frame.empty:
        raise UserError(
            f"no result records under {results_dir / 'records'}; run `ssl-eval run` first"
        )
    n_records = frame.attrs.get("n_records", len(frame))
    t = headline_table(frame) if metric == HEADLINE else build_table(frame, metric)
    probes = probe_table(results_dir, frame)
    extra = [(title, body) for title, make in SECTIONS if (body := make(frame))]
    if not t.cells and probes is None and not extra:
        raise UserError(f"no records carry the metric {metric!r}")
    best = {c: t.best(c) for c in t.cols}
    csv_path = results_dir / "leaderboard.csv"
    atomic_write_text(csv_path, leaderboard_frame(t).to_csv(index=False, lineterminator="\n"))

    lines = [
        f"# Leaderboard ({metric}, %, ± half-width of the 95% interval)"
        if not t.col_metric or set(t.col_metric.values()) == {metric}
        else "# Leaderboard (top-1 and mIoU in %, RMSE in metres, lower better; ± half-width "
        "of the 95% interval)",
        "",
        f"Generated by `ssl-eval leaderboard` from {n_records} records in `records/`; "
        "do not edit by hand. Best per column in **bold**. See README.md for the columns.",
        "",
        "| backbone | " + " | ".join(_md(t.col_label[c]) for c in t.cols) + " |",
        "|---|" + "---:|" * len(t.cols),
    ]
    for b in t.rows:
        out = []
        for c in t.cols:
            cell = t.cells.get((b, c))
            out.append(
                ""
                if cell is None
                else (f"**{cell.text()}**" if cell.value == best[c] else cell.text())
            )
        lines.append(f"| {_md(t.row_label[b])} | " + " | ".join(out) + " |")
    lines += ["", f"Intervals: {t.legend}."]
    lines += edge_lines(t, frame)
    lines += [
        "",
        "## Settings",
        "",
        "Every column is one setting: the protocol card with its resolved params, the data, the "
        "split and the feature options. Columns that share a protocol are labelled with what "
        "differs.",
        "",
    ]
    for c in t.cols:
        lines.append(f"- `{c}` **{_md(t.col_label[c])}**: {_md(_summary_text(t.col_summary[c]))}")
    labelled = [b for b in t.rows if t.row_label[b] != t.row_summary[b]["backbone"]]
    if labelled:
        lines += ["", "Rows of one backbone under several settings:", ""]
        lines += [
            f"- `{b}` **{_md(t.row_label[b])}**: {_md(_summary_text(t.row_summary[b]))}"
            for b in labelled
        ]
    for title, body in extra:
        lines += ["", f"## {title}", "", *body]
    if probes is not None:
        lines += ["", *probe_markdown(probes)]
        atomic_write_text(results_dir / "probes.csv", probes.to_csv(float_format="%.4f"))
    md_path = results_dir / "leaderboard.md"
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


# ---------------------------------------------------------------- probes and diagnostics

PROBE_TYPES = ("invariance", "diagnostics")


def probe_table(results_dir: Path, frame: pd.DataFrame | None = None):
    """Backbone x metric table (pandas) of the newest invariance and diagnostics records, one
    column per (dataset, metric); None when there are none. Decodability is a test top-1
    (shown in %), invariance a score in [-1, 1] and the diagnostics their own units."""
    frame = load_frame(results_dir) if frame is None else frame
    if frame.empty or "protocol.type" not in frame:
        return None
    frame = frame[frame["protocol.type"].isin(PROBE_TYPES)].sort_values("time", kind="stable")
    if frame.empty:
        return None
    metric_cols = [
        c
        for c in frame.columns
        if c.split(".")[0] == c and (c.startswith(("decode_", "inv_")) or c in DIAGNOSTICS)
    ]
    # the newest record of each backbone, weights and setting; a model trained with several
    # seeds (one row, several weights) shows the mean over its training runs
    if "setting.row.weights" in frame.columns:
        frame = frame.assign(_w=frame["setting.row.weights"].astype(str))
        frame = frame.drop_duplicates(["backbone", "_w", "setting.column_hash"], keep="last")
    long = frame.melt(
        id_vars=["backbone", "dataset", "setting.column_hash"],
        value_vars=metric_cols,
        var_name="metric",
    ).dropna(subset=["value"])
    # one column per setting: a dataset probed under two card settings gets two columns
    n_settings = long.groupby(["dataset", "metric"])["setting.column_hash"].transform("nunique")
    tag = long["setting.column_hash"].str[:6].where(n_settings > 1, "")
    long["column"] = (
        long["dataset"] + tag.map(lambda t: f" [{t}]" if t else "") + " / " + long["metric"]
    )
    table = long.pivot_table(
        index="backbone", columns="column", values="value", aggfunc="mean", sort=False
    )
    order = [c for m in metric_cols for c in table.columns if c.endswith(f" / {m}")]
    return table[list(dict.fromkeys(order))].sort_index()


DIAGNOSTICS = ("rankme", "alignment", "uniformity")


def probe_markdown(table) -> list[str]:
    def fmt(col: str, v) -> str:
        if v != v:  # NaN: not measured
            return ""
        metric = col.rsplit(" / ", 1)[1]
        return (
            f"{100 * v:.1f}"
            if metric.startswith("decode_")
            else f"{v:.3f}"
            if metric.startswith("inv_")
            else f"{v:.2f}"
        )

    lines = [
        "## Invariance probes and label-free diagnostics",
        "",
        "`decode_<factor>`: test top-1 (%) of a linear probe for that factor; `inv_<aug>`: "
        "invariance to that augmentation (1: features unchanged, 0: moved as far as another "
        "image); `rankme`: effective rank; `alignment` (lower: views closer) and `uniformity` "
        "(lower: more spread). Written also as `probes.csv`.",
        "",
        "| backbone | " + " | ".join(_md(c) for c in table.columns) + " |",
        "|---|" + "---:|" * len(table.columns),
    ]
    for b, row in table.iterrows():
        lines.append(f"| {_md(b)} | " + " | ".join(fmt(c, row[c]) for c in table.columns) + " |")
    return lines


def single_line(text: str) -> str:
    """``text`` with every line break (``\\n``, ``\\r`` and the rest ``str.splitlines``
    splits on) made a space: a markdown row stays one row."""
    return _BREAKS.sub(" ", text)


_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def _md(text: str) -> str:
    """A table-safe markdown string: pipes and backticks escaped, no line breaks of any kind
    (``\\r``, ``\\n`` and every other character ``str.splitlines`` splits on)."""
    escaped = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return single_line(escaped)
