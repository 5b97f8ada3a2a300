"""The report's figures (matplotlib, Agg): per-protocol bars with interval whiskers, few-shot
accuracy against K with interval bands, and the invariance heat map. Each is a ``Figure`` holding
its PNG bytes, written beside report.md and inlined (base64) in index.html.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..records.schema import LOWER_IS_BETTER
from .leaderboard import HEADLINE, UNITS, Table

if TYPE_CHECKING:
    import pandas as pd

_SHOT = re.compile(r"^top1@(?P<clf>[^/]+)/(?P<k>\d+)shot$")
_METRIC_PARTS = (".lo", ".hi", ".ci_method", ".std", ".n", ".per_sample_correct", ".n_test")


@dataclass
class Figure:
    name: str  # the PNG's file name (safe characters only)
    title: str  # plain text (escaped where it is shown)
    png: bytes


def plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as pyplot

    return pyplot


def mpl_text(s: object) -> str:
    """A name as matplotlib shows it literally (``$`` would start mathtext)."""
    return str(s).replace("$", r"\$")


def file_name(*parts: object) -> str:
    """A file name safe on any disk, unique for its parts."""
    text = "-".join(str(p) for p in parts)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "figure"
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.png"


DPI = 80  # the page inlines every figure: at 100 dpi a 13-backbone suite's page passed 2 MB
PALETTE = 256  # colours of the stored PNG (median cut, no dithering)


def to_png(fig) -> bytes:
    """The figure as a palette PNG: matplotlib's RGBA rendering cut to ``PALETTE`` colours.
    A plot's flat colours stay exact; only anti-aliased edges move to a near palette colour.
    The page inlines every figure, and the default suite's 39 figures took 1.55 MB as RGBA
    PNGs (the page 2.23 MB), 0.56 MB as palette PNGs."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt().close(fig)
    buf.seek(0)
    rgb = Image.open(buf).convert("RGB")
    out = io.BytesIO()
    rgb.quantize(PALETTE, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, format="PNG", optimize=True
    )
    return out.getvalue()


def _f(v: object) -> float:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------- figure jobs


def bar_jobs(table: Table) -> Iterator[tuple[str, Callable[[], Figure]]]:
    """One bar chart per protocol and headline metric (the leaderboard's columns: top-1, mIoU,
    RMSE): a bar per row and column, whiskers the cell's 95% interval."""
    groups: dict[tuple[str, str], list[str]] = {}
    for c in table.cols:
        groups.setdefault((table.protocol_of(c), table.metric_of(c)), []).append(c)
    for (protocol, metric), cols in sorted(groups.items()):
        yield (
            f"bars {protocol}",
            lambda cols=cols, protocol=protocol, metric=metric: _bars(
                table, cols, protocol, metric
            ),
        )


def _bars(table: Table, cols: list[str], protocol: str, metric: str) -> Figure:
    p = plt()
    rows = [r for r in table.rows if any((r, c) in table.cells for c in cols)]
    fig, ax = p.subplots(figsize=(max(4.0, 1.2 * len(rows) * max(1, len(cols)) ** 0.5 + 2), 3.2))
    width = 0.8 / max(1, len(cols))
    for j, col in enumerate(cols):
        xs, ys, err = [], [], [[], []]
        for i, r in enumerate(rows):
            cell = table.cells.get((r, col))
            if cell is None:
                continue
            xs.append(i + (j - (len(cols) - 1) / 2) * width)
            ys.append(cell.value)
            err[0].append(cell.value - cell.lo if cell.lo is not None else 0.0)
            err[1].append(cell.hi - cell.value if cell.hi is not None else 0.0)
        ax.bar(xs, ys, width=width, yerr=err, capsize=3, label=mpl_text(table.col_label[col]))
    labels = [mpl_text(table.row_label[r]) for r in rows]
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    unit = UNITS.get(metric, metric)
    ax.set_ylabel(f"{unit}, 95% interval")
    if metric in LOWER_IS_BETTER:  # an error: from 0, no upper end (percentages: 0 to 100)
        ax.set_ylim(bottom=0)
    else:
        ax.set_ylim(0, 100)
    ax.set_title(mpl_text(f"{protocol}: {unit}"))
    ax.legend(fontsize=7, loc="lower right")
    name = protocol if metric == HEADLINE else f"{protocol}-{metric}"
    return Figure(file_name("bars", name), f"{protocol}: {unit} per backbone", to_png(fig))


def fewshot_jobs(frame: pd.DataFrame) -> Iterator[tuple[str, Callable[[], Figure]]]:
    """Few-shot accuracy against K, one panel per classifier, one line (with its 95% band) per
    backbone, for each dataset and few-shot column setting."""
    if frame.empty or "protocol.type" not in frame.columns:
        return
    shots = [c for c in frame.columns if _SHOT.match(str(c))]
    rows = frame[frame["protocol.type"] == "fewshot"]
    if rows.empty or not shots:
        return
    for (dataset, protocol, chash), g in rows.groupby(
        ["dataset", "protocol", "setting.column_hash"]
    ):
        g = g.sort_values("time").drop_duplicates("backbone", keep="last")
        title = f"{dataset} / {protocol}"
        yield (
            f"few-shot {title}",
            lambda g=g, title=title, chash=chash: _fewshot(g, shots, title, chash),
        )


def _fewshot(g: pd.DataFrame, shots: list[str], title: str, chash: str) -> Figure:
    p = plt()
    by_clf: dict[str, list[tuple[int, str]]] = {}
    for c in shots:
        if g[c].notna().any():
            m = _SHOT.match(c)
            by_clf.setdefault(m["clf"], []).append((int(m["k"]), c))
    clfs = sorted(by_clf)
    fig, axes = p.subplots(
        1, max(1, len(clfs)), figsize=(3.6 * max(1, len(clfs)), 3.2), squeeze=False
    )
    for ax, clf in zip(axes[0], clfs, strict=False):
        ks = sorted(by_clf[clf])
        for _, r in g.iterrows():
            pts = [(k, _f(r[c]), _f(r.get(f"{c}.lo")), _f(r.get(f"{c}.hi"))) for k, c in ks]
            pts = [t for t in pts if not math.isnan(t[1])]
            if not pts:
                continue
            k, v, lo, hi = (list(t) for t in zip(*pts, strict=True))
            (line,) = ax.plot(k, [100 * x for x in v], marker="o", label=mpl_text(r["backbone"]))
            if not any(math.isnan(x) for x in lo + hi):
                ax.fill_between(
                    k,
                    [100 * x for x in lo],
                    [100 * x for x in hi],
                    alpha=0.2,
                    color=line.get_color(),
                )
        ax.set_xscale("log")
        ax.set_xticks([k for k, _ in ks], [str(k) for k, _ in ks])
        ax.set_xlabel("K (labelled images per class)")
        ax.set_ylabel("top-1 (%), 95% band")
        ax.set_title(mpl_text(f"{title}: {clf}"), fontsize=9)
        ax.legend(fontsize=7)
    return Figure(
        file_name("fewshot", title, chash), f"{title}: few-shot top-1 against K", to_png(fig)
    )


def metric_columns(rows: pd.DataFrame) -> list[str]:
    """The metric columns some row of ``rows`` holds (a value, not an interval part)."""
    from ..records.frame import IDENTITY

    skip = ("setting.", "protocol.", "dataset.", "split.", "weights.", "preprocessing.")
    skip += ("load_report.", "packages.", "details.")
    out = []
    for c in rows.columns:
        c = str(c)
        if c in IDENTITY or c.startswith(skip) or c.endswith(_METRIC_PARTS):
            continue
        if c in ("feature_kind", "code_version", "device", "wall_time_s", "peak_memory_mb"):
            continue
        if rows[c].notna().any() and all(isinstance(v, int | float) for v in rows[c].dropna()):
            out.append(c)
    return out


def invariance_jobs(frame: pd.DataFrame) -> Iterator[tuple[str, Callable[[], Figure]]]:
    """A backbone x metric heat map of the invariance records, per dataset."""
    if frame.empty or "protocol.type" not in frame.columns:
        return
    rows = frame[frame["protocol.type"] == "invariance"]
    for dataset, g in rows.groupby("dataset"):
        g = g.sort_values("time").drop_duplicates("backbone", keep="last")
        metrics = metric_columns(g)
        if metrics:
            yield f"invariance {dataset}", lambda g=g, m=metrics, d=dataset: _heat(g, m, d)


def _heat(g: pd.DataFrame, metrics: list[str], dataset: str) -> Figure:
    p = plt()
    names = [str(b) for b in g["backbone"]]
    values = [[_f(v) for v in g[m]] for m in metrics]
    fig, ax = p.subplots(figsize=(1.0 * len(metrics) + 2.5, 0.5 * len(names) + 1.8))
    grid = [[values[j][i] for j in range(len(metrics))] for i in range(len(names))]
    finite = [x for r in grid for x in r if not math.isnan(x)]
    vmin, vmax = min([0.0, *finite]), max([1.0, *finite])
    im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    for i in range(len(names)):
        for j in range(len(metrics)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(metrics)), [mpl_text(m) for m in metrics], rotation=30, ha="right")
    ax.set_yticks(range(len(names)), [mpl_text(n) for n in names])
    ax.set_title(mpl_text(f"{dataset}: invariance and decodability"))
    fig.colorbar(im, ax=ax)
    return Figure(file_name("invariance", dataset), f"{dataset}: invariance heat map", to_png(fig))
