"""The shipped GitHub workflows and .ci/run call ssl-eval with flags it has, and upload the
JUnit file the gate writes (a renamed flag or path fails here, not in a user's CI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from ssl_eval.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def _inputs(doc: dict) -> dict[str, str]:
    on = doc.get("on") or doc.get(True) or {}  # YAML 1.1 reads a bare `on` as True
    call = (on.get("workflow_call") or {}) if isinstance(on, dict) else {}
    return {k: str(v.get("default", f"<{k}>")) for k, v in (call.get("inputs") or {}).items()}


def _commands(text: str) -> list[list[str]]:
    """Every ssl-eval command line of a shell text, split as the shell would."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        m = re.search(r"(?:^|/)ssl-eval\s+(.*)$", line)
        if m and not line.startswith("#"):
            out.append(shlex.split(m.group(1)))
    return out


def _parses(argv: list[str]) -> None:
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:  # argparse's refusal of an unknown flag or a missing value
        raise AssertionError(f"ssl-eval {' '.join(argv)} does not parse") from e


def _workflow_runs(path: Path) -> tuple[list[str], list[dict]]:
    doc = yaml.safe_load(path.read_text())
    inputs = _inputs(doc)
    runs, steps = [], []
    for job in doc["jobs"].values():
        for step in job["steps"]:
            steps.append(step)
            if "run" in step:
                text = re.sub(
                    r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: inputs[m.group(1)], step["run"]
                )
                runs.append(text)
    return runs, steps


def test_there_are_workflows():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "ssl-eval-gate.yml"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_commands_parse_and_junit_is_uploaded(path):
    runs, steps = _workflow_runs(path)
    text = "\n".join(runs)
    if "bash .ci/run" in text:  # ours: the script's own commands
        text += "\n" + (ROOT / ".ci" / "run").read_text()
    cmds = _commands(text)
    assert cmds, f"{path.name} runs no ssl-eval command"
    for argv in cmds:
        _parses(argv)
    junits = [a[a.index("--junit") + 1] for a in cmds if "--junit" in a]
    assert junits, f"{path.name}: the gate writes no JUnit file"
    uploads = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and uploads[0]["with"]["path"] in junits
    assert uploads[0].get("if") == "always()"  # a failing gate still uploads its report


def test_a_wrong_flag_is_caught():
    with pytest.raises(AssertionError, match="does not parse"):
        _parses(["check", "--baselines", "b.json"])


def test_readme_adoption_snippet_names_real_inputs_and_flags():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(jobs:.*?)```", text, re.S).group(1)
    job = yaml.safe_load(block)["jobs"]["gate"]
    assert job["uses"].split("/", 2)[2].startswith(".github/workflows/ssl-eval-gate.yml@")
    declared = _inputs(yaml.safe_load((ROOT / ".github/workflows/ssl-eval-gate.yml").read_text()))
    assert set(job["with"]) <= set(declared)  # no input the workflow does not declare
    _parses(shlex.split(job["with"]["evaluate"])[1:])
