"""The linear_aug params that let the paper-recipe cards follow their scripts exactly, each
checked against the script's own rule written out here (not ssl-eval's functions):

* ``lr_update: epoch``: facebookresearch/moco-v3@c349e6e main_lincls.py's
  adjust_learning_rate (called once before each epoch: init_lr x 0.5 x (1 + cos(pi x epoch /
  epochs))) and facebookresearch/dino@7c446df eval_linear.py's CosineAnnealingLR(optimizer,
  epochs, eta_min=0) stepped after each epoch;
* ``nesterov``: google-research/simclr@383d414 model_util.get_optimizer,
  tf.train.MomentumOptimizer(lr, momentum, use_nesterov=True), whose kernel (ApplyMomentum)
  is accum <- m accum + g; var <- var - lr g - lr m accum, on the loss with
  add_weight_decay's wd x tf.nn.l2_loss(v) for every trainable variable outside BatchNorm;
* ``crop_interpolation`` / ``eval_interpolation``: torchvision's RandomResizedCrop(224)
  (bilinear by default) in both scripts, and their validation Resize(256) (main_lincls.py:
  the default, bilinear; eval_linear.py: interpolation=3, PIL's bicubic) + CenterCrop(224).
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from test_augmented import _inputs  # 96 train, 60 val, 100 test digits, a 16-px ResNet
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import ImageSplit
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.protocols import augmented
from ssl_eval.protocols.augmented import AugmentedParams, Heads, run_augmented
from ssl_eval.protocols.cards import load_card

MOCOV3_CARDS = ["linear@mocov3", "linear@mocov3-r50"]
DINO_CARDS = ["linear@dino", "linear@dino-vitb", "linear@dino-r50", "linear@dino-xcit"]


def _lrs_of_a_run(tmp_path, p: AugmentedParams) -> list[torch.Tensor]:
    """The lr handed to the optimiser at every step of a run of ``p`` (one per head)."""
    lrs, upd = [], augmented.OPTIMISERS["sgd"]

    def spy(param, grad, mu, lr, *a, **k):
        if param.ndim == 3:  # the weights' update (the bias gets the same lr)
            lrs.append(lr.clone())
        upd(param, grad, mu, lr, *a, **k)

    augmented.OPTIMISERS["sgd"] = spy
    try:
        run_augmented(_inputs(tmp_path), p)
    finally:
        augmented.OPTIMISERS["sgd"] = upd
    return lrs


# ------------------------------------------------------------- the lr set once per epoch


def main_lincls_adjust_learning_rate(init_lr: float, epoch: int, epochs: int) -> float:
    """moco-v3 main_lincls.adjust_learning_rate, as written there (no warmup)."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def eval_linear_lrs(init_lr: float, epochs: int) -> list[float]:
    """The lr of each epoch of dino eval_linear.py: SGD built at init_lr, CosineAnnealingLR(
    optimizer, epochs, eta_min=0), scheduler.step() after each epoch's training."""
    head = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(head.parameters(), init_lr, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=0)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


EPOCHWISE = AugmentedParams(
    base_lrs=(0.3, 3.0),
    weight_decays=(0.0,),
    optimizer="sgd",
    epochs=4,
    warmup_epochs=0.0,
    batch_size=40,
    drop_last=False,  # 96 rows: steps of 40, 40, 16, as both scripts' loaders keep them
    batchnorm=False,
    crop="torchvision",
    forward_batch=16,
    lr_update="epoch",
)


@pytest.fixture(scope="module")
def epochwise_lrs(tmp_path_factory):
    return _lrs_of_a_run(tmp_path_factory.mktemp("epochwise"), EPOCHWISE)


def test_lr_of_every_step_is_main_lincls_and_eval_linear_with_lr_update_epoch(epochwise_lrs):
    p, per_epoch = EPOCHWISE, 3
    assert len(epochwise_lrs) == p.epochs * per_epoch
    for h, (base, _) in enumerate(p.settings()):
        init_lr = base * 40 / 256  # both scripts: lr x batch / 256
        dino = eval_linear_lrs(init_lr, p.epochs)
        for step, lr in enumerate(epochwise_lrs):
            epoch = step // per_epoch
            moco = main_lincls_adjust_learning_rate(init_lr, epoch, p.epochs)
            assert float(lr[h]) == pytest.approx(moco, rel=1e-6), (step, h)
            assert float(lr[h]) == pytest.approx(dino[epoch], rel=1e-6), (step, h)


def test_the_per_step_update_is_not_the_scripts():
    """The reference tells the two apart: at lr_update step the second step of an epoch is
    lower than the scripts' (at the fractional epoch)."""
    per_epoch, init_lr = 3, 3.0 * 40 / 256
    step_wise = dataclasses.replace(EPOCHWISE, lr_update="step")
    ours = augmented.lr_at(1, per_epoch, 3.0, 40 / 256, step_wise)
    assert ours < main_lincls_adjust_learning_rate(init_lr, 0, 4) * (1 - 1e-3)


@pytest.mark.parametrize("card", MOCOV3_CARDS + DINO_CARDS)
def test_cards_set_the_lr_once_per_epoch_at_imagenet_size(card):
    p = load_card(card).params
    assert p.lr_update == "epoch"
    init_lr = p.base_lrs[0] * 1024 / 256
    batch, per_epoch, scale = augmented.plan(1_281_167, p)
    dino = eval_linear_lrs(init_lr, p.epochs) if card in DINO_CARDS else None
    for epoch in range(p.epochs):
        want = main_lincls_adjust_learning_rate(init_lr, epoch, p.epochs)
        if dino is not None:
            assert want == pytest.approx(dino[epoch], rel=1e-9, abs=1e-15)
        for it in (0, 1, per_epoch // 2, per_epoch - 1):
            got = augmented.lr_at(epoch * per_epoch + it, per_epoch, p.base_lrs[0], scale, p)
            assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (epoch, it)


def test_lr_update_epoch_refuses_warmup_and_iterations():
    with pytest.raises(UserError, match="lr_update=epoch"):
        AugmentedParams(lr_update="epoch", warmup_epochs=1.0)
    with pytest.raises(UserError, match="lr_update=epoch"):
        AugmentedParams(lr_update="epoch", warmup_epochs=0.0, iterations=10)
    with pytest.raises(UserError, match="lr_update is one of"):
        AugmentedParams(lr_update="iteration")


# ------------------------------------------------------------- SimCLR's Nesterov momentum


def tf1_nesterov_momentum(W, b, x, y, lrs, wd: float, m: float):
    """SimCLR's head training, written out from TF1: the loss is the batch-mean softmax
    cross-entropy plus wd x tf.nn.l2_loss(v) = wd x sum(v^2) / 2 for the weights and the bias
    (model_util.add_weight_decay), g its gradient; MomentumOptimizer(use_nesterov=True):
    accum <- accum m + g; var <- var - g lr - accum m lr (accumulators start at 0)."""
    W, b = W.clone().double(), b.clone().double()
    aW, ab = torch.zeros_like(W), torch.zeros_like(b)
    for lr, xs, ys in zip(lrs, x, y, strict=True):
        vW, vb = W.clone().requires_grad_(), b.clone().requires_grad_()
        ce = torch.nn.functional.cross_entropy(xs.double() @ vW.T + vb, ys)
        loss = ce + wd * ((vW**2).sum() / 2 + (vb**2).sum() / 2)
        gW, gb = torch.autograd.grad(loss, (vW, vb))
        aW, ab = aW * m + gW, ab * m + gb
        W, b = W - gW * lr - aW * m * lr, b - gb * lr - ab * m * lr
    return W, b


def _nesterov_problem():
    g = torch.Generator().manual_seed(0)
    steps, B, D, C = 6, 32, 8, 5
    x = torch.randn(steps, B, D, generator=g)
    y = torch.randint(0, C, (steps, B), generator=g)
    W0 = torch.randn(C, D, generator=g) * 0.1
    lrs = [1.6 * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(steps)]  # a cosine
    return x, y, W0, lrs


def _heads_after(p, x, y, W0, lrs, wd):
    heads = Heads(1, W0.shape[1], W0.shape[0], p, "cpu")
    heads.W = W0[None].clone()
    for lr, xs, ys in zip(lrs, x, y, strict=True):
        heads.step(xs, ys, torch.tensor([lr]), torch.tensor([wd]))
    return heads.W[0].double(), heads.b[0].double()


def test_nesterov_heads_follow_tf1_momentum_optimizer_with_simclrs_weight_decay():
    x, y, W0, lrs = _nesterov_problem()
    wd, m = 1e-2, 0.9  # a weight decay large enough to show (SimCLR's is 1e-6)
    b0 = torch.zeros(W0.shape[0])
    tW, tb = tf1_nesterov_momentum(W0, b0, x, y, lrs, wd, m)
    p = load_card("linear@simclr").params
    assert (p.optimizer, p.nesterov, p.momentum, p.batchnorm) == ("sgd", True, m, False)
    p = dataclasses.replace(p, weight_decays=(wd,))
    W, b = _heads_after(p, x, y, W0, lrs, wd)
    torch.testing.assert_close(W, tW, rtol=0, atol=2e-6)
    torch.testing.assert_close(b, tb, rtol=0, atol=2e-6)
    # the reference tells heavy-ball momentum apart, by far more than the tolerance
    hW, _ = _heads_after(dataclasses.replace(p, nesterov=False), x, y, W0, lrs, wd)
    assert (hW - tW).abs().max() > 1e-2
    # and torch's own SGD(nesterov=True) is the same update
    w, bias = W0.clone().requires_grad_(), torch.zeros(W0.shape[0], requires_grad=True)
    opt = torch.optim.SGD([w, bias], lr=lrs[0], momentum=m, weight_decay=wd, nesterov=True)
    for lr, xs, ys in zip(lrs, x, y, strict=True):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        torch.nn.functional.cross_entropy(xs @ w.T + bias, ys).backward()
        opt.step()
    torch.testing.assert_close(w.detach().double(), tW, rtol=0, atol=2e-6)


def test_nesterov_is_for_sgd_only():
    with pytest.raises(UserError, match="nesterov"):
        AugmentedParams(optimizer="lars", nesterov=True)


# ------------------------------------------------------------- the scripts' interpolations


def _split(n=4, size=(40, 52)):
    rng = np.random.default_rng(0)
    return ImageSplit(np.arange(n) % 2, rng.integers(0, 255, (n, *size, 3), np.uint8))


@pytest.mark.parametrize("card", MOCOV3_CARDS + DINO_CARDS)
def test_cards_resize_as_their_scripts(card):
    p = load_card(card).params
    # RandomResizedCrop(224): torchvision's default interpolation, bilinear, in both scripts
    assert p.crop_interpolation == "bilinear"
    # validation: main_lincls.py Resize(256) (bilinear); eval_linear.py Resize(256,
    # interpolation=3) (PIL's BICUBIC)
    assert p.eval_interpolation == ("bicubic" if card in DINO_CARDS else "bilinear")


@pytest.mark.slow
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_crop_and_eval_interpolation_reach_the_pixels(tmp_path, interp, monkeypatch):
    """The images the probe trains and evaluates on: the training crop resized with
    crop_interpolation, the evaluation images with eval_interpolation, whatever the
    backbone's own (here the other one); the box and flip draws unchanged."""
    other = {"bilinear": "bicubic", "bicubic": "bilinear"}[interp]
    pre = Preprocessing(resize=36, crop=32, interpolation=other)
    made = []
    real = augmented.TrainImages

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(augmented, "TrainImages", spy)
    inp = _inputs(tmp_path)
    bb = dataclasses.replace(inp.backbone, preprocessing=pre)
    p = dataclasses.replace(
        EPOCHWISE, epochs=1, crop_interpolation=interp, eval_interpolation=interp
    )
    run_augmented(dataclasses.replace(inp, backbone=bb), p)
    train = [d for d in made if d.augment]
    evals = [d for d in made if not d.augment]
    assert len(train) == 1 and len(evals) == 2  # validation and test
    mode = InterpolationMode(interp)
    split = _split()
    for ds in train:
        ds = real(split, np.arange(4), ds.pre, 0, True, (0.08, 1.0), False, "torchvision")
        for i in range(4):
            full = torch.from_numpy(split.images[i]).permute(2, 0, 1)
            _, (top, left, h, w), _ = ds._draws(i, full.shape[-2:])
            want = TF.resized_crop(full, top, left, h, w, [32, 32], mode, antialias=True)
            assert torch.equal(ds[i][0], want)
            unwanted = TF.resized_crop(
                full, top, left, h, w, [32, 32], InterpolationMode(other), antialias=True
            )
            assert not torch.equal(ds[i][0], unwanted)
    for ds in evals:
        ds = real(split, np.arange(4), ds.pre, 0, False)
        for i in range(4):
            full = torch.from_numpy(split.images[i]).permute(2, 0, 1)
            want = TF.center_crop(TF.resize(full, [36], mode, antialias=True), [32, 32])
            assert torch.equal(ds[i][0], want)


def test_backbone_interpolation_is_the_default_and_unknown_ones_are_refused():
    p = AugmentedParams()
    assert (p.crop_interpolation, p.eval_interpolation) == ("backbone", "backbone")
    pre = Preprocessing(resize=36, crop=32, interpolation="bicubic")
    assert augmented.resampled(pre, "backbone") is pre
    assert augmented.resampled(pre, "bilinear").interpolation == "bilinear"
    with pytest.raises(UserError, match="crop_interpolation is one of"):
        AugmentedParams(crop_interpolation="lanczos")
    with pytest.raises(UserError, match="eval_interpolation is one of"):
        AugmentedParams(eval_interpolation="area")


def test_tensor_resize_is_pils_within_a_grey_level_or_two():
    """The cards' statement: ssl-eval resizes uint8 tensors with torchvision's antialiased
    resize, the scripts (torchvision transforms on PIL images) through PIL; with the same
    interpolation the values differ by at most 1 (bilinear) or 2 (bicubic) grey levels, on
    under 1% of the pixels (a 300 x 400 noise image, a smooth one, down to 224 x 224)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:300, 0:400]
    smooth = np.stack([127 + 100 * np.sin(xx / 13 + c) * np.cos(yy / 17) for c in range(3)], -1)
    for img in (rng.integers(0, 255, (300, 400, 3), np.uint8), smooth.astype(np.uint8)):
        for interp, pil, most in (("bilinear", Image.BILINEAR, 1), ("bicubic", Image.BICUBIC, 2)):
            theirs = np.asarray(Image.fromarray(img).resize((224, 224), pil)).astype(int)
            t = torch.from_numpy(img).permute(2, 0, 1)
            ours = TF.resize(t, [224, 224], InterpolationMode(interp), antialias=True)
            d = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - theirs)
            assert d.max() <= most and (d > 0).mean() < 0.01, (interp, d.max(), (d > 0).mean())


# ------------------------------------------------------------- SimCLR's input stream


def simclr_stream(perms: list[list[int]], batch: int, epochs: int) -> list[list[tuple]]:
    """SimCLR's training batches, from data.py and model_util.get_train_steps: the passes
    (each shuffled, then dataset.repeat(-1)) one after another, batch(drop_remainder=True),
    n x epochs // batch + 1 of them; each row as (pass, index)."""
    n = len(perms[0])
    stream = [(q, i) for q, perm in enumerate(perms) for i in perm]
    steps = n * epochs // batch + 1
    return [stream[k * batch : (k + 1) * batch] for k in range(steps)]


def simclr_lr(step: int, total: int, peak: float) -> float:
    """tf.train.cosine_decay(peak, step, total) (alpha 0), no warmup."""
    return peak * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


STREAM = dataclasses.replace(
    EPOCHWISE, epochs=3, drop_last=True, lr_update="step", stream=True, forward_batch=40
)


def _stream_run(tmp_path, p=STREAM):
    """A run of ``p``: the rows (pass, index) of every step, its lrs, and the output."""
    rows, lrs, upd = [], [], augmented.OPTIMISERS["sgd"]
    fetch = augmented.PassImages.__getitems__

    def spy(param, grad, mu, lr, *a, **k):
        if param.ndim == 3:
            lrs.append(lr.clone())
        upd(param, grad, mu, lr, *a, **k)

    def seen(self, ks):
        rows.append([divmod(k, self.n) for k in ks])  # forward_batch = batch: one per step
        return fetch(self, ks)

    augmented.OPTIMISERS["sgd"], augmented.PassImages.__getitems__ = spy, seen
    try:
        out = run_augmented(_inputs(tmp_path), p)
    finally:
        augmented.OPTIMISERS["sgd"], augmented.PassImages.__getitems__ = upd, fetch
    return rows, lrs, out


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    return _stream_run(tmp_path_factory.mktemp("stream"))


SLOW_FIXTURES = ("epochwise_lrs", "stream_run")


def test_stream_is_simclrs_batches_and_cosine(stream_run):
    rows, lrs, out = stream_run
    n, batch, epochs = 96, 40, 3
    # each pass a new permutation (the epoch mode's own for that epoch), 4 passes begun
    perms = [augmented.pass_order(0, q, n) for q in range(4)]
    theirs = simclr_stream(perms, batch, epochs)
    assert len(theirs) == 96 * 3 // 40 + 1 == 8
    assert rows == [list(b) for b in theirs]  # batch 7 holds rows of passes 2 and 3
    assert {q for q, _ in rows[-1]} == {2, 3}
    assert len(lrs) == 8 and out.details["steps"] == 8
    for step, lr in enumerate(lrs):
        for h, (base, _) in enumerate(STREAM.settings()):
            want = simclr_lr(step, 8, base * 40 / 256)
            assert float(lr[h]) == pytest.approx(want, rel=1e-6), (step, h)
    # scored after the batch ending each pass: steps 2, 4 (80 and 160 of 96 and 192 rows
    # done), then the last two (one of them reaching into pass 3)
    assert len(out.details["history"]) == 3


def test_a_streams_rows_get_their_passs_crops():
    split = ImageSplit(
        np.arange(5) % 2, np.random.default_rng(0).integers(0, 255, (5, 30, 30, 3), np.uint8)
    )
    pre = Preprocessing(resize=24, crop=24)
    images = augmented.TrainImages(
        split, np.arange(5), pre, 3, True, (0.08, 1.0), True, "torchvision"
    )
    ref = augmented.TrainImages(split, np.arange(5), pre, 3, True, (0.08, 1.0), True, "torchvision")
    got = augmented.PassImages(images, 5).__getitems__([0 * 5 + 1, 2 * 5 + 1, 1 * 5 + 4])
    for (q, i), (img, label) in zip([(0, 1), (2, 1), (1, 4)], got, strict=True):
        ref.epoch = q
        want, lab = ref[i]
        assert torch.equal(img, want) and label == lab
    assert not torch.equal(got[0][0], got[1][0])  # the same image, another pass: a new crop


def test_interrupted_and_resumed_stream_equals_uninterrupted(tmp_path, stream_run):
    _, lrs, full = stream_run

    def stop(epoch, heads):
        if epoch == 1:
            raise KeyboardInterrupt

    hook = augmented._after_epoch
    augmented._after_epoch = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run_augmented(_inputs(tmp_path), STREAM)
        augmented._after_epoch = hook
        rows, resumed_lrs, resumed = _stream_run(tmp_path)
    finally:
        augmented._after_epoch = hook
    assert len(rows) == 4 and all(
        torch.equal(a, b) for a, b in zip(resumed_lrs, lrs[4:], strict=True)
    )
    assert resumed.metrics == full.metrics
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.details["history"]) == strip(full.details["history"])
    np.testing.assert_array_equal(resumed.per_sample["top1"], full.per_sample["top1"])


def test_stream_refuses_what_simclr_does_not_run():
    for bad in (
        {"warmup_epochs": 1.0},
        {"lr_update": "epoch"},
        {"drop_last": False},
    ):
        with pytest.raises(UserError, match="stream=true"):
            AugmentedParams(**{"stream": True, "warmup_epochs": 0.0, **bad})
