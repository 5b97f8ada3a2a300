import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch (and the subprocesses its tests start) gets its
    share of the cores: two workers with two OpenMP threads each on two cores spend their time
    waiting on each other's threads (tests/test_verdict.py's module setup: 36 s alone, 201 s
    beside another worker so oversubscribed)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return
    import torch

    threads = str(max(1, len(os.sched_getaffinity(0)) // int(workers)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads
    torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config, items):
    """A test that asks for a fixture its module names in ``SLOW_FIXTURES`` (a module fixture
    that trains or runs processes) is slow, marked or not: ``-m "not slow"`` would otherwise
    build that fixture for the one unmarked test that reads it."""
    for item in items:
        slow = getattr(item.module, "SLOW_FIXTURES", ())
        if any(name in slow for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


def image_folder(
    root,
    sizes=None,
    classes=2,
    pixel=lambda c, i: 60 * c + i,
    shape=lambda c, i: (8, 8),
    suffix=".png",
):
    """An image folder dataset (``root/<split>/c<k>/<i><suffix>``) of flat-colour images.
    ``sizes`` maps split -> images per class (default train 6, val 6); ``pixel(c, i)`` gives the
    colour (a grey level or an RGB triple) and ``shape(c, i)`` the (height, width)."""
    import numpy as np
    from PIL import Image

    for split, n in (sizes or {"train": 6, "val": 6}).items():
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.full((*shape(c, i), 3), pixel(c, i), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}{suffix}")
    return root


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread (two threads on a loaded 2-core machine wait on each
    other); a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch  # here: pytest_configure sets the workers' threads before torch is imported

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
