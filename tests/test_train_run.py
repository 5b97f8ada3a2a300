"""End to end: a tiny run writes a checkpoint the evaluator reads; a killed and resumed run
ends bitwise where an uninterrupted one ends; user mistakes are UserErrors."""

import json

import numpy as np
import pytest
import torch

from ssl_eval.backbones.families.trained import build_from_training_dir, is_training_dir
from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.splits import stratified_val_split
from ssl_eval.features.extraction import extract
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.knn import KnnParams, run_knn
from ssl_eval.train.checkpoint import load_state
from ssl_eval.train.data import load_train_data
from ssl_eval.train.loop import train
from ssl_eval.train.resolve import default_config, resolve_config

SETTINGS = {
    "arch": "cifar_resnet_tiny",
    "dataset": "digits",
    "epochs": 2,
    "batch_size": 32,
    "train_subset": 64,
    "monitor": {"knn_bank": 64, "knn_queries": 64},
}


@pytest.fixture(scope="module")
def data():
    return load_train_data("digits", 32, 0, 64, 64, 64)


def _cfg(method="simclr", **kw):
    known = default_config(method).method_cfg
    small = [f"method_cfg.{k}=32" for k in ("proj_hidden", "pred_hidden", "proj_dim") if k in known]
    return resolve_config(method, 32, settings={**SETTINGS, **kw}, overrides=small)


@pytest.mark.slow
def test_run_writes_checkpoint_the_evaluator_reads(tmp_path, data):
    out = tmp_path / "run"
    side = train(_cfg(epochs=1), out, data=data)
    assert is_training_dir(out) and not is_training_dir(tmp_path)
    meta = json.loads((out / "backbone.json").read_text())
    assert meta["format"] == "ssl-eval-trained-backbone" and meta["method"] == "simclr"
    assert (
        meta["architecture"]["name"] == "cifar_resnet_tiny" and meta["train_config"]["epochs"] == 1
    )
    assert set(meta["final_diagnostics"]) >= {
        "loss",
        "std",
        "rank",
        "alignment",
        "uniformity",
        "knn_top1",
    }
    assert isinstance(meta["collapsed"], bool) and meta["collapsed"] == side["collapsed"]
    bb = build_from_training_dir(out)
    assert bb.weights.source == "file" and len(bb.weights.sha256) == 64 and not bb.model.training
    bundle = get_dataset("digits", DatasetOptions())
    tr = extract(
        bb, bundle, "train", cache_dir=tmp_path / "c", device=torch.device("cpu"), progress=False
    )
    te = extract(
        bb, bundle, "test", cache_dir=tmp_path / "c", device=torch.device("cpu"), progress=False
    )
    tri, vai = stratified_val_split(np.asarray(tr.labels), 0.1, 0)
    res = run_knn(
        ProtocolInputs(
            np.asarray(tr.features),
            np.asarray(tr.labels),
            np.asarray(te.features),
            np.asarray(te.labels),
            tri,
            vai,
            10,
        ),
        KnnParams(ks=(5,)),
    )
    assert res.metrics["top1"] > 0.15  # 10 classes: above chance even after one tiny epoch
    with pytest.raises(UserError, match="already holds"):
        train(_cfg(epochs=1), out, data=data)


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_uninterrupted(tmp_path, data):
    full, cut = tmp_path / "full", tmp_path / "cut"
    cfg = _cfg("byol")  # an EMA target and a momentum schedule make resume non-trivial
    train(cfg, full, data=data)
    train(cfg, cut, data=data, stop_after_epoch=1)
    assert json.loads((cut / "backbone.json").read_text())["epochs_done"] == 1
    train(cfg, cut, data=data, resume=True)
    assert (full / "backbone.safetensors").read_bytes() == (
        cut / "backbone.safetensors"
    ).read_bytes()
    a, b = load_state(full), load_state(cut)  # checksummed files (ssl_eval.train.checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    with pytest.raises(UserError, match="another config"):
        train(_cfg("byol", seed=1), cut, data=data, resume=True)


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown training method"):
        resolve_config("simclar")
    with pytest.raises(UserError, match="unknown method setting"):
        resolve_config("simclr", overrides=["method_cfg.temprature=0.3"])
    with pytest.raises(UserError, match="not a training folder"):
        build_from_training_dir(tmp_path)
    with pytest.raises(UserError, match="needs a ViT"):
        train(
            resolve_config("mae", settings={**SETTINGS, "arch": "cifar_resnet_tiny"}),
            tmp_path / "m",
        )


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    from ssl_eval.cli import main

    assert main(["train", "--method", "simclar", "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean 'simclr'" in capsys.readouterr().err
    assert main(["train", "--method", "dino", "--print-config", "--out", str(tmp_path / "x")]) == 0
    assert "vit_tiny_p4" in capsys.readouterr().out
