import numpy as np
import pytest
import torch

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.cli import main
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.splits import stratified_val_split
from ssl_eval.protocols import finetune
from ssl_eval.protocols.base import ImageInputs
from ssl_eval.protocols.finetune import FinetuneParams, _lr_at, run_finetune
from ssl_eval.results import load_records


def test_finetuned_random_backbone_beats_its_linear_probe_on_digits(tmp_path):
    r = tmp_path / "r"
    rc = main(["run", "--backbone", "random:resnet10t", "--image-size", "32", "--dataset", "digits",
               "--protocol", "linear,finetune", "--set", "finetune.epochs=8", "--set", "finetune.hflip=false",
               "--results-dir", str(r), "--no-progress"])
    assert rc == 0
    top1 = {x.protocol["name"]: x for x in load_records(r) if x.metric == "top1"}
    assert top1["finetune"].value > top1["linear"].value + 0.01, {k: v.value for k, v in top1.items()}
    assert top1["finetune"].protocol["overrides"] == {"epochs": 8, "hflip": False}
    assert top1["finetune"].ci_method == "bootstrap-test"
    assert top1["finetune"].details["epochs_run"] == 8


def _inputs(tmp_path, seed=0):
    bb = build_backbone("random:resnet10t", BuildOptions(image_size=16))
    ds = get_dataset("digits", DatasetOptions())
    tr, va = stratified_val_split(ds.train.labels, 0.1, 0)
    return ImageInputs(bb, ds, tr[:300], va, torch.device("cpu"), seed, tmp_path / "state")


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    p = FinetuneParams(epochs=3, batch_size=32, mixup_alpha=0.2, cutmix_alpha=1.0, hflip=False)
    full = run_finetune(_inputs(tmp_path / "a"), p)

    def stop_after_first(epoch):
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "_after_epoch", stop_after_first)
    inp = _inputs(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(inp, p)
    assert (tmp_path / "b" / "state" / "state.pt").is_file()
    monkeypatch.setattr(finetune, "_after_epoch", lambda epoch: None)
    resumed = run_finetune(_inputs(tmp_path / "b"), p)
    assert resumed.metrics == full.metrics
    assert [h["val_top1"] for h in resumed.details["history"]] == [h["val_top1"] for h in full.details["history"]]
    np.testing.assert_array_equal(resumed.per_sample["top1"], full.per_sample["top1"])
    assert not (tmp_path / "b" / "state" / "state.pt").exists()


def test_schedule_counts_samples_not_steps():
    # warmup then cosine, as a function of samples seen: the batch size does not change it
    total, warm = 1000, 100
    assert _lr_at(50, total, warm, 1.0) == pytest.approx(0.5)
    assert _lr_at(100, total, warm, 1.0) == pytest.approx(1.0)
    assert _lr_at(550, total, warm, 1.0) == pytest.approx(0.5)
    assert _lr_at(1000, total, warm, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_layer_decay_needs_block_structure(tmp_path):
    from ssl_eval.errors import UserError

    inp = _inputs(tmp_path)
    inp.backbone = build_backbone("pixels", BuildOptions())  # no block structure
    with pytest.raises(UserError, match="layer_decay"):
        run_finetune(inp, FinetuneParams(epochs=1, layer_decay=0.75))


def test_layer_decay_on_a_vit(tmp_path):
    bb = build_backbone("random:vit_tiny_patch16_224", BuildOptions(image_size=32))
    ds = get_dataset("digits", DatasetOptions())
    tr, va = stratified_val_split(ds.train.labels, 0.1, 0)
    inp = ImageInputs(bb, ds, tr[:128], va[:64], torch.device("cpu"), 0, tmp_path / "s")
    from timm.layers import DropPath

    assert finetune._set_drop_path(bb.model.__class__(img_size=32, num_classes=0, depth=3), 0.2) == 3
    out = run_finetune(inp, FinetuneParams(epochs=1, batch_size=32, layer_decay=0.75, drop_path=0.1))
    assert 0.0 <= out.metrics["top1"] <= 1.0
    assert not any(isinstance(m, DropPath) for m in bb.model.modules())  # the shared backbone is untouched
