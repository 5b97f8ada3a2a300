"""``write_report(results_dir)``: the HTML and markdown report of a results folder.

``<results>/report/index.html`` is one static, self-contained page (inline CSS and JS, figures
inlined as base64 PNG, no fetch of any kind): the leaderboard (sortable by clicking a header,
filtered by dataset and protocol, each cell's setting in its hover title), per-protocol bar
charts with 95% interval whiskers, the transfer table (each dataset in its own metric, the
average over the datasets each backbone covers; ``transfer.py``), few-shot accuracy against K with 95% bands, a t-SNE map of each
backbone's cached test features, the invariance heat map, and the label-free diagnostics with
their rank correlation with linear accuracy, the dense probes' predicted masks beside the
ground truth for a few test images; after the leaderboard, what the numbers say,
generated from the records by the same tests for every model, column and probe
(``findings.py``; also written alone as ``<results>/report/findings.md``, the text a README
quotes). ``<results>/report/report.md`` holds the same with the figures as PNG files beside
it. A section whose records (or cached features) are absent is left out; a figure that
cannot be drawn is skipped with a warning.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from ..core.files import atomic_write_bytes, atomic_write_text, ensure_writable_dir
from ..core.runtime import warn
from . import html, markdown
from .dense_figures import dense_jobs
from .figures import Figure, bar_jobs, fewshot_jobs, invariance_jobs
from .findings import TITLE as FINDINGS_TITLE
from .findings import findings
from .leaderboard import EDGES_TITLE, grid_edge_cells, headline_table
from .maps import diagnostics, tsne_jobs
from .published import comparisons, published_html, published_md
from .transfer import transfer_html, transfer_md, transfer_tables

__all__ = ["write_report"]

TITLE = "ssl-eval report"
PUBLISHED_TITLE = "Published numbers"
# the names figures.file_name gives: what a report may remove from its folder
_OURS = re.compile(r"^(bars|fewshot|tsne|invariance|dense)-[A-Za-z0-9_.-]*-[0-9a-f]{8}\.png$")


def _draw(
    jobs: Iterable[tuple[str, Callable[[], Figure | None]]], desc: str, progress: bool
) -> list[Figure]:
    from tqdm import tqdm

    jobs = list(jobs)
    out: list[Figure] = []
    for name, job in tqdm(
        jobs, desc=desc, file=sys.stderr, disable=not progress or not jobs, leave=False
    ):
        try:
            fig = job()
        except Exception as e:  # noqa: BLE001 - a figure is never worth losing the report
            warn(f"report: could not draw {name} ({type(e).__name__}: {e}); skipping it")
            continue
        if fig is not None:
            out.append(fig)
    return out


def write_report(
    results_dir: str | Path,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    out_dir: str | Path | None = None,
    published: str | Path | None = None,
) -> Path:
    """Write ``index.html``, ``report.md`` (with its PNG figures) and ``findings.md`` into
    ``out_dir`` (default ``<results_dir>/report``) from the records under ``results_dir``;
    features for the t-SNE maps come from ``cache_dir`` (default ``$SSL_EVAL_CACHE`` or
    ``~/.cache/ssl-eval``); records that are the setting of a published number
    (``published``, default protocols/published.yaml) are shown against it in a "Published"
    table. Returns the path of index.html."""
    from ..features.extraction import default_cache_dir
    from ..records.frame import load_frame

    results_dir = Path(results_dir)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out_dir = ensure_writable_dir(
        Path(out_dir) if out_dir is not None else results_dir / "report", "report folder"
    )
    frame = load_frame(results_dir)
    table = headline_table(frame)  # the rows, cells and intervals of leaderboard.md
    groups = [
        ("Headline metric per protocol", _draw(bar_jobs(table), "report: bar charts", progress)),
        ("Few-shot accuracy against K", _draw(fewshot_jobs(frame), "report: few-shot", progress)),
        ("t-SNE of test features", _draw(tsne_jobs(frame, cache), "report: t-SNE", progress)),
        ("Invariance", _draw(invariance_jobs(frame), "report: invariance", progress)),
        (
            "Dense predictions (test images: ground truth and predicted masks)",
            _draw(dense_jobs(results_dir), "report: dense", progress),
        ),
    ]
    diags = diagnostics(frame)
    found = findings(results_dir, frame)
    against = _published(results_dir, published)

    figs = [f for _, fs in groups for f in fs]
    keep = {f.name for f in figs}
    for old in out_dir.glob("*.png"):  # figures of an earlier report that this one no longer has
        if old.name not in keep and _OURS.match(old.name):  # never another file of --out
            old.unlink(missing_ok=True)
    for f in figs:
        atomic_write_bytes(out_dir / f.name, f.png)

    n = 0 if frame.empty else len(frame)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{n} record files from {results_dir.resolve()}, written {when}."
    html_sections = [
        ("Leaderboard", html.leaderboard_html(table)),
        (FINDINGS_TITLE, html.findings_html(found)),
    ]
    md_sections = [
        ("Leaderboard", markdown.leaderboard_md(table)),
        (FINDINGS_TITLE, markdown.findings_md(found.blocks())),
    ]
    edges = grid_edge_cells(table, frame)
    if edges:  # right after the leaderboard, as leaderboard.md has them
        html_sections.insert(1, (EDGES_TITLE, html.edges_html(edges)))
        md_sections.insert(1, (EDGES_TITLE, markdown.edges_md(edges)))
    transfer = transfer_tables(frame)
    if transfer:
        html_sections.append(("Transfer", transfer_html(transfer)))
        md_sections.append(("Transfer", transfer_md(transfer)))
    if against:
        html_sections.append((PUBLISHED_TITLE, published_html(against)))
        md_sections.append((PUBLISHED_TITLE, published_md(against)))
    for heading, fs in groups:
        if fs:
            html_sections.append((heading, html.figures_html(fs)))
            md_sections.append((heading, markdown.figures_md(fs)))
    if diags:
        html_sections.append(("Diagnostics", html.diagnostics_html(diags)))
        md_sections.append(("Diagnostics", markdown.diagnostics_md(diags)))
    index = out_dir / "index.html"
    atomic_write_text(index, html.page(TITLE, subtitle, html_sections))
    atomic_write_text(out_dir / "report.md", markdown.document(TITLE, subtitle, md_sections))
    atomic_write_text(out_dir / "findings.md", found.markdown())
    return index


def _published(results_dir: Path, path: str | Path | None) -> list:
    """Our records that are a published entry's setting, each against the entry."""
    from ..protocols.published import load_published
    from ..records.store import load_records

    return comparisons(load_records(results_dir), load_published(path))
