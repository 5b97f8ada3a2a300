"""The augmented linear probe (``linear@mae``) under ``torchrun --nproc-per-node 2`` (gloo, CPU)
against one process: the forward passes shared out (rank r embeds cuts r, r + 2, ...), the
features gathered in cut order, every rank stepping the same heads. The record is one
process's (value, setting, unit key, per-image correctness, every detail but the provenance
naming the processes and the wall times); each rank embedded only its share; a 2-process run
killed after the first epoch's state is written resumes on both ranks, under torchrun again,
and ends with the uninterrupted record.

The runs are launched once per module (process start-up dominates the cost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_eval.cli import main
from ssl_eval.core.stats import unpack_bits

SLOW_FIXTURES = ("runs",)  # module fixtures that start processes (conftest)

# 3 classes x 20 training (val fraction 0.2: 48 train rows, 12 val) and 9 test noise images
CLASSES, TRAIN, TEST = 3, 20, 9
BATCH, FORWARD, EPOCHS = 16, 6, 2
ARGS = ["run", "--backbone", "random:resnet10t", "--image-size", "16", "--protocol", "linear@mae"]
for _s in ("epochs=2", "warmup_epochs=1", f"batch_size={BATCH}", f"forward_batch={FORWARD}"):
    ARGS += ["--set", _s]
ARGS += ["--set", "base_lrs=[0.5,4.0]", "--val-fraction", "0.2", "--num-workers", "0"]
ARGS += ["--no-progress", "--no-leaderboard", "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _data(root):
    """Noise images whose brightness follows the class: each crop of an image differs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("test", TEST)):
        for c in range(CLASSES):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 140, (12, 12, 3)) + 50 * c
                Image.fromarray(px.astype(np.uint8)).save(d / f"{i}.png")
    return root


def _torchrun(args, out, name, expect_ok=True, **env):
    """``torchrun ... -m ssl_eval ARGS`` in its own session (killed whole on a hang)."""
    cmd = [*TORCHRUN, "-m", "ssl_eval", *args]
    cmd += ["--results-dir", str(out / f"r{name}"), "--cache-dir", str(out / f"c{name}")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | env
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise AssertionError(f"torchrun {name} hung: the ranks disagreed on a collective") from None
    assert (p.returncode == 0) == expect_ok, (p.returncode, stderr[-3000:])
    return stdout + stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("augdist")
    args = [*ARGS, "--dataset", f"folder:{_data(out / 'data')}"]
    one = out / "r1"  # one process, one thread (as each torchrun worker), in this process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--results-dir", str(one), "--cache-dir", str(out / "c1")]) == 0
    finally:
        torch.set_num_threads(threads)
    two = _torchrun(args, out, "2")
    # killed (SIGKILL, rank 0, the only writer) once the first epoch's state is in place
    killed = _torchrun(args, out, "k", False, SSL_EVAL_TEST_KILL_AT="after-write:state.pt#1")
    states = [d for d in (out / "ck" / "train_state").iterdir() if d.is_dir()]
    assert [sorted(p.name for p in d.iterdir()) for d in states] == [["state.pt"]], killed
    rerun = _torchrun(args, out, "k")
    return out, two, rerun


def _record(folder) -> dict:
    (f,) = (folder / "records").glob("*.json")
    (r,) = json.loads(f.read_text())["records"]  # 3 classes: top-1 only
    return r


def _same_as_one_process(one: dict, two: dict) -> dict:
    """``two`` is ``one`` but for the provenance; the shares each rank embedded."""
    assert two["value"] == one["value"]
    assert two["setting"]["hash"] == one["setting"]["hash"]
    assert two["unit"] == one["unit"] and two["ci95"] == one["ci95"]
    a, b = one["details"], two["details"]
    assert b.pop("processes") == {"world_size": 2, "backend": "gloo"}
    shares = b.pop("images_embedded_by_rank")
    assert "processes" not in a and "images_embedded_by_rank" not in a
    for e in a["history"] + b["history"]:
        e.pop("seconds")  # wall time
    # every epoch's losses and validation scores, the selection, the per-image correctness
    assert b == a
    assert a["n_test"] == CLASSES * TEST
    assert unpack_bits(a["per_sample_correct"], a["n_test"]).mean() == pytest.approx(one["value"])
    return shares


def _cuts_per_rank(sizes: list[int], w: int = 2) -> list[int]:
    """Images embedded by each rank when rank r takes cuts r, r + w, ... of ``sizes``."""
    return [sum(sizes[r::w]) for r in range(w)]


def _shares(epochs: int) -> list[int]:
    val = round(0.2 * CLASSES * TRAIN)
    rows = CLASSES * TRAIN - val
    step = [min(FORWARD, BATCH - c) for c in range(0, BATCH, FORWARD)]  # 6, 6, 4
    train = step * (rows // BATCH)  # drop_last: 3 steps, 9 cuts an epoch
    test = [min(FORWARD, CLASSES * TEST - c) for c in range(0, CLASSES * TEST, FORWARD)]
    val_cuts = [min(FORWARD, val - c) for c in range(0, val, FORWARD)]
    per = [_cuts_per_rank(s) for s in (val_cuts, test, *[train] * epochs)]
    return [sum(r) for r in zip(*per, strict=True)]


@pytest.mark.slow
def test_two_processes_share_the_forwards_and_write_one_process_record(runs):
    out, two, _ = runs
    one = _record(out / "r1")
    assert one["value"] > 1 / CLASSES + 0.05  # the heads learn: the comparison means something
    shares = _same_as_one_process(one, _record(out / "r2"))
    assert shares == _shares(EPOCHS) == [73, 62]  # each rank its cuts only
    assert two.count("[done]") == 1


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_on_both_ranks(runs):
    out, _, rerun = runs
    for r in (0, 1):
        assert f"[resume] linear_aug from epoch 1 of 2 on rank {r}" in rerun, rerun
    shares = _same_as_one_process(_record(out / "r1"), _record(out / "rk"))
    assert shares == _shares(EPOCHS - 1)  # the rerun trained the second epoch only
    assert not list((out / "ck" / "train_state").iterdir())  # the finished unit's state gone
    left = [p for p in (out / "ck").rglob("*") if p.name.endswith((".tmp", ".lock"))]
    assert not left
