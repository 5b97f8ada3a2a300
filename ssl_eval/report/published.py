"""Our numbers against the published ones (protocols/published.yaml): ours, theirs, the
difference and our 95% interval, for ``ssl-eval reproduce`` and the report's "Published"
table.

A record stands for an entry only when it is that entry's setting: the entry's backbone tag and
dataset, its recipe card as shipped (same name, the card's current version, no ``--set``
override) and the backbone's own preprocessing and feature kind (no ``--image-size`` or
``--feature-kind``), on the tag's own weights file (not another ``--weights`` file). Anything
else is another number, and is not shown against theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from ..protocols.published import Published, PublishedEntry
from ..records.schema import ResultRecord


@dataclass(frozen=True)
class Comparison:
    """One published figure against ours, both in percent."""

    entry: PublishedEntry
    ours: float
    interval: tuple[float, float] | None  # our 95% interval, None where the record has none
    ci_method: str = ""
    unit: str = ""  # the record's unit (its file in the results store)

    @property
    def theirs(self) -> float:
        return self.entry.value

    @property
    def difference(self) -> float:
        """Ours minus theirs, in points."""
        return self.ours - self.theirs

    @property
    def inside(self) -> bool | None:
        """Whether theirs lies in our 95% interval (None without an interval, and where theirs
        is the network's own classifier: not the evaluation ours repeats)."""
        if self.interval is None or not self.entry.is_probe:
            return None
        lo, hi = self.interval
        return lo <= self.theirs <= hi


def compare(entry: PublishedEntry, record: ResultRecord) -> Comparison:
    """``record`` (a fraction, as records hold it) against ``entry`` (percent)."""
    ci = record.ci95
    interval = (100.0 * ci[0], 100.0 * ci[1]) if ci and len(ci) == 2 else None
    return Comparison(entry, 100.0 * record.value, interval, record.ci_method, record.unit)


def matches(entry: PublishedEntry, record: ResultRecord, card_version: int, official=None) -> bool:
    """Whether ``record`` is ``entry``'s setting (see the module's docstring); ``official``
    (the tag's ``WeightsSource``, None for a tag without a weights file) must own the
    record's weights file, so a tag run on another ``--weights`` file is not theirs."""
    if official is not None and not official.is_official(str(record.weights.get("path") or "")):
        return False
    p = record.protocol
    features = record.setting.get("summary", {}).get("column", {}).get("features", {})
    return (
        record.backbone == entry.tag
        and record.dataset.get("name") == entry.dataset
        and record.metric == entry.metric
        and p.get("name") == entry.recipe
        and p.get("source") == f"shipped:{entry.recipe}"
        and p.get("version") == card_version
        and not p.get("overrides")
        and features.get("image_size") is None
        and features.get("feature_kind") is None
    )


def comparisons(records: list[ResultRecord], published: Published) -> list[Comparison]:
    """For each entry with a matching record, the newest such record against it (entries whose
    card is not shipped here are skipped: no record can be their setting)."""
    from ..backbones.adapters import TAG_WEIGHTS
    from ..backbones.catalog import get_spec
    from ..core.errors import UserError
    from ..protocols.cards import load_card

    versions: dict[str, int | None] = {}
    out = []
    for e in published.entries:
        if e.recipe not in versions:
            try:
                versions[e.recipe] = load_card(e.recipe).version
            except UserError:
                versions[e.recipe] = None
        if versions[e.recipe] is None:
            continue
        try:
            get_spec(e.tag)  # registers the tags (and their weights sources)
        except UserError:
            continue  # a tag this installation does not have: no record can be its setting
        official = TAG_WEIGHTS.get(e.tag)
        mine = [r for r in records if matches(e, r, versions[e.recipe], official)]
        if mine:
            out.append(compare(e, max(mine, key=lambda r: r.time)))
    return out


HEADER = ("backbone", "dataset", "recipe", "metric", "ours", "theirs", "difference",
          "our 95% interval", "theirs inside")  # fmt: skip


def cells(c: Comparison) -> list[str]:
    e = c.entry
    interval = "none" if c.interval is None else f"[{c.interval[0]:.2f}, {c.interval[1]:.2f}]"
    inside = {None: "n/a", True: "yes", False: "no"}[c.inside]
    if not e.is_probe:
        inside = "n/a (own head)"
    return [e.tag, e.dataset, e.recipe, e.metric, f"{c.ours:.2f}", repr(e.value),
            f"{c.difference:+.2f}", interval, inside]  # fmt: skip


def text_table(comps: list[Comparison]) -> str:
    """Aligned columns for the terminal, then each entry's source and note."""
    rows = [list(HEADER), *(cells(c) for c in comps)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for c in comps:
        lines.append(f"theirs ({c.entry.tag}, {c.entry.recipe}): {c.entry.source}")
        if c.entry.paper_source:
            lines.append(f"  the paper: {c.entry.paper_value:g} ({c.entry.paper_source})")
        if not c.entry.is_probe:
            lines.append(f"  {OWN_HEAD}")
        if c.entry.note:
            lines.append(f"  note: {c.entry.note}")
    return "\n".join(lines)


OWN_HEAD = (
    "theirs is the network's own classifier, trained end to end with it, not a probe: ours is "
    "another evaluation of the same network, and the difference is no reproduction gap"
)
LEGEND = (
    "Ours and theirs in percent; difference = ours - theirs in points; our interval is the "
    "record's 95% interval; theirs as printed in the source, from protocols/published.yaml."
)


def published_md(comps: list[Comparison]) -> list[str]:
    from .markdown import md

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * 3 + "---|" + "---:|" * 5]
    for c in comps:
        lines.append("| " + " | ".join(md(v) for v in cells(c)) + " |")
    lines += ["", LEGEND, ""]
    for c in comps:
        lines.append(
            f"- {md(c.entry.tag)}, {md(c.entry.recipe)}: {md(c.entry.source)}" + _paper(c, md)
        )
    return [*lines, ""]


def _paper(c: Comparison, esc) -> str:
    """The paper's own figure, where the entry has one (it may differ from theirs), and the
    warning of an entry whose figure is the network's own classifier."""
    e = c.entry
    out = f"; the paper: {e.paper_value:g} ({esc(e.paper_source)})" if e.paper_source else ""
    return out + ("" if e.is_probe else f"; {esc(OWN_HEAD)}")


def published_html(comps: list[Comparison]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(v)}</td>" for v in cells(c)) + "</tr>" for c in comps
    )
    sources = "".join(
        f"<li>{escape(c.entry.tag)}, {escape(c.entry.recipe)}: {escape(c.entry.source)}"
        + _paper(c, escape)
        + (f" <span class='note'>{escape(c.entry.note)}</span>" if c.entry.note else "")
        + "</li>"
        for c in comps
    )
    return (
        f"<table id='published'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<p class='note'>{escape(LEGEND)}</p><ul>{sources}</ul>"
    )
