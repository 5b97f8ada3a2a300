"""index.html: one static, self-contained page (inline CSS and JS, figures as base64 PNG, a
content security policy that forbids every fetch). Every name that reaches the page goes
through ``html.escape``."""

from __future__ import annotations

import base64
from html import escape
from typing import TYPE_CHECKING

from .figures import Figure
from .leaderboard import EDGES_TEXT, NOTE, Table
from .maps import Diagnostics

if TYPE_CHECKING:
    from .findings import Findings

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
#leaderboard thead th{cursor:pointer;background:#f3f3f3;user-select:none}
#leaderboard thead th[aria-sort=ascending]::after{content:" \\25B2"}
#leaderboard thead th[aria-sort=descending]::after{content:" \\25BC"}
td.na{color:#aaa}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:12px;color:#555}
img{max-width:100%}
.note{color:#555;font-size:13px}
"""

# first in the page: any script error is kept in window.reportErrors (the browser test reads it)
ONERROR = (
    "window.reportErrors=[];window.onerror=function(m,s,l,c){"
    "window.reportErrors.push(String(m)+' at '+l+':'+c);};"
)

JS = """
(function(){
  var t=document.getElementById('leaderboard');
  if(!t){return;}
  var body=t.tBodies[0], heads=t.tHead.rows[0].cells, state={col:-1,dir:1};
  function key(tr,i){
    var c=tr.cells[i];
    if(i===0){return c.textContent.toLowerCase();}
    var v=c.getAttribute('data-v');
    return (v===null||v==='')?null:parseFloat(v);
  }
  function sortBy(i){
    var dir=(state.col===i)?-state.dir:(i===0?1:-1);
    state={col:i,dir:dir};
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=key(a,i), y=key(b,i);
      if(x===null&&y===null){return 0;}
      if(x===null){return 1;}
      if(y===null){return -1;}
      return x<y?-dir:(x>y?dir:0);
    });
    rows.forEach(function(r){body.appendChild(r);});
    for(var j=0;j<heads.length;j++){heads[j].removeAttribute('aria-sort');}
    heads[i].setAttribute('aria-sort',dir>0?'ascending':'descending');
  }
  for(var i=0;i<heads.length;i++){
    heads[i].addEventListener('click',sortBy.bind(null,i));
  }
  var fd=document.getElementById('filter-dataset'), fp=document.getElementById('filter-protocol');
  function apply(){
    var d=fd.value, p=fp.value, show=[true];
    for(var i=1;i<heads.length;i++){
      var h=heads[i];
      show.push((d===''||h.getAttribute('data-dataset')===d)&&(p===''||h.getAttribute('data-protocol')===p));
      h.style.display=show[i]?'':'none';
    }
    Array.prototype.forEach.call(body.rows,function(tr){
      var any=false;
      for(var i=1;i<tr.cells.length;i++){
        tr.cells[i].style.display=show[i]?'':'none';
        if(show[i]&&tr.cells[i].hasAttribute('data-v')){any=true;}
      }
      tr.style.display=any?'':'none';
    });
  }
  fd.addEventListener('change',apply);
  fp.addEventListener('change',apply);
})();
"""


def _select(id_: str, label: str, values: list[str]) -> str:
    opts = "".join(f'<option value="{escape(v)}">{escape(v)}</option>' for v in values)
    return f'<label>{label} <select id="{id_}"><option value="">all</option>{opts}</select></label>'


def leaderboard_html(table: Table) -> str:
    """The leaderboard as ``leaderboard.md`` has it (``leaderboard.headline_table``: the same
    rows, cells and intervals), sortable and filtered by dataset and protocol; each cell's
    hover title is its whole setting."""
    if not table.cols:
        return '<p class="note">No records with a top-1, mIoU or RMSE metric.</p>'
    head = "<th>backbone</th>" + "".join(
        f'<th data-dataset="{escape(table.dataset_of(c))}" '
        f'data-protocol="{escape(table.protocol_of(c))}" '
        f'title="{escape(table.protocol_type_of(c))} protocol; click to sort">'
        f"{escape(table.col_label[c])}</th>"
        for c in table.cols
    )
    body, best = [], {c: table.best(c) for c in table.cols}
    for r in table.rows:
        tds = [f"<td>{escape(table.row_label[r])}</td>"]
        for c in table.cols:
            cell = table.cells.get((r, c))
            if cell is None:
                tds.append('<td class="na">&ndash;</td>')
                continue
            text = escape(cell.text())
            if cell.value == best[c]:
                text = f"<b>{text}</b>"
            tds.append(
                f'<td data-v="{cell.value:.6g}" title="{escape(table.cell_title(r, c))}">'
                f"{text}</td>"
            )
        body.append("<tr>" + "".join(tds) + "</tr>")
    filters = (
        _select("filter-dataset", "dataset", sorted({table.dataset_of(c) for c in table.cols}))
        + " "
        + _select("filter-protocol", "protocol", sorted({table.protocol_of(c) for c in table.cols}))
    )
    return (
        f'<p class="filters">{filters}</p>'
        f'<table id="leaderboard"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
        f'<p class="note">{escape(NOTE)} {escape(table.legend)}. Hover a cell for its setting; '
        "click a header to sort.</p>"
    )


def edges_html(cells: list[tuple[str, str, str, str]]) -> str:
    """The leaderboard's cells chosen at the edge of their grid (``grid_edge_cells``)."""
    items = "".join(
        f"<li><b>{escape(r)}</b> / {escape(c)}{escape(f' ({n})') if n else ''}: {escape(what)}</li>"
        for r, c, n, what in cells
    )
    return f'<p class="note">{escape(EDGES_TEXT)}</p><ul>{items}</ul>'


def figures_html(figs: list[Figure]) -> str:
    out = []
    for f in figs:
        data = base64.b64encode(f.png).decode("ascii")
        out.append(
            f'<figure><img alt="{escape(f.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(f.title)}</figcaption></figure>"
        )
    return "".join(out)


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "&ndash;" if v is None or v != v else format(v, fmt)


def diagnostics_html(diags: list[Diagnostics]) -> str:
    out = []
    for d in diags:
        head = "<th>backbone</th>" + "".join(f"<th>{escape(m)}</th>" for m in d.metrics)
        head += "<th>linear top-1 (%)</th>"
        rows = []
        for b in sorted(d.values, key=str.lower):
            tds = "".join(f"<td>{_num(d.values[b].get(m))}</td>" for m in d.metrics)
            lin = d.linear.get(b)
            tds += f"<td>{_num(None if lin is None else 100 * lin, '.1f')}</td>"
            rows.append(f"<tr><td>{escape(b)}</td>{tds}</tr>")
        out.append(f"<h3>{escape(d.dataset)}</h3><table><thead><tr>{head}</tr></thead>")
        out.append(f"<tbody>{''.join(rows)}</tbody></table>")
        if d.spearman:
            cells = "".join(
                f"<tr><td>{escape(m)}</td><td>{_num(rho, '+.2f')}</td><td>{n}</td></tr>"
                for m, (rho, n) in d.spearman.items()
            )
            out.append(
                "<table><thead><tr><th>diagnostic</th><th>Spearman &rho; with linear top-1</th>"
                f"<th>backbones</th></tr></thead><tbody>{cells}</tbody></table>"
            )
        else:
            out.append(
                '<p class="note">Fewer than 3 backbones have both a diagnostic and a linear '
                "top-1 here: no rank correlation.</p>"
            )
    return "".join(out)


def findings_html(f: Findings) -> str:
    """The generated findings (``Findings.blocks``): the same text as findings.md."""

    def seg(text: str, style: str) -> str:
        return f"<b>{escape(text)}</b>" if style == "bold" else escape(text)

    out: list[str] = []
    items: list[str] = []
    for kind, segs in f.blocks():
        text = "".join(seg(t, s) for t, s in segs)
        if kind == "li":
            items.append(f"<li>{text}</li>")
            continue
        if items:
            out.append(f"<ul>{''.join(items)}</ul>")
            items = []
        out.append(f'<p class="findings">{text}</p>')
    if items:
        out.append(f"<ul>{''.join(items)}</ul>")
    return f'<div id="findings">{"".join(out)}</div>'


def page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<section><h2>{escape(h)}</h2>{content}</section>" for h, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{escape(title)}</title><script>{ONERROR}</script><style>{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><p class="note">{escape(subtitle)}</p>{body}'
        f"<script>{JS}</script></body></html>\n"
    )
