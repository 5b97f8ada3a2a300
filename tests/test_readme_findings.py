"""The README's "what the numbers say" is the generated text of the committed reference, quoted
whole (issue 18, point 8): a hand-edited sentence, a dropped model or a reference regenerated
without updating the quote fails here."""

import re

import pytest
from conftest import ROOT

from ssl_eval.report.findings import findings

START, END = "<!-- findings:start -->", "<!-- findings:end -->"


def _quote() -> str:
    text = (ROOT / "README.md").read_text()
    assert START in text and END in text, "the README's generated findings block is missing"
    block = text[text.index(START) + len(START) : text.index(END)]
    return "\n".join(
        line[2:] if line.startswith("> ") else line[1:] for line in block.strip().splitlines()
    )


@pytest.mark.slow
def test_readme_quotes_the_generated_top1_findings_of_the_default_reference():
    generated = findings(ROOT / "results/reference/default").markdown()
    quote = _quote()
    assert quote.strip() and quote.strip() in generated
    # the whole top-1 section: one line per trained model, none left out
    section = generated[generated.index("Top-1 against the baselines") :]
    section = section[: section.index("\n\n", section.index("\n- "))]
    assert section.strip() in quote
    models = re.findall(r"^- \*\*([^*]+)\*\*", section, flags=re.M)
    assert models and all(f"**{m}**" in quote for m in models)
