"""Real processes killed with SIGKILL at precise points (``fsutil._kill_point``, driven by
``SSL_EVAL_TEST_KILL_AT``), then rerun: the rerun ends with exactly the numbers of an
uninterrupted run, and nothing is left behind (no temporary file or folder, no lock file, no
empty state folder). Extraction killed half-way is in tests/test_features.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, image_folder

from ssl_eval.cli import main
from ssl_eval.records.store import load_records

CHEAP_LINEAR = ["linear.lrs=[0.1]", "linear.weight_decays=[0.0]", "linear.min_steps=20"]
EVAL = ["run", "--backbone", "pixels", "--dataset", "digits", "--protocol", "knn,linear"]
EVAL += [a for s in CHEAP_LINEAR for a in ("--set", s)]
FINETUNE = ["run", "--backbone", "random:cifar_resnet_tiny", "--image-size", "16"]
FINETUNE += ["--protocol", "finetune", "--set", "epochs=2", "--set", "batch_size=16"]
FINETUNE += ["--num-workers", "0"]
COMMON = ["--no-progress", "--no-leaderboard", "--device", "cpu"]
TRAIN = ["train", "--method", "simclr", "--arch", "cifar_resnet_tiny", "--dataset", "digits"]
TRAIN += ["--epochs", "2", "--batch-size", "32", "--train-subset", "64", "--image-size", "16"]
for _s in ("monitor.knn_bank=64", "monitor.knn_queries=64"):
    TRAIN += ["--set", _s]
for _s in ("method_cfg.proj_hidden=32", "method_cfg.proj_dim=32"):
    TRAIN += ["--set", _s]
TRAIN += ["--device", "cpu"]


def _dirs(tmp: Path) -> list[str]:
    return ["--results-dir", str(tmp / "r"), "--cache-dir", str(tmp / "c")]


def _killed(args: list[str], point: str, tmp_path: Path) -> str:
    """Run ``ssl-eval ARGS`` in a new process that SIGKILLs itself at ``point``; its stderr."""
    env = {**cli_env(tmp_path), "SSL_EVAL_TEST_KILL_AT": point}
    r = subprocess.run(
        [sys.executable, "-m", "ssl_eval.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    return r.stderr


def _numbers(results: Path) -> dict:
    """Every recorded number with its interval, by (backbone, protocol, metric)."""
    out = {}
    for r in load_records(results):
        key = (r.backbone, r.protocol["name"], r.metric)
        assert key not in out, f"{key} recorded twice"
        out[key] = (r.value, r.ci95, r.spread)
    return out


def _leftovers(*folders: Path) -> list[Path]:
    """Temporary files and folders, lock files, empty folders (the ``train_state`` container
    itself aside: an uninterrupted fine-tune leaves it too, empty)."""
    out = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            for n in dirs + files:
                p = Path(root, n)
                empty = p.is_dir() and not any(p.iterdir()) and n != "train_state"
                if n.endswith((".tmp", ".lock")) or empty:
                    out.append(p)
    return out


def _reference(tmp: Path, args: list[str]) -> dict:
    assert main([*args, *COMMON, *_dirs(tmp)]) == 0
    return _numbers(tmp / "r")


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory):
    """pixels x digits x (knn, linear), uninterrupted."""
    return _reference(tmp_path_factory.mktemp("ref"), EVAL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "point,left",
    [
        # the k-NN record is in place; the process dies before the linear probe starts
        ("after-write:*-*.json#1", "one record"),
        # half of the k-NN record's bytes are in its temporary file
        ("mid-write:*-*.json#1", "a temporary record"),
        # half of the first cache entry's meta.json is written, inside its temporary folder
        ("mid-write:meta.json#1", "a temporary cache entry"),
    ],
    ids=["between-protocols", "while-a-record-is-written", "while-a-cache-entry-is-written"],
)
def test_a_killed_run_reruns_to_the_uninterrupted_numbers(
    eval_reference, tmp_path, capfd, point, left
):
    _killed([*EVAL, *COMMON, *_dirs(tmp_path)], point, tmp_path)
    # what the killed process left (a lock file it held aside: the kernel dropped the lock)
    records = sorted(p for p in (tmp_path / "r" / "records").glob("*") if p.suffix != ".lock")
    entries = sorted(p for p in (tmp_path / "c" / "features").glob("*") if p.suffix != ".lock")
    if left == "one record":
        assert [p.suffix for p in records] == [".json"] and not records[0].name.startswith(".")
    elif left == "a temporary record":
        assert [p.name.endswith(".tmp") for p in records] == [True]
    else:
        assert [p.name.endswith(".tmp") for p in entries] == [True] and entries[0].is_dir()
    assert _leftovers(tmp_path / "r", tmp_path / "c")  # at least the lock it held
    capfd.readouterr()
    assert main([*EVAL, *COMMON, *_dirs(tmp_path)]) == 0
    err = capfd.readouterr().err
    assert _numbers(tmp_path / "r") == eval_reference
    assert not _leftovers(tmp_path / "r", tmp_path / "c")
    assert len(list((tmp_path / "r" / "records").iterdir())) == 2
    # only what was missing is computed again
    assert err.count("[done]") == (1 if left == "one record" else 2), err


@pytest.mark.slow
def test_a_killed_training_resumes_to_the_uninterrupted_weights(tmp_path, capfd):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*TRAIN, "--out", str(ref)]) == 0
    # killed while epoch 2's state is half-written: the folder holds epoch 2's weights, epoch
    # 1's state and a temporary file
    _killed([*TRAIN, "--out", str(out)], "mid-write:train_state.pt#2", tmp_path)
    assert _leftovers(out)
    capfd.readouterr()
    assert main([*TRAIN, "--out", str(out), "--resume"]) == 0
    err = capfd.readouterr().err
    assert "after epoch 1/2" in err, err
    for f in ("backbone.safetensors",):
        assert (out / f).read_bytes() == (ref / f).read_bytes()
    from ssl_eval.train import checkpoint

    assert checkpoint.load_state(out)["epoch"] == 2
    assert not _leftovers(out)


@pytest.mark.slow
def test_a_killed_finetune_resumes_to_the_uninterrupted_numbers(tmp_path_factory, capfd):
    data = tmp_path_factory.mktemp("data")
    image_folder(data, {"train": 24, "val": 8}, classes=3, pixel=lambda c, i: (60 * c, 7 * i, 0))
    args = [*FINETUNE, "--dataset", f"folder:{data}"]
    ref = _reference(tmp_path_factory.mktemp("ftref"), args)
    tmp = tmp_path_factory.mktemp("ft")
    # killed while epoch 2's state is half-written: epoch 1's state stays, beside the
    # temporary file, in the unit's state folder
    _killed([*args, *COMMON, *_dirs(tmp)], "mid-write:state.pt#2", tmp)
    states = list((tmp / "c" / "train_state").iterdir())
    assert len(states) == 2  # the unit's folder and its (stale) lock file
    capfd.readouterr()
    assert main([*args, *COMMON, *_dirs(tmp)]) == 0
    out, err = capfd.readouterr()
    assert "[resume] fine-tune from epoch 1 of 2" in out + err, out + err
    assert _numbers(tmp / "r") == ref
    assert not _leftovers(tmp / "r", tmp / "c")
    assert list((tmp / "c" / "train_state").iterdir()) == []


def _details(results: Path) -> dict:
    """Every record's details (the training history: losses, validation accuracies, the step
    count) less wall times, by (backbone, protocol, metric)."""

    def strip(x):
        if isinstance(x, dict):
            return {
                k: strip(v)
                for k, v in x.items()
                if k not in ("seconds", "tokens_train", "tokens_test")
            }
        return [strip(v) for v in x] if isinstance(x, list) else x

    return {
        (r.backbone, r.protocol["name"], r.metric): strip(r.details) for r in load_records(results)
    }


def _killed_unit_reruns(tmp_path_factory, capfd, args, point, resumed):
    """The reference run, a run killed at ``point`` that leaves a state and its lock in the
    unit's state folder, the rerun; the rerun says ``resumed`` and ends on the reference."""
    data = tmp_path_factory.mktemp("data")
    image_folder(data, {"train": 8, "val": 4}, classes=3, pixel=lambda c, i: (60 * c, 20 * i, 0))
    args = [*args, "--dataset", f"folder:{data}", "--num-workers", "0", *COMMON]
    ref_dir = tmp_path_factory.mktemp("ref")
    ref = _reference(ref_dir, args)
    tmp = tmp_path_factory.mktemp("killed")
    _killed([*args, *_dirs(tmp)], point, tmp)
    (state,) = [d for d in (tmp / "c" / "train_state").iterdir() if d.is_dir()]
    assert (state / "state.pt").is_file()  # the state of the last whole save
    assert _leftovers(tmp / "c")  # the temporary state and the dead process's lock
    capfd.readouterr()
    assert main([*args, *_dirs(tmp)]) == 0
    out, err = capfd.readouterr()
    assert resumed in out + err, out + err
    assert _numbers(tmp / "r") == ref
    assert _details(tmp / "r") == _details(ref_dir / "r")
    assert not _leftovers(tmp / "r", tmp / "c")
    assert list((tmp / "c" / "train_state").iterdir()) == []


LINEAR_AUG = ["run", "--backbone", "random:cifar_resnet_tiny", "--image-size", "16"]
LINEAR_AUG += ["--protocol", "linear@mae", "--set", "epochs=3", "--set", "warmup_epochs=1"]
LINEAR_AUG += ["--set", "batch_size=8"]


@pytest.mark.slow
def test_a_killed_augmented_linear_probe_resumes_to_the_uninterrupted_numbers(
    tmp_path_factory, capfd
):
    # killed while epoch 1's state is half-written: epoch 0's state stays beside the temporary
    # file; the rerun trains epochs 1 and 2 (2 steps each, the lr of steps 2-5)
    _killed_unit_reruns(
        tmp_path_factory,
        capfd,
        LINEAR_AUG,
        "mid-write:state.pt#2",
        "[resume] linear_aug from epoch 1 of 3",
    )


ATTENTIVE = ["run", "--backbone", "py:test_attentive:tiny_vit", "--image-size", "8"]
ATTENTIVE += ["--protocol", "attentive@capi", "--set", "iterations=12", "--set", "warmup=2"]
ATTENTIVE += ["--set", "lrs=[0.03,0.3]", "--set", "batch_size=8"]


@pytest.mark.slow
def test_a_killed_attentive_probe_resumes_to_the_uninterrupted_numbers(tmp_path_factory, capfd):
    # 21 training rows, batches of 8: 2 steps an epoch, a state after every epoch; killed while
    # the third (step 6) is half-written: step 4's state stays beside the temporary file
    _killed_unit_reruns(
        tmp_path_factory,
        capfd,
        ATTENTIVE,
        "mid-write:state.pt#3",
        "[resume] attentive from step 4 of 12",
    )
