"""Concurrent runs on one results folder and one feature cache, and the modes of what ssl-eval
writes.

Several real ``ssl-eval run`` processes on the same store record each unit exactly once and
extract each cache entry once; a process that waits for another says so. Every file ssl-eval
creates gets the mode the user's umask gives a new file (``atomic_write_bytes`` alone would
leave ``mkstemp``'s 0600).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch
from conftest import ROOT, cli_env

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.core.errors import UserError
from ssl_eval.core.files import file_lock, lock_path, sha256_json
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.features.extraction import cache_key
from ssl_eval.records import store as results
from ssl_eval.records.store import load_records, write_unit

RUN = [
    "run",
    "--backbone",
    "pixels,random:cifar_resnet_tiny",
    "--image-size",
    "16",
    "--dataset",
    "digits",
    "--protocol",
    "knn,linear",
    "--set",
    "linear.lrs=[0.1]",
    "--set",
    "linear.weight_decays=[0.0]",
    "--set",
    "linear.min_steps=20",
    "--no-progress",
    "--no-leaderboard",
]


def _first_entry(cache):
    """The cache entry the runs extract first (pixels, digits/train), as run builds it."""
    bb = build_backbone("pixels", BuildOptions(image_size=16, offline=True, seed=0))
    bundle = get_dataset("digits", DatasetOptions())
    key = cache_key(bb, bundle, "train", "float16", torch.device("cpu"))
    return cache / "features" / sha256_json(key)[:32]


def _collect(proc, lines, waited):
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("[wait] "):
            waited.set()


@pytest.mark.slow
def test_four_concurrent_runs_record_each_unit_once_and_extract_each_entry_once(tmp_path):
    results, cache = tmp_path / "r", tmp_path / "c"
    args = [*RUN, "--results-dir", str(results), "--cache-dir", str(cache), "--device", "cpu"]
    entry = _first_entry(cache)
    procs, outs, waits, readers = [], [], [], []
    # hold the first entry's lock, so that every process reaches it and has to wait
    with file_lock(lock_path(entry), log=None):
        for _ in range(4):
            p = subprocess.Popen(
                [sys.executable, "-m", "ssl_eval.cli", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env={**cli_env(tmp_path), "OMP_NUM_THREADS": "1"},
                cwd=ROOT,
            )
            lines, waited = [], threading.Event()
            t = threading.Thread(target=_collect, args=(p, lines, waited), daemon=True)
            t.start()
            procs.append(p), outs.append(lines), waits.append(waited), readers.append(t)
        deadline = time.monotonic() + 400  # generous: four processes import torch at once
        for w, p in zip(waits, procs, strict=True):
            while not w.wait(0.2):
                assert p.poll() is None, "".join(outs[procs.index(p)])
                assert time.monotonic() < deadline, "a process never reached the held lock"
        assert not entry.exists()
    for p, t in zip(procs, readers, strict=True):
        assert p.wait(timeout=600) == 0
        t.join()
    logs = ["".join(lines) for lines in outs]
    # each one said what it waits for, and on whom: the process that claimed the first unit
    # waits for the entry this test holds; the others wait for that unit, held by it
    firsts = [next(ln for ln in log.splitlines() if ln.startswith("[wait] ")) for log in logs]
    on_entry = [w for w in firsts if f"feature cache entry {entry}" in w]
    assert len(on_entry) == 1 and f"held by pid {os.getpid()}" in on_entry[0], firsts
    pids = {f"held by pid {p.pid}" for p in procs}
    on_unit = [w for w in firsts if w not in on_entry]
    assert all(w.startswith("[wait] waiting for unit ") for w in on_unit), firsts
    assert all(any(w.endswith(pid) for pid in pids) for w in on_unit), (firsts, pids)
    # each cache entry extracted once: 2 backbones x (train, test)
    wrote = [ln for log in logs for ln in log.splitlines() if ln.startswith("[cache] wrote")]
    assert len(wrote) == 4, wrote
    assert len({ln.split(" in ")[0] for ln in wrote}) == 4
    entries = [p for p in (cache / "features").iterdir()]
    assert len(entries) == 4 and not [p for p in entries if p.name.startswith(".")]
    # each unit recorded once: 2 backbones x (knn, linear)
    files = sorted((results / "records").iterdir())
    units = [f.name.rsplit("-", 1)[0] for f in files]
    assert len(files) == 4 and len(set(units)) == 4, [f.name for f in files]
    done = sum(log.count("[done]") for log in logs)
    skipped = sum(log.count("[skip]") for log in logs)
    assert done == 4 and skipped == 4 * 3, logs  # the three others skipped every unit


# ---------------------------------------------------------------- file modes


def _modes(roots: dict):
    """{"<label>/<relative path>": (mode, is_dir)} of everything under each root."""
    out = {}
    for label, folder in roots.items():
        for root, dirs, files in os.walk(folder):
            for n in dirs + files:
                p = os.path.join(root, n)
                st = os.lstat(p)
                out[f"{label}/{os.path.relpath(p, folder)}"] = (
                    stat.S_IMODE(st.st_mode),
                    stat.S_ISDIR(st.st_mode),
                )
    return out


def _full_disk(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_ssl_eval_writes_has_the_umask_mode(tmp_path, monkeypatch, mask):
    """Records, leaderboard, cache entries and their metadata, trainer checkpoints and states,
    fine-tune states, a record rescued from a full disk: each file 0666 and each folder 0777
    less the umask."""
    from ssl_eval.cli import main
    from ssl_eval.protocols.finetune import _save_state
    from ssl_eval.train.data import load_train_data
    from ssl_eval.train.loop import train
    from ssl_eval.train.resolve import resolve_config

    r, c, t = tmp_path / "r", tmp_path / "c", tmp_path / "t"
    settings = {
        "arch": "cifar_resnet_tiny",
        "dataset": "digits",
        "epochs": 1,
        "batch_size": 32,
        "train_subset": 64,
        "monitor": {"knn_bank": 64, "knn_queries": 64},
    }
    small = [f"method_cfg.{k}=16" for k in ("proj_hidden", "proj_dim")]
    cfg = resolve_config("simclr", 16, settings=settings, overrides=small)
    data = load_train_data("digits", 16, 0, 64, 64, 64)
    rescue = tmp_path / "tmp"  # where a record goes when the results folder cannot take it
    rescue.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue))
    old = os.umask(mask)
    try:
        args = ["run", "--backbone", "pixels", "--dataset", "digits", "--protocol", "knn"]
        assert main([*args, "--results-dir", str(r), "--cache-dir", str(c), "--no-progress"]) == 0
        train(cfg, t, data=data)
        _save_state(c / "train_state" / "u" / "state.pt", {"epoch": 0})
        with monkeypatch.context() as mp:
            mp.setattr(results, "atomic_write_json", _full_disk)
            with pytest.raises(UserError, match="its numbers are saved in"):
                write_unit(tmp_path / "r2", "u", "run", load_records(r))
    finally:
        os.umask(old)
    modes = _modes({"results": r, "cache": c, "train": t, "rescue": rescue})
    assert len([k for k in modes if k.startswith("rescue/ssl-eval-unsaved-u-")]) == 1
    for must in (
        "results/records",
        "results/leaderboard.md",
        "cache/features",
        "train/backbone.safetensors",
        "train/backbone.json",
        "train/train_state.pt",
        "cache/train_state/u/state.pt",
    ):
        assert must in modes, (must, sorted(modes))
    names = sorted(modes)
    assert any(k.startswith("results/records/") and k.endswith(".json") for k in names)
    for f in ("features.npy", "labels.npy", "meta.json"):
        assert any(k.startswith("cache/features/") and k.endswith(f) for k in names), names
    wrong = {
        k: oct(m) for k, (m, is_dir) in modes.items() if m != (0o777 if is_dir else 0o666) & ~mask
    }
    assert not wrong, (oct(mask), wrong)
