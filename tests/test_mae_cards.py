"""The cards linear@mae and finetune@mae against facebookresearch/mae (commit efb2a80): their
numbers against the scripts' defaults and FINETUNE.md's commands, their learning rate at every
step against util/lr_sched.adjust_learning_rate, their RandAugment against timm's
create_transform as util/datasets.build_transform calls it."""

import dataclasses
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssl_eval.data.transforms import Preprocessing
from ssl_eval.protocols import augmented, finetune
from ssl_eval.protocols._images import TrainImages, random_erase
from ssl_eval.protocols.cards import load_card


def adjust_learning_rate(epoch: float, args) -> float:
    """util/lr_sched.py, as written there (returns the lr instead of setting it)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs))
    )


def test_linear_mae_card_holds_the_scripts_numbers():
    p = load_card("linear@mae").params
    # main_linprobe.py defaults and FINETUNE.md's command (--batch_size 512 on 4 x 8 GPUs)
    assert (p.base_lrs, p.weight_decays, p.optimizer) == ((0.1,), (0.0,), "lars")
    assert (p.momentum, p.trust_coefficient) == (0.9, 0.001)  # util/lars.py defaults
    assert (p.epochs, p.warmup_epochs, p.min_lr) == (90, 10.0, 0.0)
    assert (p.batch_size, p.bn_rows, p.drop_last) == (512 * 4 * 8, 512, True)
    assert (p.batchnorm, p.bn_eps, p.bn_momentum, p.head_init_std) == (True, 1e-6, 0.1, 0.01)
    assert (p.crop, p.crop_scale, p.hflip) == ("mae", (0.08, 1.0), True)


@pytest.mark.parametrize("n", [1_281_167, 300])  # ImageNet-1k's train split; a tiny one
def test_linear_mae_lr_at_every_step_is_lr_sched(n):
    p = load_card("linear@mae").params
    eff = min(512 * 32, n)  # eff_batch_size; a tiny split is one batch (ssl-eval's choice)
    iters = n // eff  # len(data_loader_train) with drop_last=True
    args = SimpleNamespace(lr=0.1 * eff / 256, min_lr=0.0, warmup_epochs=10, epochs=90)
    batch, per_epoch, scale = augmented.plan(n, p)
    assert (batch, per_epoch) == (eff, iters)
    for epoch in range(p.epochs):
        for it in range(iters):  # engine_finetune: adjust at it / len(loader) + epoch
            want = adjust_learning_rate(it / iters + epoch, args)
            got = augmented.lr_at(epoch * iters + it, per_epoch, 0.1, scale, p)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (epoch, it)


# FINETUNE.md's commands: (card, per-GPU batch x GPUs, blr, layer_decay, epochs, drop_path,
# the model's depth: vit_base_patch16 12, vit_large_patch16 24, vit_huge_patch14 32 blocks)
FT = [
    ("finetune@mae", 32 * 4 * 8, 5e-4, 0.65, 100, 0.1, 12),
    ("finetune@mae-l", 32 * 4 * 8, 1e-3, 0.75, 50, 0.2, 24),
    ("finetune@mae-h", 16 * 8 * 8, 1e-3, 0.75, 50, 0.3, 32),
]


@pytest.mark.parametrize("card, batch, blr, decay, epochs, drop, depth", FT)
def test_finetune_mae_cards_hold_finetune_md_numbers(card, batch, blr, decay, epochs, drop, depth):
    p = load_card(card).params
    assert (p.batch_size, p.lr, p.layer_decay) == (batch, pytest.approx(blr * batch / 256), decay)
    assert (p.epochs, p.drop_path, p.vit_depth) == (epochs, drop, depth)
    # the commands' shared flags and main_finetune.py's defaults
    assert (p.weight_decay, p.warmup_epochs, p.min_lr, p.label_smoothing) == (0.05, 5.0, 1e-6, 0.1)
    assert (p.mixup_alpha, p.cutmix_alpha, p.random_erase) == (0.8, 1.0, 0.25)
    assert (p.rand_augment, p.crop_scale, p.hflip) == ("rand-m9-mstd0.5-inc1", (0.08, 1.0), True)


@pytest.mark.parametrize("card, batch, blr, decay, epochs, drop, depth", FT)
def test_finetune_mae_lr_at_every_step_is_lr_sched(card, batch, blr, decay, epochs, drop, depth):
    p = load_card(card).params
    n = batch * 40  # a split the batch divides: fractional epochs and samples seen agree
    iters = n // batch
    args = SimpleNamespace(lr=blr * batch / 256, min_lr=1e-6, warmup_epochs=5, epochs=epochs)
    total, warmup = p.epochs * n, int(p.warmup_epochs * n)  # as finetune._run_finetune counts
    for epoch in range(p.epochs):
        for it in range(iters):
            want = adjust_learning_rate(it / iters + epoch, args)
            got = finetune._lr_at(epoch * n + it * batch, total, warmup, p.lr, p.min_lr)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (epoch, it)


def test_a_size_card_refuses_a_vit_of_another_depth(tmp_path):
    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.core.errors import UserError
    from ssl_eval.protocols.base import ImageInputs

    bb = build_backbone("random:vit_micro_p4", BuildOptions(image_size=16))
    depth = len(bb.model.blocks)
    ds = SimpleNamespace(num_classes=3)  # _model reads only the class count
    inp = ImageInputs(bb, ds, np.arange(8), np.arange(8, 12), torch.device("cpu"), 0, tmp_path)
    p = load_card("finetune@mae-l").params
    with pytest.raises(UserError, match=f"ViT of 24 blocks, but .* has {depth} blocks"):
        finetune._model(inp, p)
    finetune._model(inp, dataclasses.replace(p, vit_depth=depth))  # its own depth: accepted


def test_rand_augment_is_timms_create_transform_policy():
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    pre = Preprocessing(resize=36, crop=32, interpolation="bicubic")
    ds = TrainImages(None, [], pre, 0, True, rand_augment="rand-m9-mstd0.5-inc1")
    from ssl_eval.protocols._images import rand_augment

    ours = rand_augment(ds.rand_augment, pre)
    # util/datasets.build_transform: create_transform(..., auto_augment=args.aa, 'bicubic')
    ref = create_transform(
        32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic"
    )
    theirs = next(t for t in ref.transforms if isinstance(t, RandAugment))
    assert ours.num_layers == theirs.num_layers == 2
    assert [o.name for o in ours.ops] == [o.name for o in theirs.ops]
    for a, b in zip(ours.ops, theirs.ops, strict=True):
        assert (a.magnitude, a.magnitude_std, a.prob) == (b.magnitude, b.magnitude_std, b.prob)
        assert a.hparams == b.hparams and a.kwargs == b.kwargs


def test_rand_augment_draws_per_image_and_leaves_global_generators_alone():
    from ssl_eval.data.datasets import ImageSplit

    rng = np.random.default_rng(0)
    split = ImageSplit(np.zeros(2, np.int64), rng.integers(0, 255, (2, 40, 40, 3), np.uint8))
    pre = Preprocessing(resize=36, crop=32)
    ds = TrainImages(split, [0, 1], pre, 0, True, rand_augment="rand-m9-mstd0.5-inc1")
    plain = TrainImages(split, [0, 1], pre, 0, True)
    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    a = [ds[i][0] for i in (0, 1)]
    assert (random.random(), np.random.rand()) == before  # state restored after each image
    assert all(torch.equal(x, y) for x, y in zip(a, [ds[i][0] for i in (0, 1)], strict=True))
    assert not all(torch.equal(x, plain[i][0]) for i, x in enumerate(a))  # it did augment


def test_random_erase_one_box_of_timms_size_range():
    x = torch.zeros(64, 3, 40, 40)
    random_erase(x, 1.0, np.random.default_rng(0))
    for img in x:
        ys, xs = np.nonzero(img.abs().sum(0).numpy())
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert len(ys) == h * w  # one filled rectangle
        assert 0.02 * 1600 * 0.8 <= h * w <= 1600 / 3 * 1.2
        assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3
    y = torch.zeros(8, 3, 40, 40)
    assert not random_erase(y, 0.0, np.random.default_rng(0)).any()


@pytest.mark.slow
def test_finetune_mae_trains_through_rand_augment_and_random_erasing(tmp_path, monkeypatch):
    import dataclasses

    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.data.datasets import DatasetOptions, ImageSplit, get_dataset
    from ssl_eval.protocols import _images
    from ssl_eval.protocols.base import ImageInputs

    bb = build_backbone("random:resnet10t", BuildOptions(image_size=16))
    ds = get_dataset("digits", DatasetOptions())
    cut = lambda s, n: ImageSplit(s.labels[:n], s.images[:n])  # noqa: E731
    ds = dataclasses.replace(ds, train=cut(ds.train, 80), test=cut(ds.test, 40))
    inp = ImageInputs(bb, ds, np.arange(64), np.arange(64, 80), torch.device("cpu"), 0, tmp_path)
    p = dataclasses.replace(
        load_card("finetune@mae").params,
        epochs=1,
        batch_size=32,
        layer_decay=0.0,
        vit_depth=0,
        pool="feature_kind",  # a ResNet has no patch tokens to average
    )
    calls = {"ra": 0, "erase": []}
    ra, erase = _images._seeded_call, finetune.random_erase

    def count_ra(*a):
        calls["ra"] += 1
        return ra(*a)

    def spy_erase(x, prob, rng):
        calls["erase"].append((len(x), prob))
        return erase(x, prob, rng)

    monkeypatch.setattr(_images, "_seeded_call", count_ra)
    monkeypatch.setattr(finetune, "random_erase", spy_erase)
    out = finetune.run_finetune(inp, p)
    assert calls["ra"] == 64  # every training image, once in the one epoch
    assert calls["erase"] == [(32, 0.25), (32, 0.25)]  # every batch, at the card's probability
    assert len(out.per_sample["top1"]) == 40 and out.details["epochs_run"] == 1


def test_posterize_keeps_the_top_bits_down_to_zero_as_old_pillow():
    from PIL import Image

    from ssl_eval.protocols._images import _posterize

    arr = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    for bits in range(9):  # Pillow < 10: a lookup table i & ~(2 ** (8 - bits) - 1)
        want = arr & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF)
        got = np.asarray(_posterize(Image.fromarray(arr), bits))
        np.testing.assert_array_equal(got, want, err_msg=f"bits={bits}")
