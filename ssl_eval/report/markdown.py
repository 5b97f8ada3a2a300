"""report.md: the same content as index.html for a repository viewer, figures as PNG files
beside it. Names are escaped so that neither a pipe (a table cell) nor markup survives."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from .figures import Figure
from .leaderboard import EDGES_TEXT, NOTE, Table, edge_items, single_line
from .maps import Diagnostics

if TYPE_CHECKING:
    pass

_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\|[]*`"})


def md(text: object) -> str:
    """One line of markdown showing ``text`` literally (table-cell safe)."""
    return single_line(escape(str(text), quote=False).translate(_MD_SPECIAL))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def leaderboard_md(table: Table) -> list[str]:
    """The leaderboard as ``leaderboard.md`` has it (the same rows, cells and intervals)."""
    if not table.cols:
        return ["No records with a top-1, mIoU or RMSE metric.", ""]
    lines = [
        _row(["backbone", *(md(table.col_label[c]) for c in table.cols)]),
        _row(["---", *("---:" for _ in table.cols)]),
    ]
    best = {c: table.best(c) for c in table.cols}
    for r in table.rows:
        out = []
        for c in table.cols:
            cell = table.cells.get((r, c))
            text = "–" if cell is None else md(cell.text())
            out.append(f"**{text}**" if cell is not None and cell.value == best[c] else text)
        lines.append(_row([md(table.row_label[r]), *out]))
    return [
        *lines,
        "",
        md(f"{NOTE} {table.legend}.") + " The HTML report shows each cell's setting.",
        "",
    ]


def edges_md(cells: list[tuple[str, str, str, str]]) -> list[str]:
    """The leaderboard's cells chosen at the edge of their grid (``grid_edge_cells``)."""
    return [md(EDGES_TEXT), "", *edge_items(cells, md), ""]


def figures_md(figs: list[Figure]) -> list[str]:
    out = []
    for f in figs:
        out += [f"![{md(f.title)}]({f.name})", ""]
    return out


def _n(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None or v != v else format(v, fmt)


def diagnostics_md(diags: list[Diagnostics]) -> list[str]:
    out: list[str] = []
    for d in diags:
        out += [f"### {md(d.dataset)}", ""]
        out.append(_row(["backbone", *(md(m) for m in d.metrics), "linear top-1 (%)"]))
        out.append(_row(["---", *("---:" for _ in d.metrics), "---:"]))
        for b in sorted(d.values, key=str.lower):
            lin = d.linear.get(b)
            vals = [_n(d.values[b].get(m)) for m in d.metrics]
            out.append(_row([md(b), *vals, _n(None if lin is None else 100 * lin, ".1f")]))
        out.append("")
        if d.spearman:
            out += [_row(["diagnostic", "Spearman ρ with linear top-1", "backbones"])]
            out += [_row(["---", "---:", "---:"])]
            out += [_row([md(m), _n(rho, "+.2f"), str(n)]) for m, (rho, n) in d.spearman.items()]
        else:
            out.append("Fewer than 3 backbones have both a diagnostic and a linear top-1 here.")
        out.append("")
    return out


def findings_md(blocks: list[tuple[str, list[tuple[str, str]]]]) -> list[str]:
    """The generated findings (``Findings.blocks()``): paragraphs, list items, labels escaped
    and the models' names in bold."""

    def seg(text: str, style: str) -> str:
        if style == "text":  # written by findings.py: numbers and its own words
            return text
        return f"**{md(text)}**" if style == "bold" else md(text)

    out: list[str] = []
    prev = ""
    for kind, segs in blocks:
        if out and (kind == "p" or prev == "p"):
            out.append("")
        out.append(("- " if kind == "li" else "") + "".join(seg(t, s) for t, s in segs))
        prev = kind
    return [*out, ""]


def document(title: str, subtitle: str, sections: list[tuple[str, list[str]]]) -> str:
    lines = [f"# {md(title)}", "", md(subtitle), ""]
    for heading, body in sections:
        lines += [f"## {md(heading)}", "", *body]
    return "\n".join(lines).rstrip() + "\n"
