import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_env

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.features import extract


def _digits_pixels():
    return build_backbone("pixels", BuildOptions()), get_dataset("digits", DatasetOptions())


def test_second_extraction_hits_the_cache(tmp_path, capsys):
    bb, ds = _digits_pixels()
    a = extract(bb, ds, "train", cache_dir=tmp_path, device=torch.device("cpu"), progress=False)
    b = extract(bb, ds, "train", cache_dir=tmp_path, device=torch.device("cpu"), progress=False)
    assert not a.cache_hit and b.cache_hit and a.key == b.key
    assert "reusing" in capsys.readouterr().err
    assert isinstance(b.features, np.memmap) and b.features.dtype == np.float16
    assert b.features.shape == (len(ds.train), 8 * 8 * 3)
    np.testing.assert_array_equal(np.asarray(a.features), np.asarray(b.features))


def test_cache_key_changes_with_preprocessing_and_dtype(tmp_path):
    _, ds = _digits_pixels()
    cpu = torch.device("cpu")
    k1 = extract(
        build_backbone("pixels", BuildOptions()),
        ds,
        "test",
        cache_dir=tmp_path,
        device=cpu,
        progress=False,
    ).key
    k2 = extract(
        build_backbone("pixels", BuildOptions(image_size=16)),
        ds,
        "test",
        cache_dir=tmp_path,
        device=cpu,
        progress=False,
    ).key
    k3 = extract(
        build_backbone("pixels", BuildOptions()),
        ds,
        "test",
        cache_dir=tmp_path,
        device=cpu,
        dtype="float32",
        progress=False,
    ).key
    assert len({k1, k2, k3}) == 3


def test_exception_mid_write_leaves_no_entry(tmp_path):
    bb, ds = _digits_pixels()
    calls = {"n": 0}
    real = bb._read

    def failing(model, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(model, x)

    bb._read = failing
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(
            bb,
            ds,
            "train",
            cache_dir=tmp_path,
            device=torch.device("cpu"),
            batch_size=64,
            progress=False,
        )
    assert list((tmp_path / "features").iterdir()) == []
    bb._read = real
    fs = extract(bb, ds, "train", cache_dir=tmp_path, device=torch.device("cpu"), progress=False)
    assert not fs.cache_hit and np.isfinite(np.asarray(fs.features, dtype=np.float32)).all()


def test_killed_process_leaves_no_entry_and_next_run_recovers(tmp_path):
    """SIGKILL in the middle of writing features: no cache entry appears; a rerun succeeds."""
    script = textwrap.dedent(f"""
        import time, torch
        from ssl_eval.backbones import BuildOptions, build_backbone
        from ssl_eval.data.datasets import DatasetOptions, get_dataset
        from ssl_eval.features import extract
        bb = build_backbone("pixels", BuildOptions())
        real = bb._read
        def slow(m, x):
            print("batch", flush=True); time.sleep(0.3); return real(m, x)
        bb._read = slow
        extract(bb, get_dataset("digits", DatasetOptions()), "train", cache_dir={str(tmp_path)!r},
                device=torch.device("cpu"), batch_size=32, progress=False)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=cli_env(tmp_path), cwd=ROOT
    )
    for _ in range(3):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    entries = [p for p in (tmp_path / "features").iterdir() if not p.name.startswith(".")]
    assert entries == []
    bb, ds = _digits_pixels()
    fs = extract(bb, ds, "train", cache_dir=tmp_path, device=torch.device("cpu"), progress=False)
    assert not fs.cache_hit and fs.features.shape[0] == len(ds.train)
