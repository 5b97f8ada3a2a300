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
from ssl_eval.features.extraction import extract


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


@pytest.mark.slow
def test_killed_process_leaves_no_entry_and_next_run_recovers(tmp_path):
    """SIGKILL in the middle of writing features: no cache entry appears; a rerun succeeds."""
    script = textwrap.dedent(f"""
        import time, torch
        from ssl_eval.backbones import BuildOptions, build_backbone
        from ssl_eval.data.datasets import DatasetOptions, get_dataset
        from ssl_eval.features.extraction import extract
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


def test_leftovers_of_a_killed_process_are_swept_and_a_live_ones_kept(tmp_path):
    from ssl_eval.cli import main

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    feats = tmp_path / "cache" / "features"
    feats.mkdir(parents=True)
    (feats / f".abc.pid{dead_pid}.x1y2z3.tmp").mkdir()  # a half-written entry of a killed run
    ((feats / f".abc.pid{dead_pid}.x1y2z3.tmp") / "features.npy").write_bytes(b"\0" * 1000)
    live = feats / f".def.pid{os.getpid()}.q1w2e3.tmp"  # work in progress of a live writer
    live.mkdir()
    recs = tmp_path / "r" / "records"
    recs.mkdir(parents=True)
    (recs / f".u1-r1.json.pid{dead_pid}.k9k9k9.tmp").write_text("{")
    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "digits",
                "--protocol",
                "knn",
                "--no-progress",
                "--no-leaderboard",
                "--results-dir",
                str(tmp_path / "r"),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    names = {p.name for p in feats.iterdir()} | {p.name for p in recs.iterdir()}
    assert (
        f".abc.pid{dead_pid}.x1y2z3.tmp" not in names
        and f".u1-r1.json.pid{dead_pid}.k9k9k9.tmp" not in names
    )
    assert live.name in names


@pytest.mark.slow
def test_a_killed_extraction_leaves_nothing_after_the_next_run(tmp_path):
    """SIGKILL during extraction, then a run: no temporary folder is left behind."""
    script = textwrap.dedent(f"""
        import time, torch
        from ssl_eval.backbones import BuildOptions, build_backbone
        from ssl_eval.data.datasets import DatasetOptions, get_dataset
        from ssl_eval.features.extraction import extract
        bb = build_backbone("pixels", BuildOptions())
        real = bb._read
        def slow(m, x):
            print("batch", flush=True); time.sleep(0.3); return real(m, x)
        bb._read = slow
        extract(bb, get_dataset("digits", DatasetOptions()), "train", cache_dir={str(tmp_path / "cache")!r},
                device=torch.device("cpu"), batch_size=32, progress=False)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, env=cli_env(tmp_path), cwd=ROOT
    )
    for _ in range(2):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(
        p.name.startswith(".") for p in (tmp_path / "cache" / "features").iterdir()
    )  # the leftover
    from ssl_eval.cli import main

    assert (
        main(
            [
                "run",
                "--backbone",
                "pixels",
                "--dataset",
                "digits",
                "--protocol",
                "knn",
                "--no-progress",
                "--no-leaderboard",
                "--results-dir",
                str(tmp_path / "r"),
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    assert not [p for p in (tmp_path / "cache" / "features").iterdir() if p.name.startswith(".")]


def test_entry_writer_refuses_features_float16_cannot_hold_and_an_empty_split(tmp_path):
    """Both the one-process and the torchrun extraction write entries through _EntryWriter:
    a value beyond float16's range is refused in one line naming the way out, and an entry with
    no batch is refused rather than written without features."""
    import numpy as np

    from ssl_eval.core.errors import UserError
    from ssl_eval.features.extraction import _EntryWriter

    w = _EntryWriter(tmp_path, tmp_path / "entry", 4, "float16", "bb", "digits/test")
    assert w.write(np.ones((2, 3), np.float32)) == 2
    with pytest.raises(UserError, match="bb features overflow float16.*--feature-dtype float32"):
        w.write(np.full((2, 3), 1e6, np.float32))
    empty = _EntryWriter(tmp_path / "e", tmp_path / "entry2", 4, "float16", "bb", "digits/test")
    with pytest.raises(UserError, match="digits/test is empty"):
        empty.finish([0, 1, 2, 3], {}, 0.0)
