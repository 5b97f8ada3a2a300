"""Commands the docs give for the built-in datasets run as printed (on smaller data and a
shorter schedule, both passed as extra options)."""

import shlex
from pathlib import Path

import pytest

from ssl_eval.cli import main

DOCS = Path(__file__).parents[1] / "docs"


def _commands(page: str, needle: str) -> list[list[str]]:
    lines = (DOCS / page).read_text().splitlines()
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("ssl-eval run") and needle in ln]


@pytest.mark.slow
def test_dense_md_shapes_seg_command_runs(tmp_path, monkeypatch, capsys):
    """docs/dense.md's shapes-seg example (a random ViT at 32 px, linseg and knnseg) ends in
    records: the card's 512 px geometry would be refused for a 32 px ViT, so the example sets
    it back to the backbone's input size."""
    from ssl_eval.data import dense

    monkeypatch.setattr(dense, "SHAPES_DENSE_TRAIN", 24)
    monkeypatch.setattr(dense, "SHAPES_DENSE_TEST", 8)
    (argv,) = _commands("dense.md", "--dataset shapes-seg")
    short = ["--set", "linseg@dinov3.samples=32", "--set", "linseg@dinov3.warmup_samples=16"]
    out = [
        "--no-progress",
        "--results-dir",
        str(tmp_path / "r"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(argv + short + out) == 0, capsys.readouterr().err
    from ssl_eval.records.store import load_records

    recs = {r.protocol["name"]: r for r in load_records(tmp_path / "r")}
    assert set(recs) == {"linseg@dinov3", "knnseg@capi"}
    assert "size" not in recs["knnseg@capi"].protocol["overrides"]  # knnseg's card as shipped
