"""Every relative link in the README, CONTRIBUTING.md and docs/*.md points at something that
exists (issue 19, point 4): a moved or renamed page, or a renamed heading behind a `#anchor`,
fails here instead of in a reader's browser. The README's `ssl-eval` commands must also parse."""

import os
import re
import shlex
from pathlib import Path

import pytest
from conftest import ROOT

from ssl_eval.cli import build_parser

PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# [text](target) and [text](target "title"); images ![alt](src) are links too
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code (their brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation other than
    hyphens and spaces removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a markdown page offers: its headings' slugs (a repeated slug gets -1, -2 ...
    as on GitHub) and explicit <a name|id="..."> tags."""
    text = page.read_text(encoding="utf-8")
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", text)):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    out.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text(encoding="utf-8")))


def broken(page: Path) -> list[str]:
    out = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            out.append(f"{target}: no such file {os.path.relpath(dest, page.parent)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            out.append(f"{target}: {dest.name} has no heading with anchor #{anchor}")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page):
    found = broken(page)
    assert not found, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(found)


def test_docs_index_lists_every_page():
    index = ROOT / "docs/README.md"
    listed = {(index.parent / t.partition("#")[0]).resolve() for t in links(index)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")} - {index.resolve()}
    missing = sorted(p.name for p in pages - listed if not p.name.startswith("_"))
    assert not missing, f"docs/README.md does not list: {missing}"


def test_readme_links_the_docs_index():
    assert "docs/README.md" in links(ROOT / "README.md")


def test_the_checker_catches_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Top: the `x` part (v2)\n\n## Top: the `x` part (v2)\n")
    page = tmp_path / "b.md"
    page.write_text(
        "[ok](a.md#top-the-x-part-v2) [ok](a.md#top-the-x-part-v2-1) [ok](#here)\n"
        "[gone](c.md) [bad](a.md#nope) [web](https://example.org/x.md) `[code](d.md)`\n"
        "```\n[fenced](e.md)\n```\n## Here\n"
    )
    found = broken(page)
    assert [f.split(":")[0] for f in found] == ["c.md", "a.md#nope"]


def _readme_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    cmds = []
    for block in re.findall(r"^```(?:bash|sh)\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("ssl-eval "):
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_readme_commands_parse():
    cmds = _readme_commands()
    assert len(cmds) >= 3  # at least the three "evaluate your model" examples
    parser = build_parser()
    for argv in cmds:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"README: ssl-eval {' '.join(argv)} does not parse") from e
