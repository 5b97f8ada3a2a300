"""The linear-evaluation cards of SimCLR, MoCo v3 and DINO against their official scripts:
google-research/simclr@383d414 (run.py, model_util.py, README.md's ImageNet linear-eval
command), facebookresearch/moco-v3@c349e6e (main_lincls.py, CONFIG.md) and
facebookresearch/dino@7c446df (eval_linear.py, README.md). Each card's numbers against the
script's defaults and commands, and its learning rate at every step against the script's
schedule written out here from the script (not from ssl-eval): MoCo v3's and DINO's set once
per epoch (lr_update epoch), SimCLR's over its stream's n x epochs // batch + 1 steps
(stream)."""

import math

import pytest
import torch

from ssl_eval.protocols import augmented
from ssl_eval.protocols.cards import load_card

IMAGENET_TRAIN = 1_281_167


def _per_rank_loader_len(n: int, gpus: int, per_gpu: int) -> int:
    """len(train_loader) under DistributedSampler (drop_last False: every rank gets
    ceil(n / gpus) indices, padded) and a DataLoader without drop_last."""
    return math.ceil(math.ceil(n / gpus) / per_gpu)


# ---------------------------------------------------------------- MoCo v3, main_lincls.py


def mocov3_adjust_learning_rate(init_lr: float, epoch: int, epochs: int) -> float:
    """main_lincls.adjust_learning_rate, as written there (returns the lr it sets)."""
    return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


# (card, --lr of its CONFIG.md command; ResNet-50's command passes none: the default 0.1)
MOCOV3 = [("linear@mocov3", 3.0), ("linear@mocov3-r50", 0.1)]


@pytest.mark.parametrize("card, lr", MOCOV3)
def test_mocov3_cards_hold_main_lincls_numbers(card, lr):
    p = load_card(card).params
    # -b 1024 (total over the node's 8 GPUs), --epochs 90, --momentum 0.9, --wd 0
    assert (p.base_lrs, p.weight_decays, len(p.settings())) == ((lr,), (0.0,), 1)
    assert (p.optimizer, p.momentum, p.batch_size, p.lr_batch_scaling) == ("sgd", 0.9, 1024, True)
    assert (p.epochs, p.warmup_epochs, p.min_lr) == (90, 0.0, 0.0)  # no warmup, cosine to 0
    # nn.Linear on the features, weight normal_(0, 0.01), bias zero_(); no BatchNorm before it
    assert (p.batchnorm, p.head_init_std) == (False, 0.01)
    # RandomResizedCrop(224) (torchvision, scale 0.08-1) + RandomHorizontalFlip; no drop_last
    assert (p.crop, p.crop_scale, p.hflip, p.drop_last) == ("torchvision", (0.08, 1.0), True, False)


@pytest.mark.slow
@pytest.mark.parametrize("card, lr", MOCOV3)
def test_mocov3_lr_is_main_lincls_at_every_step(card, lr):
    p = load_card(card).params
    init_lr = lr * 1024 / 256  # "infer learning rate before changing batch size"
    batch, per_epoch, scale = augmented.plan(IMAGENET_TRAIN, p)
    # 8 GPUs x 128 images: the same steps per epoch as one process with 1024
    assert (batch, per_epoch) == (1024, _per_rank_loader_len(IMAGENET_TRAIN, 8, 128))
    assert lr * scale == pytest.approx(init_lr, rel=1e-15)
    for epoch in range(p.epochs):
        theirs = mocov3_adjust_learning_rate(init_lr, epoch, p.epochs)  # set once, before it
        for it in range(per_epoch):
            ours = augmented.lr_at(epoch * per_epoch + it, per_epoch, lr, scale, p)
            assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15), (epoch, it)


# ---------------------------------------------------------------- SimCLR, run.py


def simclr_learning_rate(step: int, n: int, batch: int, base: float, epochs: int, warmup: float):
    """model_util.learning_rate_schedule with learning_rate_scaling 'linear', written out:
    warmup_steps = int(round(warmup * n // batch)); total = n * epochs // batch + 1
    (get_train_steps); tf.train.cosine_decay(scaled, step - warmup, total - warmup), alpha 0."""
    warmup_steps = int(round(warmup * n // batch))
    scaled = base * batch / 256.0
    total = n * epochs // batch + 1
    if step < warmup_steps:
        return step / warmup_steps * scaled
    done = min(step - warmup_steps, total - warmup_steps)
    return scaled * 0.5 * (1.0 + math.cos(math.pi * done / (total - warmup_steps)))


def test_simclr_card_holds_the_readme_linear_eval_command():
    p = load_card("linear@simclr").params
    # --optimizer=momentum (momentum flag 0.9) --learning_rate=0.1 (scaling 'linear' by
    # default) --weight_decay=1e-6 --train_epochs=90 --train_batch_size=4096 --warmup_epochs=0
    assert (p.optimizer, p.momentum, p.base_lrs, p.lr_batch_scaling) == ("sgd", 0.9, (0.1,), True)
    assert (p.weight_decays, p.epochs, p.batch_size, p.warmup_epochs) == ((1e-6,), 90, 4096, 0.0)
    assert (p.min_lr, len(p.settings())) == (0.0, 1)
    # supervised_head: linear_layer(use_bn=False); the backbone's BN in inference mode
    assert p.batchnorm is False
    # --zero_init_logits_layer: the head's weights start at zero (std 0: no draw), bias 0
    assert p.head_init_std == 0.0
    heads = augmented.Heads(1, 4, 3, p, "cpu")
    assert not heads.W.any() and not heads.b.any()
    # data.py: batch(drop_remainder=is_training); crop_and_resize: area 0.08-1; flip
    assert (p.drop_last, p.crop_scale, p.hflip) == (True, (0.08, 1.0), True)


@pytest.mark.parametrize("n", [IMAGENET_TRAIN, 40_000])
def test_simclr_lr_is_model_util_schedule_over_the_cards_steps(n):
    from ssl_eval.protocols._aug_grid import schedule

    p = load_card("linear@simclr").params
    batch, per_epoch, scale = augmented.plan(n, p)
    assert (batch, p.stream) == (4096, True)  # every step a full 4096, across the passes
    passes, total = schedule(per_epoch, p, n, batch)
    assert (passes, total) == (90, n * 90 // 4096 + 1)  # get_train_steps
    if n == IMAGENET_TRAIN:
        assert total == 28151
    for step in list(range(0, total, 7)) + [total - 1]:
        ours = augmented.lr_at(step, per_epoch, 0.1, scale, p, total)
        theirs = simclr_learning_rate(step, n, 4096, 0.1, 90, 0.0)
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15), step


def test_simclr_weight_decay_is_the_l2_loss_on_weights_and_bias():
    """model_util.add_weight_decay adds weight_decay * tf.nn.l2_loss(v) (sum v^2 / 2) for every
    trainable variable outside BatchNorm, the head's bias included: its gradient is wd * v on
    both, as the card's SGD gives (no momentum history: one step from zero buffers)."""
    from ssl_eval.protocols._lars import OPTIMISERS

    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(1, 5, 7, generator=g), torch.randn(1, 5, generator=g)
    gW, gb = torch.randn(1, 5, 7, generator=g), torch.randn(1, 5, generator=g)
    wd, lr = 1e-6, 1.6
    step = OPTIMISERS[load_card("linear@simclr").params.optimizer]
    for p, grad in ((W, gW), (b, gb)):
        v = p.clone().requires_grad_()
        (wd * (v**2).sum() / 2).backward()  # tf.nn.l2_loss
        want = p - lr * (grad + v.grad)
        got, mu = p.clone(), torch.zeros_like(p)
        step(got, grad, mu, lr, wd, 0.9, heads=True)
        assert torch.allclose(got, want, rtol=0, atol=1e-7)


# ---------------------------------------------------------------- DINO, eval_linear.py


DINO_CARDS = ["linear@dino", "linear@dino-vitb", "linear@dino-r50", "linear@dino-xcit"]


@pytest.mark.parametrize("card", DINO_CARDS)
def test_dino_card_holds_eval_linear_defaults(card):
    p = load_card(card).params
    # --lr 0.001 per 256, --batch_size_per_gpu 128 on the README's 8 GPUs, --epochs 100,
    # SGD(momentum=0.9, weight_decay=0), CosineAnnealingLR(epochs, eta_min=0), no warmup
    assert (p.base_lrs, p.batch_size, p.lr_batch_scaling, p.epochs) == ((0.001,), 1024, True, 100)
    assert (p.optimizer, p.momentum, p.weight_decays, len(p.settings())) == ("sgd", 0.9, (0.0,), 1)
    assert (p.warmup_epochs, p.min_lr) == (0.0, 0.0)
    # LinearClassifier: weight normal_(0, 0.01), bias zero_(); no BatchNorm
    assert (p.batchnorm, p.head_init, p.head_init_std) == (False, "normal", 0.01)
    assert (p.crop, p.crop_scale, p.hflip, p.drop_last) == ("torchvision", (0.08, 1.0), True, False)
    # the epoch chosen on validation each epoch (the script's best_acc over epochs, on val)
    assert (p.iterations, p.select) == (0, "epoch")
    # the head's input: the README's command for the card's networks (test_published.py)
    want = {
        "linear@dino": ((4,), (False,), "concat"),  # ViT-S: the defaults
        "linear@dino-vitb": ((1,), (True,), "interleave"),  # ViT-B: 1 block + avgpool
        "linear@dino-r50": ((), (), "concat"),  # ResNet-50: model(inp), the average pool
        "linear@dino-xcit": ((), (), "concat"),  # XCiT: model(inp), the normed class token
    }[card]
    assert (p.n_last_blocks, p.avgpool, p.avgpool_layout) == want


@pytest.mark.parametrize("card", DINO_CARDS)
def test_dino_lr_is_cosine_annealing_stepped_per_epoch(card):
    p = load_card(card).params
    init_lr = 0.001 * (128 * 8) / 256.0  # "linear scaling rule"
    head = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(head.parameters(), init_lr, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 100, eta_min=0)
    batch, per_epoch, scale = augmented.plan(IMAGENET_TRAIN, p)
    assert (batch, per_epoch) == (1024, _per_rank_loader_len(IMAGENET_TRAIN, 8, 128))
    theirs = []
    for _ in range(p.epochs + 1):  # the lr each epoch trains at, and after the last
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for epoch in range(p.epochs):
        for it in list(range(0, per_epoch, 5)) + [per_epoch - 1]:
            ours = augmented.lr_at(epoch * per_epoch + it, per_epoch, 0.001, scale, p)
            assert ours == pytest.approx(theirs[epoch], rel=1e-9, abs=1e-15), (epoch, it)
