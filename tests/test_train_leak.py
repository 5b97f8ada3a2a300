"""No leak between training, selection and test: the trainer's images avoid the evaluation's
validation split, its monitor scores on held-out train images (never test, never validation),
the sidecar records both, and the evaluation checks the split it selects on against the
training it evaluates (``load_report.training.split_check``)."""

import json

import numpy as np
import pytest

from ssl_eval.backbones.base import BuildOptions
from ssl_eval.backbones.families.trained import build_from_training_dir, split_check
from ssl_eval.backbones.trained_format import indices_sha256, training_split
from ssl_eval.core.config import RunConfig
from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.splits import stratified_val_split
from ssl_eval.train.config import TrainConfig
from ssl_eval.train.data import _stack, load_train_data
from ssl_eval.train.fingerprint import trainer_fingerprint
from ssl_eval.train.loop import train
from ssl_eval.train.resolve import resolve_config

SLOW_FIXTURES = ("runs",)  # module fixtures that train or start processes (conftest)

SETTINGS = {
    "arch": "cifar_resnet_tiny",
    "dataset": "digits",
    "epochs": 1,
    "batch_size": 32,
    "train_subset": 64,
    "monitor": {"knn_bank": 64, "knn_queries": 64},
}
SMALL = [f"method_cfg.{k}=32" for k in ("proj_hidden", "proj_dim")]


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", DatasetOptions())


@pytest.fixture(scope="module")
def data():
    return load_train_data("digits", 16, 0, 64, 64, 64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """A finished one-epoch run and an unfinished one (1 of 2 epochs)."""
    tmp = tmp_path_factory.mktemp("leak")
    train(resolve_config("simclr", 16, settings=SETTINGS, overrides=SMALL), tmp / "done", data=data)
    cut = resolve_config("simclr", 16, settings={**SETTINGS, "epochs": 2}, overrides=SMALL)
    train(cut, tmp / "cut", data=data, stop_after_epoch=1)
    return tmp


@pytest.mark.slow
def test_the_training_images_avoid_the_evaluations_validation_split():
    """The issue's case: 4,000 of the 10,000 shapes train images. Drawn from all of train,
    395 of the evaluation's 1,000 validation images were in the supervised model's labelled
    subset; drawn from train minus the split (the same function, the same defaults), none."""
    shapes = get_dataset("shapes", DatasetOptions())
    labels = np.asarray(shapes.train.labels)
    _, val = stratified_val_split(labels, RunConfig.val_fraction, RunConfig.split_seed)
    tr, held, val2 = training_split(labels, 4000, 0, 0.1, 0)
    assert len(val) == 1000 and np.array_equal(val, val2)
    assert len(tr) == 4000 and not np.isin(val, tr).any()
    assert len(held) == 10000 - 1000 - 4000 and not np.isin(held, np.union1d(tr, val)).any()
    before = np.sort(np.random.default_rng(0).permutation(len(labels))[:4000])  # the old draw
    assert int(np.isin(val, before).sum()) == 395
    whole, rest, _ = training_split(labels, None, 0, 0.1, 0)  # no subset: all but validation
    assert len(whole) == 9000 and len(rest) == 0 and not np.isin(val, whole).any()


def test_the_trainers_defaults_are_the_evaluations(digits):
    from ssl_eval.cli import build_parser

    a = build_parser().parse_args(["run", "--backbone", "pixels"])
    run_cfg = RunConfig(backbones=("pixels",), datasets=("digits",), protocols=(object(),))
    t = TrainConfig()
    assert (t.val_fraction, t.split_seed) == (run_cfg.val_fraction, run_cfg.split_seed)
    assert (t.val_fraction, t.split_seed) == (a.val_fraction, a.split_seed)
    with pytest.raises(UserError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)


def test_loaded_training_data_and_monitor_queries_are_held_out_train_images(data, digits):
    """Training images avoid validation; the monitor's bank is training images and its queries
    are train images neither trained on nor in validation, never test images."""
    labels = np.asarray(digits.train.labels)
    _, val = stratified_val_split(labels, 0.1, 0)
    tr, q = data.train_index, data.query_index
    assert len(tr) == 64 and len(q) == 64
    assert not np.isin(tr, val).any() and not np.isin(q, val).any() and not np.isin(q, tr).any()
    assert np.array_equal(data.query_images.numpy(), _stack(digits.train, q, 16).numpy())
    assert np.array_equal(data.query_labels.numpy(), labels[q])
    assert np.array_equal(data.images.numpy(), _stack(digits.train, tr, 16).numpy())
    bank = data.bank_images.reshape(len(data.bank_images), -1).numpy()
    trained = {row.tobytes() for row in data.images.reshape(len(tr), -1).numpy()}
    assert all(row.tobytes() in trained for row in bank)  # the bank is training images
    # without held-out images the monitor has no queries (no k-NN), and says so
    whole = load_train_data("digits", 8, 0, None, 16, 16)
    assert len(whole.query_images) == 0 and whole.monitor["queries"].startswith("none")
    assert not np.isin(whole.train_index, val).any() and len(whole.images) == len(labels) - len(val)


def test_the_sidecar_records_the_split_and_what_the_monitor_scored_on(runs, data, digits):
    side = json.loads((runs / "done" / "backbone.json").read_text())
    _, val = stratified_val_split(np.asarray(digits.train.labels), 0.1, 0)
    split = side["eval_split"]
    assert (split["val_fraction"], split["split_seed"]) == (0.1, 0)
    assert split["val_sha256"] == indices_sha256(val) and split["val_images"] == len(val)
    assert split["train_sha256"] == indices_sha256(data.train_index)
    assert side["monitor"]["queries_sha256"] == indices_sha256(data.query_index)
    assert "held-out train images" in side["monitor"]["queries"]
    assert "knn_top1" in side["final_diagnostics"]
    # what trained it, and the evaluation's record of it
    assert side["trainer"] == json.loads(json.dumps(trainer_fingerprint()))
    training = build_from_training_dir(runs / "done").load_report["training"]
    assert training["trainer_source"] == trainer_fingerprint()["source"]
    assert training["trainer_versions"] == side["trainer"]["versions"]


def test_a_run_refuses_data_loaded_with_another_split(tmp_path, data):
    cfg = resolve_config("simclr", 16, settings={**SETTINGS, "split_seed": 1}, overrides=SMALL)
    with pytest.raises(UserError, match="validation split"):
        train(cfg, tmp_path / "x", data=data)


def _training(runs):
    return build_from_training_dir(runs / "done").load_report["training"]


def test_split_check_ok_overlap_unknown_and_other_data(runs, data, digits, capfd):
    labels = np.asarray(digits.train.labels)
    training = _training(runs)
    _, val = stratified_val_split(labels, 0.1, 0)
    assert split_check(training, "digits", digits.fingerprint, val, labels) == "ok"
    assert capfd.readouterr().err == ""
    _, val1 = stratified_val_split(labels, 0.1, 1)  # another split: some were trained on
    n = int(np.isin(val1, data.train_index).sum())
    assert n > 0
    verdict = split_check(training, "digits", digits.fingerprint, val1, labels)
    assert verdict == f"overlap: {n} of {len(val1)} validation images were training images"
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and verdict in err and "--split-seed 0" in err
    old = {**training, "eval_split": None}  # a sidecar written before the split was recorded
    assert split_check(old, "digits", digits.fingerprint, val, labels).startswith("unknown")
    assert "retrain" in capfd.readouterr().err
    forged = {**training, "eval_split": {**training["eval_split"], "train_sha256": "0" * 16}}
    assert split_check(forged, "digits", digits.fingerprint, val1, labels).startswith("unknown")
    other = split_check(training, "shapes", {"generator_version": 2}, val, labels)
    assert other.startswith("other data")
    assert split_check({"method": "x"}, "digits", digits.fingerprint, val, labels) is None


def _run(tmp_path, backbone, *extra):
    from ssl_eval.cli import main
    from ssl_eval.records.store import load_records

    out = tmp_path / "results"
    code = main(
        [
            "run",
            "--backbone",
            f"ckpt:{backbone}",
            "--dataset",
            "digits",
            "--protocol",
            "knn",
            "--results-dir",
            str(out),
            "--no-progress",
            "--no-leaderboard",
            "--cache-dir",
            str(tmp_path / "cache"),
            *extra,
        ]
    )
    return code, (load_records(out) if out.exists() else [])


@pytest.mark.slow
def test_evaluation_records_the_split_check_and_warns(runs, tmp_path, capfd):
    """Through `ssl-eval run`: the evaluation's split is the trainer's (ok), or another one
    (overlap, warned in one line); an unfinished training is refused in one line unless
    --allow-incomplete, and then its records say so."""
    code, recs = _run(tmp_path / "a", runs / "done")
    assert code == 0 and recs
    assert {r.load_report["training"]["split_check"] for r in recs} == {"ok"}
    assert "validation split vs the training" not in capfd.readouterr().err
    code, recs = _run(tmp_path / "b", runs / "done", "--split-seed", "1")
    assert code == 0 and recs[0].load_report["training"]["split_check"].startswith("overlap: ")
    err = capfd.readouterr().err
    assert len([ln for ln in err.splitlines() if "validation split vs the training" in ln]) == 1
    code, recs = _run(tmp_path / "c", runs / "cut")
    err = capfd.readouterr().err
    assert code == 2 and not recs and "unfinished training (1/2 epochs)" in err
    assert "--allow-incomplete" in err
    code, recs = _run(tmp_path / "d", runs / "cut", "--allow-incomplete")
    assert code == 0 and recs
    assert all(r.load_report["training"]["incomplete_allowed"] is True for r in recs)
    assert recs[0].load_report["training"]["split_check"] == "ok"


def test_an_unfinished_run_is_described_as_incomplete(runs):
    bb = build_from_training_dir(runs / "cut", BuildOptions(allow_incomplete=True))
    assert "INCOMPLETE" in bb.description and "1/2 epochs" in bb.description
