"""The augmented probe's multi-layer grid (linear_aug@dinov2, linear_aug@dinov3): each head's
input against ``create_linear_input`` of the official scripts written out here over tokens
read with forward hooks, the grid and the learning rate of a step against the scripts'
arithmetic run by torch itself, the one-line refusals, the selection of the final heads on
validation, and a tiny run from the command line."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.cli import main
from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetOptions, ImageSplit, get_dataset
from ssl_eval.features.accel import Accel
from ssl_eval.protocols import augmented
from ssl_eval.protocols._aug_grid import LayerInput, grid_settings, schedule
from ssl_eval.protocols._images import TrainImages
from ssl_eval.protocols.augmented import AugmentedParams, frozen_forward, run_augmented
from ssl_eval.protocols.base import ImageInputs
from ssl_eval.protocols.cards import load_card
from ssl_eval.records.store import load_records

LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]


def _vit():
    """A random timm ViT (6 blocks, width 64, 16-px patches) at 32 px: 4 patch tokens."""
    return build_backbone("random:test_vit", BuildOptions(image_size=32))


def _official_tokens(model, x: torch.Tensor, n: int) -> list:
    """What the scripts' ModelWithIntermediateLayers gives (get_intermediate_layers(n,
    return_class_token=True)): per last block, oldest first, (patch tokens, class token) after
    the final norm; read here with forward hooks on the blocks, not through ssl-eval."""
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    k = model.num_prefix_tokens
    normed = [model.norm(o) for o in outs[-n:]]
    return [(t[:, k:], t[:, 0]) for t in normed]


def _create_linear_input(tokens: list, n: int, avgpool: bool) -> torch.Tensor:
    """The scripts' create_linear_input: the class tokens of the last ``n`` blocks, then with
    avgpool the mean of the last block's patch tokens."""
    last = tokens[-n:]
    out = torch.cat([cls for _, cls in last], dim=-1)
    if avgpool:
        out = torch.cat([out, last[-1][0].mean(dim=1)], dim=-1)
    return out.float()


@pytest.mark.slow
def test_each_heads_input_is_the_scripts_create_linear_input():
    bb = _vit()
    p = load_card("linear_aug@dinov2").params
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    source = LayerInput(p)
    with frozen_forward(source.reader(bb), torch.device("cpu"), Accel()) as read:
        row = source.select(read(images))
    settings = grid_settings(p)
    groups = source.groups(len(settings))
    tokens = _official_tokens(bb.model, bb.preprocessing.normalise(images), 4)
    assert len(groups) == 4 and row.shape[1] == 5 * 64  # 4 class tokens + 1 patch mean kept
    for g in groups:
        n, avgpool = settings[g.heads.start][:2]
        assert {s[:2] for s in settings[g.heads]} == {(n, avgpool)}
        want = _create_linear_input(tokens, n, avgpool)
        torch.testing.assert_close(row[:, g.columns], want, rtol=1e-5, atol=1e-5)


def _scale_lr(lr: float, batch_per_gpu: int = 128, gpus: int = 8) -> float:
    """The scripts' scale_lr at run/submit.py's default 8 GPUs."""
    return lr * (batch_per_gpu * gpus) / 256.0


@pytest.mark.parametrize(
    "card, blocks, avgpools", [("dinov2", [1, 4], [False, True]), ("dinov3", [1], [True])]
)
@pytest.mark.slow
def test_grid_and_lr_of_a_step_are_the_scripts(card, blocks, avgpools):
    p = load_card(f"linear_aug@{card}").params
    # the scripts' classifier names, in setup_linear_classifiers' loop order
    names = [
        f"classifier_{n}_blocks_avgpool_{a}_lr_{_scale_lr(lr):.5f}"
        for n in blocks
        for a in avgpools
        for lr in LRS
    ]
    batch, per_epoch, scale = augmented.plan(1_281_167, p)  # ImageNet-1k's training images
    ours = [f"classifier_{n}_blocks_avgpool_{a}_lr_{lr * scale:.5f}" for n, a, lr, _ in
            grid_settings(p)]  # fmt: skip
    assert ours == names and len(names) == {"dinov2": 52, "dinov3": 13}[card]
    # max_iter = epochs 10 x epoch_length 1250, in passes of 1251 steps (drop_last)
    assert (batch, per_epoch) == (1024, 1251) and schedule(per_epoch, p) == (10, 12_500)
    # the rate of each iteration, from torch's SGD + CosineAnnealingLR as the scripts build it
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in LRS]
    opt = torch.optim.SGD(
        [{"params": [w], "lr": _scale_lr(lr)} for w, lr in zip(params, LRS, strict=True)],
        momentum=0.9,
        weight_decay=0,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10 * 1250, eta_min=0)
    check = {0, 1, 1250, 5000, 6250, 11_000, 12_499}
    for it in range(12_500):
        if it in check:
            for lr, group in zip(LRS, opt.param_groups, strict=True):
                got = augmented.lr_at(it, per_epoch, lr, scale, p)
                assert got == pytest.approx(group["lr"], rel=1e-9, abs=1e-15), (it, lr)
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_last_blocks": (1, 4), "avgpool": ()}, "go together"),
        ({"n_last_blocks": (0,), "avgpool": (True,)}, "n_last_blocks must be >= 1"),
        ({"iterations": 10, "warmup_epochs": 1.0}, "CosineAnnealingLR"),
        ({"head_init": "xavier"}, "head_init is one of"),
        ({"select": "best"}, "select is one of"),
    ],
)
def test_bad_multilayer_params_are_one_line(change, message):
    with pytest.raises(UserError, match=message) as e:
        AugmentedParams(**{"epochs": 2, "warmup_epochs": 0.0} | change)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "backbone, message",
    [
        (
            "random:vit_micro_p4",
            "linear_aug: n_last_blocks asks for the last 4 blocks, but this VisionTransformer has 2",
        ),
        (
            "random:resnet10t",
            "linear_aug: n_last_blocks reads the class tokens of a ViT's last blocks; a ResNet has no blocks",
        ),
    ],
)
def test_blocks_the_backbone_lacks_are_one_line_errors(backbone, message, tmp_path, capsys):
    args = ["run", "--backbone", backbone, "--image-size", "16", "--dataset", "digits"]
    args += ["--protocol", "linear_aug@dinov2", "--results-dir", str(tmp_path / "r")]
    assert main([*args, "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert message in line and "Traceback" not in err
    assert not (tmp_path / "r" / "records").exists() or not any((tmp_path / "r").rglob("*.json"))


def _inputs(tmp_path, bb):
    """96 training and 60 validation images of digits, 100 test images."""
    ds = get_dataset("digits", DatasetOptions())
    cut = lambda s, n: ImageSplit(s.labels[:n], s.images[:n])  # noqa: E731
    ds = dataclasses.replace(ds, train=cut(ds.train, 156), test=cut(ds.test, 100))
    tr, va = np.arange(96), np.arange(96, 156)
    return ImageInputs(bb, ds, tr, va, torch.device("cpu"), 0, tmp_path / "state")


# 96 rows, batch 40, drop_last: 2 steps a pass; 5 iterations: 3 passes, the last cut short
# (the grid over passes; the card's stream, DINOv2's sampler, is test_augmented_scripts.py's)
P = dataclasses.replace(
    load_card("linear_aug@dinov2").params,
    base_lrs=(0.5, 5.0),
    batch_size=40,
    iterations=5,
    forward_batch=16,
    stream=False,
    eval_period=0,
)


@pytest.fixture(scope="module")
def final_run(tmp_path_factory):
    """One uninterrupted run of ``P`` on a random ViT, with the lr of every step and every
    stack of heads after each pass."""
    bb, lrs, kept = _vit(), [], []
    upd, hook = augmented.OPTIMISERS["sgd"], augmented._after_epoch

    def spy(param, grad, mu, lr, *a, **k):
        if param.ndim == 3:
            lrs.append(lr.clone())
        upd(param, grad, mu, lr, *a, **k)

    def keep(epoch, stacks):
        kept.append([(h.W.clone(), h.b.clone()) for h in stacks])

    augmented.OPTIMISERS["sgd"], augmented._after_epoch = spy, keep
    try:
        inp = _inputs(tmp_path_factory.mktemp("final"), bb)
        out = run_augmented(inp, P)
    finally:
        augmented.OPTIMISERS["sgd"], augmented._after_epoch = upd, hook
    return bb, inp, out, lrs, kept


def test_heads_start_as_the_scripts_linear_classifier():
    torch.manual_seed(3)
    heads = augmented.Heads(3, 7, 5, P, "cpu")
    torch.manual_seed(3)
    want = torch.stack([torch.empty(5, 7).normal_(0.0, 0.01) for _ in range(3)])
    assert torch.equal(heads.W, want) and not heads.b.any()


@pytest.mark.slow
def test_final_heads_chosen_on_validation_with_the_scripts_schedule(final_run):
    bb, inp, out, lrs, kept = final_run
    p = P
    d = out.details
    assert (d["steps"], d["steps_per_epoch"], d["epochs_run"], len(d["history"])) == (5, 2, 3, 3)
    # 4 stacks (one per (n, avgpool)) stepped 5 times, each lr torch's cosine over 5 steps
    assert len(lrs) == 4 * 5
    for s in range(5):
        for stack in range(4):
            for j, base in enumerate(p.base_lrs):
                peak = base * 40 / 256
                want = peak * 0.5 * (1 + math.cos(math.pi * s / 5))
                assert float(lrs[4 * s + stack][j]) == pytest.approx(want, rel=1e-6)

    # every final head scored here on inputs laid out by the scripts' create_linear_input
    # over hooked tokens of the evaluation images
    settings = grid_settings(p)

    def scores(split, idx, labels):
        ds = TrainImages(split, idx, bb.preprocessing, 0, False)
        images = torch.stack([ds[i][0] for i in range(len(idx))])
        tokens = _official_tokens(bb.model, bb.preprocessing.normalise(images), 4)
        y = torch.from_numpy(labels[idx])
        acc, hits = [], []
        for h, (n, avgpool, _, _) in enumerate(settings):
            W, b = kept[-1][h // len(p.base_lrs)]
            k = h % len(p.base_lrs)
            right = (_create_linear_input(tokens, n, avgpool) @ W[k].T + b[k]).argmax(1) == y
            acc.append(float(right.float().mean()))
            hits.append(right.numpy())
        return torch.tensor(acc), hits

    val, _ = scores(inp.bundle.train, inp.val_idx, inp.bundle.train.labels)
    test, test_hits = scores(inp.bundle.test, np.arange(100), inp.bundle.test.labels)
    h = int(torch.argmax(val))  # the first best on validation, among the final heads
    sel = d["selected"]
    assert sel["epoch"] == 2
    assert (sel["n_last_blocks"], sel["avgpool"], sel["base_lr"]) == settings[h][:3]
    assert out.metrics["top1"] == pytest.approx(float(test[h]), abs=1.5 / 100)
    assert (test_hits[h] == out.per_sample["top1"]).mean() >= 0.98
    # the script's own pick: the best test top-1 of the final heads, beside the number
    t = int(torch.argmax(test))
    choice = d["script_choice"]
    assert choice["top1"] == pytest.approx(float(test[t]), abs=1.5 / 100)
    assert (choice["selected"]["n_last_blocks"], choice["selected"]["avgpool"]) == settings[t][:2]
    assert "mae_rule_test_top1" not in d


@pytest.mark.slow
def test_interrupted_and_resumed_multilayer_run_equals_uninterrupted(tmp_path, final_run):
    bb, _, full, _, _ = final_run
    hook = augmented._after_epoch

    def stop(epoch, stacks):
        assert isinstance(stacks, list) and len(stacks) == 4
        if epoch == 1:
            raise KeyboardInterrupt

    augmented._after_epoch = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            run_augmented(_inputs(tmp_path, bb), P)
        assert (tmp_path / "state" / "state.pt").is_file()
        augmented._after_epoch = lambda epoch, stacks: None
        resumed = run_augmented(_inputs(tmp_path, bb), P)
    finally:
        augmented._after_epoch = hook
    assert resumed.metrics == full.metrics
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(resumed.details["history"]) == strip(full.details["history"])
    assert resumed.details["selected"] == full.details["selected"]
    assert resumed.details["script_choice"] == full.details["script_choice"]
    np.testing.assert_array_equal(resumed.per_sample["top1"], full.per_sample["top1"])


@pytest.mark.slow
def test_cli_runs_linear_aug_dinov2_on_a_tiny_vit(tmp_path):
    r = tmp_path / "r"
    args = ["run", "--backbone", "random:test_vit", "--image-size", "32", "--dataset", "digits"]
    args += ["--protocol", "linear_aug@dinov2", "--set", "iterations=6"]
    args += ["--set", "batch_size=256", "--num-workers", "0", "--no-progress"]
    assert main([*args, "--results-dir", str(r), "--cache-dir", str(tmp_path / "c")]) == 0
    (rec,) = [x for x in load_records(r) if x.metric == "top1"]
    assert rec.protocol["name"] == "linear_aug@dinov2" and rec.protocol["type"] == "linear_aug"
    params = rec.protocol["params"]
    assert params["n_last_blocks"] == [1, 4] and params["select"] == "final"
    d = rec.details
    assert d["features_read"]["feature_kind"] == "layers:4"
    # the card's stream (DINOv2's sampler): 6 steps, scored at the end (eval_period 1250)
    assert d["steps"] == 6 and d["stream"]["scored_at"] == [6]
    assert d["stream"]["passes"] == math.ceil(6 * 256 / d["train_size"])
    assert all(len(e["val_top1"]) == 52 for e in d["history"])
    assert d["selected"]["epoch"] == len(d["history"]) - 1 == 0  # the final heads
    assert d["selected"]["lr"] == pytest.approx(d["selected"]["base_lr"] * d["batch"] / 256)
    lo, hi = rec.ci95
    assert lo <= rec.value <= hi and "script_choice" in d


@pytest.mark.slow
@pytest.mark.parametrize("select, epoch, head", [("final", 1, 2), ("epoch", 0, 5)])
def test_select_final_reports_the_heads_as_training_ends(
    tmp_path, monkeypatch, select, epoch, head
):
    # validation scores set by hand: head 5 is the best of all after the first pass, head 2
    # the best of the final heads; the scripts report the final heads (select=final)
    bb = build_backbone("random:vit_micro_p4", BuildOptions(image_size=16))
    p = dataclasses.replace(P, n_last_blocks=(1, 2), iterations=3, select=select)  # 2 passes
    settings, real, calls = grid_settings(p), augmented._top1, []

    def scored(stacks, groups, x, y):
        calls.append(real(stacks, groups, x, y))
        if len(calls) % 2 == 0:  # each pass scores validation, then test
            return calls[-1]
        val = torch.zeros(len(settings))
        val[5 if len(calls) == 1 else 2] = 0.9 if len(calls) == 1 else 0.5
        return val

    monkeypatch.setattr(augmented, "_top1", scored)
    out = run_augmented(_inputs(tmp_path, bb), p)
    sel = out.details["selected"]
    assert len(calls) == 4 and sel["epoch"] == epoch
    assert (sel["n_last_blocks"], sel["avgpool"], sel["base_lr"]) == settings[head][:3]
    assert out.details["best_val_top1"] == pytest.approx(0.5 if select == "final" else 0.9)


# ---------------------------------------------------------------- DINO's eval_linear.py


def _dino_linear_input(tokens: list, n: int, avgpool: bool) -> torch.Tensor:
    """facebookresearch/dino@7c446df eval_linear.py's head input, written out from its train()
    over get_intermediate_layers(x, n) (every block's tokens through the final norm): the class
    tokens of the n blocks concatenated; with avgpool the (B, n x D) class tokens and the last
    block's (B, D) mean patch token stacked on a new last axis and flattened row by row (the
    script's shapes allow n = 1 only)."""
    out = torch.cat([cls for _, cls in tokens[-n:]], dim=-1)
    if avgpool:
        mean = tokens[-1][0].mean(dim=1)
        out = torch.stack((out, mean), dim=-1).reshape(out.shape[0], -1)
    return out.float()


@pytest.mark.parametrize(
    "card, n, avgpool", [("linear@dino", 4, False), ("linear@dino-vitb", 1, True)]
)
def test_dino_cards_heads_read_eval_linears_input(card, n, avgpool):
    bb = _vit()
    p = load_card(card).params
    assert (p.n_last_blocks, p.avgpool) == ((n,), (avgpool,))  # the README's flags
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    source = LayerInput(p)
    with frozen_forward(source.reader(bb), torch.device("cpu"), Accel()) as read:
        row = source.select(read(images))
    (g,) = source.groups(len(grid_settings(p)))
    tokens = _official_tokens(bb.model, bb.preprocessing.normalise(images), n)
    want = _dino_linear_input(tokens, n, avgpool)
    assert want.shape[1] == 64 * (n + int(avgpool))  # the script's embed_dim
    torch.testing.assert_close(row[:, g.columns], want, rtol=1e-5, atol=1e-5)
    if avgpool:  # not DINOv2's create_linear_input, which puts the patch mean after
        assert not torch.allclose(want, _create_linear_input(tokens, n, avgpool), atol=1e-3)
    assert source.record()["feature_kind"] == f"layers:{n}"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"avgpool_layout": "dino"}, "avgpool_layout is one of"),
        ({"avgpool_layout": "interleave"}, "orders the heads with avgpool true"),
        (
            {"avgpool_layout": "interleave", "n_last_blocks": (4,), "avgpool": (True,)},
            "n_last_blocks must be [1], not [4]",
        ),
        (
            {"avgpool_layout": "interleave", "n_last_blocks": (1, 4), "avgpool": (False, True)},
            "n_last_blocks must be [1], not [1, 4]",
        ),
        (
            {"avgpool_layout": "interleave", "n_last_blocks": (4,), "avgpool": (False,)},
            "orders the heads with avgpool true",
        ),
    ],
)
def test_bad_avgpool_layouts_are_one_line(change, message):
    with pytest.raises(UserError) as e:
        AugmentedParams(**{"epochs": 2, "warmup_epochs": 0.0} | change)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("card", ["linear@dino", "linear@dino-vitb"])
def test_dino_vit_cards_refuse_a_resnet_in_one_line(card, tmp_path, capsys):
    args = ["run", "--backbone", "random:resnet10t", "--image-size", "16", "--dataset", "digits"]
    args += ["--protocol", card, "--results-dir", str(tmp_path / "r")]
    assert main([*args, "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error" in x]
    assert "a ResNet has no blocks with a class token" in line and "Traceback" not in err


@pytest.mark.parametrize("kind", augmented.HEAD_INITS)
def test_head_init_std_zero_starts_every_kind_at_zero(kind):
    # SimCLR's zero_init_logits_layer; trunc_normal_ divides by the std (ZeroDivisionError)
    p = AugmentedParams(epochs=2, warmup_epochs=0.0, head_init=kind, head_init_std=0.0)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    heads = augmented.Heads(3, 7, 5, p, "cpu")
    assert heads.W.shape == (3, 5, 7) and not heads.W.any() and not heads.b.any()
    assert torch.equal(torch.rand(1), before)  # no draw made
