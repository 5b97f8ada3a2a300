import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test gets its own feature cache and weights folder, and never downloads."""
    monkeypatch.setenv("SSL_EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SSL_EVAL_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("SSL_EVAL_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    yield


def cli_env(tmp_path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")] + sys.path)
    return env
