"""Fine-tune and trainer state files are checksummed and verified when read: a damaged or
truncated one is reported in one line, removed, and the work starts over, ending where an
uninterrupted run ends. Empty state folders a killed process left are swept once nobody holds
them."""

import io
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.core.files import DamagedFile, lock_path, sweep_leftovers, write_checked
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.splits import stratified_val_split
from ssl_eval.protocols import finetune
from ssl_eval.protocols.base import ImageInputs
from ssl_eval.protocols.finetune import FinetuneParams, _read_state, run_finetune
from ssl_eval.train import checkpoint
from ssl_eval.train.data import load_train_data
from ssl_eval.train.loop import train
from ssl_eval.train.resolve import resolve_config

SLOW_FIXTURES = ("finetuned", "trained")  # module fixtures that train (conftest)

P = FinetuneParams(epochs=2, batch_size=32, hflip=False)


def _inputs(folder):
    bb = build_backbone("random:resnet10t", BuildOptions(image_size=16))
    ds = get_dataset("digits", DatasetOptions())
    tr, va = stratified_val_split(ds.train.labels, 0.1, 0)
    return ImageInputs(bb, ds, tr[:200], va[:100], torch.device("cpu"), 0, folder / "state")


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


DAMAGE = {
    "truncated to half": lambda d: d[: len(d) // 2],
    "truncated by one byte": lambda d: d[:-1],
    "a byte flipped in the middle": lambda d: _flip(d, len(d) // 2),
    "a byte flipped in the header": lambda d: _flip(d, 30),
    "emptied": lambda d: b"",
    "replaced by text": lambda d: b"not a state\n",
}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """An uninterrupted fine-tune and the state file an interrupted one leaves after epoch 0."""
    tmp = tmp_path_factory.mktemp("ft")
    full = run_finetune(_inputs(tmp / "full"), P)
    mp = pytest.MonkeyPatch()

    def stop(epoch):
        raise KeyboardInterrupt

    mp.setattr(finetune, "_after_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(_inputs(tmp / "cut"), P)
    mp.undo()
    state = (tmp / "cut" / "state" / "state.pt").read_bytes()
    return full, state


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_read_state_calls_every_damage_damage(finetuned, tmp_path, kind):
    path = tmp_path / "state.pt"
    path.write_bytes(DAMAGE[kind](finetuned[1]))
    with pytest.raises(DamagedFile) as e:
        _read_state(path, "cpu")
    assert "\n" not in str(e.value)


def test_a_truncated_legacy_state_is_damage_not_an_index_error(finetuned, tmp_path):
    # a state written before checksums (a bare torch file), truncated: torch.load raised an
    # IndexError or a RuntimeError here, and the unit stayed stuck on it
    payload = finetuned[1].partition(b"\n")[2]
    path = tmp_path / "state.pt"
    path.write_bytes(payload)
    assert _read_state(path, "cpu")["epoch"] == 0  # a whole legacy state still resumes
    for cut in (len(payload) // 3, len(payload) // 2, len(payload) - 100):
        path.write_bytes(payload[:cut])
        with pytest.raises(DamagedFile):
            _read_state(path, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated to half", "a byte flipped in the middle"])
def test_a_damaged_finetune_state_is_reported_removed_and_the_unit_starts_over(
    finetuned, tmp_path, capfd, kind
):
    full, state = finetuned
    inp = _inputs(tmp_path)
    path = tmp_path / "state" / "state.pt"
    path.parent.mkdir()
    path.write_bytes(DAMAGE[kind](state))
    out = run_finetune(inp, P)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "damaged" in ln]
    assert len(lines) == 1 and str(path) in lines[0] and "starts over" in lines[0], err
    assert out.metrics == full.metrics
    assert [h["val_top1"] for h in out.details["history"]] == [
        h["val_top1"] for h in full.details["history"]
    ]
    np.testing.assert_array_equal(out.per_sample["top1"], full.per_sample["top1"])
    assert not (tmp_path / "state").exists()  # finished: state and folder removed


# ---------------------------------------------------------------- trainer

SETTINGS = {
    "arch": "cifar_resnet_tiny",
    "dataset": "digits",
    "epochs": 2,
    "batch_size": 32,
    "train_subset": 64,
    "monitor": {"knn_bank": 64, "knn_queries": 64},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = load_train_data("digits", 16, 0, 64, 64, 64)
    small = [f"method_cfg.{k}=32" for k in ("proj_hidden", "proj_dim")]
    cfg = resolve_config("simclr", 16, settings=SETTINGS, overrides=small)
    train(cfg, tmp / "full", data=data)
    train(cfg, tmp / "cut", data=data, stop_after_epoch=1)
    return cfg, data, tmp


@pytest.mark.parametrize("kind", ["truncated to half", "a byte flipped in the middle", "emptied"])
def test_a_damaged_trainer_state_is_reported_removed_and_training_starts_over(
    trained, tmp_path, capfd, kind
):
    cfg, data, tmp = trained
    out = tmp_path / "run"
    out.mkdir()
    for f in (tmp / "cut").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    state = out / checkpoint.STATE
    state.write_bytes(DAMAGE[kind](state.read_bytes()))
    capfd.readouterr()
    train(cfg, out, data=data, resume=True)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "damaged" in ln]
    assert len(lines) == 1 and str(state) in lines[0] and "starts over" in lines[0], err
    assert "resuming" not in err
    # trained from epoch 0, deterministically: bitwise the uninterrupted weights
    assert (out / "backbone.safetensors").read_bytes() == (
        tmp / "full" / "backbone.safetensors"
    ).read_bytes()
    assert checkpoint.load_state(out)["epoch"] == 2


def test_an_intact_trainer_state_reads_and_its_form_is_checked(trained, tmp_path):
    cfg, data, tmp = trained
    st = checkpoint.load_state(tmp / "cut")
    assert st is not None and st["epoch"] == 1
    with pytest.raises(DamagedFile, match="does not match its history"):
        path = tmp_path / checkpoint.STATE
        buf = io.BytesIO()
        torch.save({**st, "epoch": 5}, buf)
        write_checked(path, buf.getvalue())
        checkpoint._read_state(path)


def test_a_state_that_does_not_fit_loads_nothing(tmp_path, capfd):
    a, b = nn.Linear(3, 2), nn.Linear(4, 2)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    other = torch.optim.SGD(b.parameters(), lr=0.1)
    path = tmp_path / checkpoint.STATE
    path.write_bytes(b"x")
    st = {"model": b.state_dict(), "optimizer": other.state_dict()}
    assert not checkpoint.restore(a, opt, st, path)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    assert not path.exists()
    assert "does not fit the model" in capfd.readouterr().err


# ---------------------------------------------------------------- empty state folders


HOLD = """
import sys, time
from pathlib import Path
from ssl_eval.core.files import file_lock, lock_path
with file_lock(lock_path(Path(sys.argv[1]))):
    print("held", flush=True)
    time.sleep(60)
"""


def test_empty_state_folders_are_swept_once_nobody_holds_them(tmp_path):
    states = tmp_path / "train_state"
    dead, live, busy = states / "a", states / "b", states / "c"
    for d in (dead, live, busy):
        d.mkdir(parents=True)
    (busy / "state.pt").write_bytes(b"work")  # not empty: a state to resume, kept
    # a fine-tune in progress (a live process holds the folder's lock), its folder still empty
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(live)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        removed = sweep_leftovers(states)
        assert removed == [dead]
        assert live.is_dir() and busy.is_dir() and lock_path(live).exists()
    finally:
        holder.kill()
        holder.wait()
    # its owner gone (killed: the lock file stays, the kernel dropped the lock), the next sweep
    # removes the folder and the stale lock file
    time.sleep(0.1)
    removed = sweep_leftovers(states)
    assert set(removed) == {live, lock_path(live)}
    assert sorted(p.name for p in states.iterdir()) == ["c"]


# ---------------------------------------------------------------- trained weights


@pytest.mark.parametrize("kind", ["a byte flipped in the middle", "truncated by one byte"])
def test_damaged_trained_weights_are_refused_not_scored(trained, tmp_path, kind):
    """A changed byte inside a tensor of backbone.safetensors still loads as weights (no
    format check sees it): the sidecar's sha256 refuses it in one line instead of scoring
    different weights under the run's name."""
    from ssl_eval.core.errors import UserError

    _, _, tmp = trained
    out = tmp_path / "run"
    out.mkdir()
    for f in (tmp / "full").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    assert build_backbone(f"ckpt:{out}", BuildOptions()).model is not None  # intact: loads
    w = out / checkpoint.WEIGHTS
    w.write_bytes(DAMAGE[kind](w.read_bytes()))
    with pytest.raises(UserError, match="does not match the sha256") as e:
        build_backbone(f"ckpt:{out}", BuildOptions())
    assert "\n" not in str(e.value)
