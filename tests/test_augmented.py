"""Augmented (online) linear probing (protocols/augmented.py): new crops every epoch, a
deterministic evaluation transform, MAE's BatchNorm, the learning rate of every step, and the
head chosen on validation, each checked against an independent computation."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import image_folder

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.cli import main
from ssl_eval.data.datasets import DatasetOptions, ImageSplit, get_dataset
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.features.loading import Images
from ssl_eval.protocols import augmented
from ssl_eval.protocols._images import TrainImages, crop_box_mae
from ssl_eval.protocols.augmented import AugmentedParams, Heads, run_augmented
from ssl_eval.protocols.base import ImageInputs, embed_images
from ssl_eval.records.store import load_records


def _split(n=6, size=40):
    rng = np.random.default_rng(0)
    return ImageSplit(np.arange(n) % 2, rng.integers(0, 255, (n, size, size, 3), np.uint8))


def test_train_crops_change_every_epoch_and_evaluation_is_extractions_pixels():
    split, pre = _split(), Preprocessing(resize=36, crop=32, interpolation="bicubic")
    tr = TrainImages(split, np.arange(6), pre, 0, True, (0.08, 1.0), True, "mae")
    seen = []
    for epoch in range(3):
        tr.epoch = epoch
        seen.append([tr[i][0] for i in range(6)])
    assert all(x.shape == (3, 32, 32) for e in seen for x in e)
    for a, b in ((0, 1), (1, 2), (0, 2)):  # every image gets a new crop in each epoch
        assert not any(torch.equal(x, y) for x, y in zip(seen[a], seen[b], strict=True))
    tr.epoch = 1
    assert all(torch.equal(tr[i][0], seen[1][i]) for i in range(6))  # drawn from (seed, epoch, i)
    ev = TrainImages(split, np.arange(6), pre, 0, False)
    ref = Images(split, pre)  # what feature extraction feeds the backbone
    assert all(torch.equal(ev[i][0], ref[i]) for i in range(6))


def test_mae_crop_clips_the_box_to_the_image():
    g = torch.Generator().manual_seed(0)
    # util/crop.py: w, h = round(sqrt(area * r)), round(sqrt(area / r)), then min(., side)
    for _ in range(200):
        top, left, h, w = crop_box_mae((30, 90), (1.0, 1.0), g)
        assert h == 30 and 45 <= w <= 60 and 0 <= left <= 90 - w and top == 0
        top, left, h, w = crop_box_mae((50, 50), (0.08, 1.0), g)
        assert 0 < h <= 50 and 0 < w <= 50 and top + h <= 50 and left + w <= 50
        assert 0.08 * 2500 * 0.9 <= h * w <= 2500


def test_batchnorm_is_torchs_per_group_of_bn_rows():
    torch.manual_seed(0)
    x = torch.randn(10, 5) * 3 + 1
    p = AugmentedParams(bn_rows=4, epochs=2, warmup_epochs=0)
    heads = Heads(1, 5, 3, p, "cpu")
    z = heads._train_norm(x)
    bn = torch.nn.BatchNorm1d(5, affine=False, eps=1e-6, momentum=0.1).train()
    first = bn(x[:4])  # the running statistics follow the first group (rank 0's, under DDP)
    parts = [first] + [
        torch.nn.functional.batch_norm(g, None, None, training=True, eps=1e-6)
        for g in (x[4:8], x[8:])
    ]
    torch.testing.assert_close(z, torch.cat(parts))
    torch.testing.assert_close(heads.rmean, bn.running_mean)
    torch.testing.assert_close(heads.rvar, bn.running_var)
    bn.eval()
    torch.testing.assert_close(heads.norm(x), bn(x))


def _inputs(tmp_path, n_train=96):
    """96 training and 60 validation images of digits, 100 test images."""
    bb = build_backbone("random:resnet10t", BuildOptions(image_size=16))
    ds = get_dataset("digits", DatasetOptions())
    cut = lambda s, n: ImageSplit(s.labels[:n], s.images[:n])  # noqa: E731
    ds = dataclasses.replace(ds, train=cut(ds.train, n_train + 60), test=cut(ds.test, 100))
    tr, va = np.arange(n_train), np.arange(n_train, n_train + 60)
    return ImageInputs(bb, ds, tr, va, torch.device("cpu"), 0, tmp_path / "state")


P = AugmentedParams(
    base_lrs=(0.3, 3.0),
    weight_decays=(0.0, 0.01),
    optimizer="sgd",
    epochs=3,
    warmup_epochs=1.0,
    min_lr=0.001,
    batch_size=40,
    bn_rows=16,
    forward_batch=16,
)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of ``P``, with the lr of every step and the heads after every
    epoch (the two tests below share it)."""
    lrs, kept = [], []
    upd, hook = augmented.OPTIMISERS["sgd"], augmented._after_epoch

    def spy(param, grad, mu, lr, *a, **k):
        if param.ndim == 3:
            lrs.append(lr.clone())
        upd(param, grad, mu, lr, *a, **k)

    def keep(epoch, heads):
        kept.append((heads.W.clone(), heads.b.clone(), heads.rmean.clone(), heads.rvar.clone()))

    augmented.OPTIMISERS["sgd"], augmented._after_epoch = spy, keep
    try:
        inp = _inputs(tmp_path_factory.mktemp("full"))
        out = run_augmented(inp, P)
    finally:
        augmented.OPTIMISERS["sgd"], augmented._after_epoch = upd, hook
    return inp, out, lrs, kept


@pytest.mark.slow
def test_heads_chosen_on_validation_and_lr_of_every_step(full_run):
    inp, out, lrs, kept = full_run
    p = P
    # the schedule: 96 rows, batch 40, drop_last -> 2 steps an epoch; lr = base * 40 / 256,
    # util/lr_sched at the fractional epoch of each step, floor 0.001
    assert len(lrs) == 6 and out.details["steps_per_epoch"] == 2
    for s, lr in enumerate(lrs):
        e = s / 2
        for h, (base, _) in enumerate(p.settings()):
            peak = base * 40 / 256
            want = (
                peak * e / 1.0
                if e < 1.0
                else 0.001 + (peak - 0.001) * 0.5 * (1 + math.cos(math.pi * (e - 1.0) / 2.0))
            )
            assert float(lr[h]) == pytest.approx(want, rel=1e-6)

    # the (epoch, head) with the best validation top-1, recomputed from features of the
    # extraction path (embed_images) and the heads as they stood after each epoch
    ds, bb = inp.bundle, inp.backbone
    val_x = torch.from_numpy(embed_images(bb, ds.train.images[inp.val_idx], inp.device))
    test_x = torch.from_numpy(embed_images(bb, ds.test.images, inp.device))
    val_y, test_y = torch.from_numpy(ds.train.labels[inp.val_idx]), torch.from_numpy(ds.test.labels)

    def acc(W, b, m, v, x, y):
        z = (x - m) / torch.sqrt(v + 1e-6)
        return ((torch.einsum("nd,hcd->nhc", z, W) + b).argmax(2) == y.view(-1, 1)).float().mean(0)

    val = torch.stack([acc(*k, val_x, val_y) for k in kept])  # (epochs, heads)
    test = torch.stack([acc(*k, test_x, test_y) for k in kept])
    flat = int(torch.argmax(val.flatten()))  # the first best in (epoch, head) order
    epoch, head = divmod(flat, val.shape[1])
    sel = out.details["selected"]
    assert (sel["epoch"], sel["base_lr"], sel["weight_decay"]) == (epoch, *p.settings()[head])
    assert out.metrics["top1"] == pytest.approx(float(test[epoch, head]), abs=1.5 / len(test_y))
    assert out.details["mae_rule_test_top1"] == pytest.approx(
        float(test[:, head].max()), abs=1.5 / len(test_y)
    )
    assert len(out.per_sample["top1"]) == len(test_y)


@pytest.mark.slow
def test_cli_runs_linear_mae_with_intervals(tmp_path):
    # an image folder of 2 classes (30 training and 10 test images each, 12 x 12 flat grey),
    # read through the decode cache's full-size maps
    image_folder(
        tmp_path / "data",
        {"train": 30, "test": 10},
        pixel=lambda c, i: 100 + 3 * i + 10 * c,  # overlapping grey levels: some errors
        shape=lambda c, i: (12, 12),
    )
    r = tmp_path / "r"
    rc = main(
        [
            "run",
            "--backbone",
            "random:resnet10t",
            "--image-size",
            "16",
            "--dataset",
            f"folder:{tmp_path / 'data'}",
            "--protocol",
            "linear@mae",
            "--set",
            "epochs=2",
            "--set",
            "warmup_epochs=1",
            "--set",
            "batch_size=16",
            "--decode-cache",
            "--results-dir",
            str(r),
            "--no-progress",
        ]
    )
    assert rc == 0
    recs = {x.metric: x for x in load_records(r)}
    top1 = recs["top1"]
    assert top1.protocol["type"] == "linear_aug" and top1.ci_method == "bootstrap-test"
    lo, hi = top1.ci95
    assert lo <= top1.value <= hi and hi > lo
    d = top1.details
    assert d["batch"] == 16 and d["steps"] == 2 * d["steps_per_epoch"]
    assert d["steps_per_epoch"] == d["train_size"] // 16  # drop_last, as MAE's loader
    assert d["selected"]["lr"] == pytest.approx(0.1 * 16 / 256)
    assert len(d["history"]) == 2 and d["selected"]["epoch"] in (0, 1)


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, full_run):
    _, full, _, _ = full_run

    def stop(epoch, heads):
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(augmented, "_after_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        run_augmented(_inputs(tmp_path), P)
    assert (tmp_path / "state" / "state.pt").is_file()
    monkeypatch.setattr(augmented, "_after_epoch", lambda epoch, heads: None)
    resumed = run_augmented(_inputs(tmp_path), P)
    assert resumed.metrics == full.metrics
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.details["history"]) == strip(full.details["history"])
    assert resumed.details["selected"] == full.details["selected"]
    assert resumed.details["mae_rule_test_top1"] == full.details["mae_rule_test_top1"]
    np.testing.assert_array_equal(resumed.per_sample["top1"], full.per_sample["top1"])
    assert not (tmp_path / "state").exists()


class _MixedSplit:
    """Images of several sizes (a folder of photos), HWC uint8, as ImageSplit.load gives them."""

    def __init__(self, n=40, seed=0):
        rng = np.random.default_rng(seed)
        sizes = [(40, 40), (37, 52), (64, 48), (40, 40), (23, 31)]
        self.images = [
            rng.integers(0, 256, (*sizes[i % len(sizes)], 3), np.uint8) for i in range(n)
        ]
        self.labels = np.arange(n) % 3

    def __len__(self):
        return len(self.images)

    def load(self, j):
        return self.images[j]


@pytest.mark.parametrize(
    "interp, crop, scale, policy",
    [
        ("bilinear", "torchvision", (0.8, 1.0), "none"),
        ("bicubic", "mae", (0.08, 1.0), "none"),
        ("bilinear", "torchvision", (0.08, 1.0), "rand-m9-mstd0.5-inc1"),
        ("bicubic", "torchvision", (1.0, 1.0), "none"),  # the centred-box fallback
    ],
)
def test_a_batch_fetch_is_the_one_by_one_images_byte_for_byte(
    interp, crop, scale, policy, monkeypatch
):
    """The DataLoader's batch fetch (``__getitems__``: draws per image, resizes of one size
    together) gives exactly what ``__getitem__`` gives image by image, training crops and
    evaluation images, on images of mixed sizes; a loader fetches through it."""
    split = _MixedSplit()
    order = [5, 0, 17, 3, 3, 39, 12, 8, 21, 30, 1, 2, 26, 14, 9, 33, 20]  # a shuffled batch
    for pre in (
        Preprocessing(resize=36, crop=32, interpolation=interp),
        Preprocessing(resize=None, crop=None, interpolation=interp),
    ):
        for augment in (True, False):
            ds = TrainImages(split, np.arange(40), pre, 7, augment, scale, True, crop, policy)
            for epoch in (0, 3):
                ds.epoch = epoch
                got = ds.__getitems__(order)
                want = [ds[i] for i in order]
                assert [y for _, y in got] == [y for _, y in want]
                for (a, _), (b, _) in zip(got, want, strict=True):
                    assert a.dtype == b.dtype and a.is_contiguous() and torch.equal(a, b)
    ds = TrainImages(split, np.arange(40), Preprocessing(resize=36, crop=32), 0, True)
    calls, one = [], TrainImages.__getitem__
    monkeypatch.setattr(TrainImages, "__getitem__", lambda self, i: calls.append(i) or one(self, i))
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    monkeypatch.undo()
    assert calls == [] and x.shape == (16, 3, 32, 32)
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(16)]))
