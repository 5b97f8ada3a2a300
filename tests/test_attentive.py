"""Attentive probing (protocols/attentive.py, protocols/_poolers.py): the poolers against the
official formulas computed by hand, the schedules against the official scripts' formulas, a
grid trained together against its heads trained one by one, the one-line refusal, the cards,
and a run from the command line."""

import math

import numpy as np
import pytest
import timm
import torch

from ssl_eval.backbones.base import Backbone
from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetBundle, ImageSplit
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.features.tokens import token_source
from ssl_eval.protocols._poolers import CapiPooler, EfficientPooler, VJepa2Pooler
from ssl_eval.protocols.attentive import AttentiveParams, plan, train_heads
from ssl_eval.protocols.cards import load_card

CPU = torch.device("cpu")


def tiny_vit(image_size=16, **_) -> Backbone:
    """A random-init 2-block ViT (patch 4, width 32): a backbone for `--backbone py:...`."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=image_size or 16,
        patch_size=4,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=0,
    )
    return Backbone("tiny-vit", model, Preprocessing(crop=image_size or 16))


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np(t):
    return t.detach().double().numpy()


def _lin(x, layer):
    out = x @ _np(layer.weight).T
    return out + _np(layer.bias) if layer.bias is not None else out


def _ln(x, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _gelu(x):
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def test_capi_pooler_is_one_query_attention_by_hand():
    torch.manual_seed(1)
    d, h, c = 8, 2, 3
    pooler = CapiPooler(d, c, h)
    x = torch.randn(2, 5, d)
    xn = _np(x)
    kv = _lin(xn, pooler.kv)
    k, v = kv[..., :d], kv[..., d:]
    q = _np(pooler.query)
    pooled = np.zeros((2, d))
    for i in range(h):  # softmax(q_h K_h^T / sqrt(d_h)) V_h, head by head
        s = slice(i * d // h, (i + 1) * d // h)
        a = _softmax(k[..., s] @ q[s] / math.sqrt(d // h))
        pooled[:, s] = np.einsum("bn,bnd->bd", a, v[..., s])
    np.testing.assert_allclose(_np(pooler(x)), _lin(pooled, pooler.linear), atol=1e-5)


def test_ep_pooler_reads_one_value_slice_per_query_by_hand():
    torch.manual_seed(2)
    d, m, c = 8, 4, 3
    pooler = EfficientPooler(d, c, m)
    x = torch.randn(3, 6, d)
    xn, q = _np(x), _np(pooler.query)
    v = xn @ _np(pooler.v.weight).T  # no bias, no query or key projection
    pooled = np.zeros((3, d))
    for j in range(m):
        a = _softmax(np.einsum("d,bnd->bn", q[j], xn) / math.sqrt(d))
        s = slice(j * d // m, (j + 1) * d // m)
        pooled[:, s] = np.einsum("bn,bnd->bd", a, v[..., s])
    np.testing.assert_allclose(_np(pooler.pool(x)), pooled, atol=1e-5)
    pooler.eval()  # BatchNorm at its initial running statistics (0, 1), no affine
    np.testing.assert_allclose(
        _np(pooler(x)), _lin(pooled / math.sqrt(1 + 1e-6), pooler.linear), atol=1e-5
    )
    assert sum(p.numel() for p in pooler.parameters()) == m * d + d * d + d * c + c


def test_ep_pooler_normalises_each_512_rows_apart_in_training():
    """efficient probing's BatchNorm is per GPU (512 rows each, not synchronised) and its
    running statistics are rank 0's: a batch of 1,100 rows is normalised as 512 + 512 + 76
    rows, each by its own mean and biased variance, and the running statistics follow the
    first 512 rows alone (momentum 0.1, unbiased variance)."""
    torch.manual_seed(3)
    d, m = 8, 4
    pooler = EfficientPooler(d, 3, m).train()
    x = torch.randn(1100, 2, d) + 3 * torch.rand(1100, 1, 1)  # groups with other statistics
    pooled = _np(pooler.pool(x))
    want = np.concatenate(
        [(g - g.mean(0)) / np.sqrt(g.var(0) + 1e-6) for g in np.split(pooled, [512, 1024])]
    )
    np.testing.assert_allclose(_np(pooler(x)), _lin(want, pooler.linear), atol=1e-4)
    first = pooled[:512]
    np.testing.assert_allclose(_np(pooler.norm.running_mean), 0.1 * first.mean(0), atol=1e-5)
    np.testing.assert_allclose(
        _np(pooler.norm.running_var), 0.9 + 0.1 * first.var(0, ddof=1), atol=1e-5
    )


def _attend(q, k, v, heads):
    d = q.shape[-1]
    out = np.zeros(q.shape)
    for i in range(heads):
        s = slice(i * d // heads, (i + 1) * d // heads)
        a = _softmax(np.einsum("bqd,bnd->bqn", q[..., s], k[..., s]) / math.sqrt(d // heads))
        out[..., s] = np.einsum("bqn,bnd->bqd", a, v[..., s])
    return out


def test_vjepa2_pooler_is_blocks_then_cross_attention_by_hand():
    torch.manual_seed(3)
    d, h, c = 8, 2, 3
    pooler = VJepa2Pooler(d, c, h, depth=2)
    assert len(pooler.blocks) == 1
    x = torch.randn(2, 5, d)
    z = _np(x)
    blk = pooler.blocks[0]  # pre-norm self-attention block: x + proj(attn(ln x)); + mlp(ln x)
    qkv = _lin(_ln(z), blk.qkv)
    z = z + _lin(_attend(qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :], h), blk.proj)
    z = z + _lin(_gelu(_lin(_ln(z), blk.mlp[0])), blk.mlp[2])
    # cross-attention block: q + attn(W_q q, W_kv ln(x)) (no output projection); + mlp(ln q)
    q = np.broadcast_to(_np(pooler.query), (2, 1, d))
    kv = _lin(_ln(z), pooler.kv)
    q = q + _attend(_lin(q, pooler.q), kv[..., :d], kv[..., d:], h)
    q = q + _lin(_gelu(_lin(_ln(q), pooler.mlp[0])), pooler.mlp[2])
    np.testing.assert_allclose(_np(pooler(x)), _lin(q[:, 0], pooler.linear), atol=1e-5)
    assert pooler(torch.randn(4, 7, d)).shape == (4, c)


def test_vjepa2_init_rescales_the_residual_projections():
    torch.manual_seed(4)
    p = VJepa2Pooler(64, 3, 4, depth=4)
    # trunc_normal(0.02) / sqrt(2 (layer + 1)); the cross block's MLP takes the last layer's
    stds = [float(b.proj.weight.detach().std()) for b in p.blocks] + [
        float(p.mlp[2].weight.detach().std())
    ]
    want = [0.02 / math.sqrt(2 * k) for k in (1, 2, 3, 3)]
    np.testing.assert_allclose(stds, want, rtol=0.08)


# ---------------------------------------------------------------- schedules (official formulas)


def test_capi_schedule_is_its_linspace_arrays():
    p = AttentiveParams(iterations=40, warmup=6, lr_scaling="batch/256", batch_size=64)
    pl = plan(1000, p)
    # eval_classification.py: np.concatenate([linspace(0,1,W), (cos(linspace(0,pi,T-W))+1)/2])
    sched = np.concatenate(
        [np.linspace(0.0, 1.0, 6), (np.cos(np.linspace(0, np.pi, 40 - 6)) + 1) / 2]
    )
    base = 1e-3 * 64 / 256.0
    got = [pl.lr(i, 1e-3, p) for i in range(40)]
    np.testing.assert_allclose(got, sched * base, rtol=1e-12, atol=1e-15)


def test_vjepa2_schedule_is_warmup_cosine_stepped_before_each_iteration():
    p = AttentiveParams(
        pooler="vjepa2", heads=2, schedule="vjepa2", epochs=4, warmup=1.5, start_lr=2e-4,
        final_lr=1e-5, lr_scaling="none", batch_size=10,
    )  # fmt: skip
    pl = plan(73, p)  # 7 full batches an epoch
    assert (pl.per_epoch, pl.total) == (7, 28)
    warmup_steps, t_max = int(1.5 * 7), 28  # init_opt: int(warmup * ipe), num_epochs * ipe

    class Official:  # WarmupCosineLRSchedule.step, as the script calls it before each batch
        step = 0.0

        def lr(self, ref):
            self.step += 1
            t = t_max - warmup_steps
            if self.step < warmup_steps:
                return 2e-4 + self.step / max(1, warmup_steps) * (ref - 2e-4)
            prog = (self.step - warmup_steps) / max(1, t)
            return max(1e-5, 1e-5 + (ref - 1e-5) * 0.5 * (1 + math.cos(math.pi * prog)))

    off = Official()
    np.testing.assert_allclose(
        [pl.lr(i, 1e-3, p) for i in range(28)], [off.lr(1e-3) for _ in range(28)]
    )


def test_mae_schedule_is_lr_sched_at_the_fractional_epoch():
    p = AttentiveParams(
        pooler="ep", queries=2, optimizer="lars", schedule="mae", epochs=5, warmup=2,
        lrs=(0.1,), batch_size=16,
    )  # fmt: skip
    pl = plan(100, p)  # 6 iterations an epoch, lr = blr * 16 / 256
    lr = 0.1 * 16 / 256
    want = []
    for epoch in range(5):
        for it in range(6):  # engine_finetune: adjust_learning_rate(it / len(loader) + epoch)
            e = it / 6 + epoch
            want.append(
                lr * e / 2 if e < 2 else lr * 0.5 * (1 + math.cos(math.pi * (e - 2) / (5 - 2)))
            )
    np.testing.assert_allclose([pl.lr(i, 0.1, p) for i in range(30)], want, rtol=1e-12)


def test_cards_heads_and_lengths_follow_their_scripts():
    capi = load_card("attentive@capi").params
    assert len(capi.settings()) == 10 * 3 and capi.iterations == 12_500 and capi.warmup == 1250
    vj = load_card("attentive@vjepa2").params
    # configs/eval/vitl/in1k.yaml: lr {5e-4, 1e-3, 1.5e-3, 2e-3} x wd {8e-3 ... 5e-4}, 4 blocks
    assert len(vj.settings()) == 4 * 5 and (vj.depth, vj.heads, vj.epochs) == (4, 16, 20)
    assert plan(1024 * 50, vj).total == 20 * 50  # the script's global batch: 50 iterations
    eff = load_card("attentive@eff").params
    assert eff.settings() == [(0.1, 0.0)] and plan(4096 * 3, eff).scale == 16.0  # lr 1.6


def test_vjepa2_steps_an_epoch_count_its_last_partial_batch():
    # V-JEPA 2's make_dataloader(training=True) passes drop_last=False (eval.py) to a loader of
    # 16 rows per rank over DistributedSampler's 64 shares: ipe = len(train_loader) =
    # ceil(ceil(n / 64) / 16) = ceil(n / 1024) iterations an epoch, the last one partial;
    # T_max = int(20 x ipe), warmup int(5 x ipe). CAPI's and efficient probing's loaders drop
    # it (drop_last=True). Fails with the card's drop_last left at true (n // 1024 an epoch).
    vj = load_card("attentive@vjepa2").params
    assert vj.drop_last is False
    for n in (1024 * 50, 1024 * 50 + 100, 1_281_167):
        ipe = math.ceil(math.ceil(n / 64) / 16)
        pl = plan(n, vj)
        assert (pl.per_epoch, pl.total, int(pl.warmup)) == (ipe, 20 * ipe, int(5 * ipe)), n
        assert pl.rows == n and pl.rows_read() == 20 * n
    eff = load_card("attentive@eff").params
    assert eff.drop_last and plan(4096 * 3 + 100, eff).per_epoch == 3  # main_linprobe: True
    capi = load_card("attentive@capi").params
    assert capi.drop_last and plan(1024 * 3 + 100, capi).rows == 1024 * 3  # drop_last=True
    # the neutral value is the type's rule before the param, and stays out of the settings
    assert AttentiveParams.NEUTRAL["drop_last"] is True
    assert "drop_last" not in load_card("attentive@capi").params_dict()
    assert load_card("attentive@vjepa2").params_dict()["drop_last"] is False


class _CountingSource:
    """A token source that records the rows of every training batch it yields."""

    def __init__(self, src):
        self.src, self.dim, self.sizes = src, src.dim, []

    def batches(self, order, batch_size, **kw):
        for take, t, pre in self.src.batches(order, batch_size, **kw):
            self.sizes.append(len(take))
            yield take, t, pre


@pytest.mark.parametrize("drop_last, sizes", [(True, [8, 8] * 2), (False, [8, 8, 4] * 2)])
def test_an_epochs_partial_batch_is_a_step_without_drop_last(tmp_path, drop_last, sizes):
    bb, ds = tiny_vit(8), _bundle(n=24, size=8)
    src = token_source(
        bb, ds, "train", budget_bytes=10**8, device=CPU, batch_size=8, cache_dir=tmp_path
    )
    labels = {i: int(ds.train.labels[i]) for i in range(len(ds.train))}
    p = AttentiveParams(epochs=2.0, batch_size=8, lrs=(1e-2,), drop_last=drop_last)
    spy = _CountingSource(src)
    heads, pl = train_heads(spy, np.arange(20), labels, 3, p, p.settings(), 7, CPU)
    assert spy.sizes == sizes and pl.total == len(sizes) and pl.rows_read() == sum(sizes)


# ---------------------------------------------------------------- training


def _bundle(n=48, size=16, classes=3, seed=0):
    g = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    imgs = g.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    imgs[..., 0] += (labels * 80).astype(np.uint8)[:, None, None]  # the class is in the red
    split = ImageSplit(labels, imgs)
    return DatasetBundle("toy", [str(c) for c in range(classes)], split, split, {"toy": seed})


@pytest.mark.parametrize(
    "kw",
    [
        {"pooler": "capi", "no_decay": "bias", "weight_decays": (0.0, 0.05)},
        {"pooler": "ep", "queries": 4, "optimizer": "lars", "schedule": "mae", "warmup": 1},
    ],
)
def test_a_grid_trained_together_equals_its_heads_one_by_one(tmp_path, kw):
    bb, ds = tiny_vit(8), _bundle(n=24, size=8)
    src = token_source(
        bb, ds, "train", budget_bytes=10**8, device=CPU, batch_size=8, cache_dir=tmp_path
    )
    labels = {i: int(ds.train.labels[i]) for i in range(len(ds.train))}
    rows = np.arange(20)
    p = AttentiveParams(**{"iterations": 4, "batch_size": 8, "lrs": (1e-2, 3e-3)} | kw)
    together, _ = train_heads(src, rows, labels, 3, p, p.settings(), 7, CPU)
    for head, setting in zip(together, p.settings(), strict=True):
        (alone,), _ = train_heads(src, rows, labels, 3, p, [setting], 7, CPU)
        for (name, a), b in zip(
            head.state_dict().items(), alone.state_dict().values(), strict=True
        ):
            # to the bit: a torchrun world trains shares of the grid (protocols/_grid_share.py)
            assert torch.equal(a, b), name
    moved = [
        not torch.equal(a, b)
        for a, b in zip(together[0].parameters(), together[1].parameters(), strict=True)
    ]
    assert all(moved)  # two settings, two different heads


def test_a_backbone_without_patch_tokens_is_refused_in_one_line(tmp_path):
    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.protocols.attentive import run_attentive
    from ssl_eval.protocols.base import ImageInputs

    bb = build_backbone("pixels", BuildOptions(image_size=16))
    inp = ImageInputs(
        bb, _bundle(), np.arange(30), np.arange(30, 40), CPU, 0, tmp_path / "s", 0, tmp_path
    )
    with pytest.raises(UserError) as e:
        run_attentive(inp, AttentiveParams(iterations=2))
    assert "\n" not in str(e.value) and str(e.value).startswith(
        "the attentive probe reads patch tokens"
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 2, "iterations": 3},
        {"iterations": 3, "warmup": 3},
        {"iterations": 3, "lrs": ()},
        {"iterations": 3, "pooler": "cappi"},
        {"iterations": 3, "lr_scaling": "sqrt"},
    ],
)
def test_bad_params_are_one_line(bad):
    with pytest.raises(UserError) as e:
        AttentiveParams(**bad)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_attentive_capi_from_the_command_line_selects_on_val(tmp_path):
    from ssl_eval.cli import main
    from ssl_eval.records.store import load_records

    r = tmp_path / "r"
    args = ["run", "--backbone", "py:test_attentive:tiny_vit", "--image-size", "8"]
    args += ["--dataset", "digits", "--protocol", "attentive@capi", "--no-progress"]
    args += ["--set", "iterations=25", "--set", "warmup=3", "--set", "lrs=[0.03,0.3]"]
    args += ["--set", "weight_decays=[0.0005,0.05]", "--set", "batch_size=64"]
    args += ["--results-dir", str(r), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0
    (top1,) = [x for x in load_records(r) if x.metric == "top1"]
    d = top1.details
    assert top1.protocol["type"] == "attentive" and top1.ci_method == "bootstrap-test"
    assert top1.ci95[0] < top1.value < top1.ci95[1]
    assert len(d["grid"]) == 2 * 2 and d["steps"] == 25 and d["batch_size"] == 64
    best = max(d["grid"], key=lambda g: g["val_top1"])  # max() keeps the first of equals
    assert (d["best_lr"], d["best_weight_decay"]) == (best["lr"], best["weight_decay"])
    assert d["peak_lr"] == pytest.approx(d["best_lr"] * 64 / 256)
    # the card's training views (CAPI's random resized crop and flip) are embedded online; the
    # validation rows' tokens are cached
    assert d["tokens_train"]["tokens"] == "augmented online"
    assert d["tokens_train"]["views"] == 25 * 64
    assert d["tokens_val"]["tokens"] == "cached" and d["tokens_val"]["grid"] == [2, 2]
    assert top1.value > 0.2  # ten classes: a head that learned something


@pytest.mark.slow
def test_a_saved_state_resumes_and_a_damaged_one_starts_over(tmp_path, capsys):
    bb, ds = tiny_vit(8), _bundle(n=24, size=8)
    src = token_source(bb, ds, "train", budget_bytes=10**8, device=CPU, cache_dir=tmp_path)
    labels = {i: int(ds.train.labels[i]) for i in range(len(ds.train))}
    rows, state = np.arange(20), tmp_path / "state" / "state.pt"
    p = AttentiveParams(iterations=6, batch_size=8, lrs=(1e-2, 3e-3), warmup=1)
    train = lambda: train_heads(src, rows, labels, 3, p, p.settings(), 7, CPU, state)  # noqa: E731
    ref = [h.state_dict() for h in train()[0]]  # 2 steps an epoch: states after steps 2 and 4
    capsys.readouterr()
    for damage in (None, "flip"):
        if damage:
            data = bytearray(state.read_bytes())
            data[-9] ^= 0xFF
            state.write_bytes(bytes(data))
        heads, _ = train()
        out, err = capsys.readouterr()
        if damage:
            assert "is damaged" in err and "starts over" in err and "[resume]" not in out
        else:
            assert "[resume] attentive from step 4 of 6" in out, out
        for h, r in zip(heads, ref, strict=True):
            for (name, a), b in zip(h.state_dict().items(), r.values(), strict=True):
                assert torch.equal(a, b), name


def test_the_leaderboard_sets_attentive_beside_linear():
    from ssl_eval.report.leaderboard import _beside_linear

    kind = {
        "a": ("cifar10", "attentive"),
        "f": ("cifar10", "finetune"),
        "k": ("cifar10", "knn"),
        "l": ("cifar10", "linear"),
        "b": ("digits", "attentive"),  # no linear column on digits: stays where it was
        "m": ("digits", "knn"),
    }
    assert _beside_linear(["a", "f", "k", "l", "b", "m"], kind) == ["f", "k", "l", "a", "b", "m"]
    assert _beside_linear(["f", "k", "m"], kind) == ["f", "k", "m"]


def test_set_takes_exponent_floats_yaml_reads_as_strings():
    # YAML 1.1 reads 1e-3 (no dot) as a string: a float param takes it, a word stays refused
    assert load_card("attentive@capi", ["lrs=[1e-3,2E-4]"]).params.lrs == (1e-3, 2e-4)
    with pytest.raises(UserError, match="expected float"):
        load_card("attentive@capi", ["lrs=[small]"])


def test_streamed_tokens_train_and_score_as_cached_ones(tmp_path):
    from ssl_eval.protocols.attentive import run_attentive
    from ssl_eval.protocols.base import ImageInputs

    bb, ds = tiny_vit(8), _bundle(n=24, size=8)
    out = {}
    for gb in (1.0, 0.0):  # within the budget: cached; a budget of 0: every batch computed
        inp = ImageInputs(
            bb, ds, np.arange(18), np.arange(18, 24), CPU, 0, tmp_path / "s", 0, tmp_path
        )
        p = AttentiveParams(iterations=4, batch_size=6, lrs=(0.01, 0.1), token_budget_gb=gb)
        out[gb] = run_attentive(inp, p)
    cached, streamed = out[1.0], out[0.0]
    assert cached.details["tokens_train"]["tokens"] == "cached"
    assert streamed.details["tokens_train"]["tokens"] == "streamed"
    assert streamed.details["tokens_test"]["token_bytes"] == 24 * (4 + 1) * 32 * 2
    assert cached.details["grid"] == streamed.details["grid"]
    np.testing.assert_array_equal(cached.per_sample["top1"], streamed.per_sample["top1"])


def test_each_cards_lr_at_step_s_is_its_scripts():
    steps = [0, 1, 249, 250, 251, 999, 1249, 1250, 6000, 12_499]
    # attentive@capi: eval_model's batch_size=128 is per rank; benchmark.py launches it through
    # train_distributed.launch_jobs(num_nodes=1), whose ntasks_per_node defaults to 8 ranks,
    # each drawing its own rows (InfiniteSampler's rank::world_size share), and its base_lr is
    # lr * (batch_size * world_size) / 256; n_iters 12_500 of that global batch, warmup
    # linspace(0, 1, 1250), then the cosine
    per_rank, ranks, n_iters = 128, 1 * 8, 12_500
    card = load_card("attentive@capi").params
    pl = plan(2_000_000, card)
    assert (pl.batch, pl.total) == (per_rank * ranks, n_iters)
    assert pl.total * pl.batch == 12_800_000  # images the script's run reads
    sched = np.concatenate(
        [np.linspace(0.0, 1.0, 1250), (np.cos(np.linspace(0, np.pi, n_iters - 1250)) + 1) / 2]
    )
    for lr in card.lrs:
        np.testing.assert_allclose(
            [pl.lr(s, lr, card) for s in steps],
            [lr * (per_rank * ranks) / 256 * sched[s] for s in steps],
        )
    # attentive@vjepa2 at the script's batch (1024) with 50 iterations an epoch: 1000 steps,
    # int(5 * 50) warmup steps from 2e-4, the schedule stepped once before iteration s
    card = load_card("attentive@vjepa2").params
    pl = plan(1024 * 50, card)
    for ref in card.lrs:
        for s in [x for x in steps if x < 1000]:
            step, w = s + 1, 250
            want = (
                2e-4 + step / w * (ref - 2e-4)
                if step < w
                else ref * 0.5 * (1 + math.cos(math.pi * (step - w) / (1000 - w)))
            )
            assert pl.lr(s, ref, card) == pytest.approx(want, rel=1e-12)
    # attentive@eff at the README's batch 4096 with 10 iterations an epoch: lr 1.6, the
    # fractional epoch e = s / 10, 10 warmup epochs of 90
    card = load_card("attentive@eff").params
    pl = plan(4096 * 10, card)
    for s in [x for x in steps if x < 900]:
        e = s / 10
        want = 1.6 * e / 10 if e < 10 else 1.6 * 0.5 * (1 + math.cos(math.pi * (e - 10) / 80))
        assert pl.lr(s, 0.1, card) == pytest.approx(want, rel=1e-12)


def test_the_default_suite_resolves_attentive_capi_as_its_reference_records():
    """The card follows CAPI's global batch (1024) since the default suite's references were
    made at 128: the suite pins the old value, so its resolved params (the setting the gate
    compares) are the reference records' own, name, version and type included."""
    import json
    from pathlib import Path

    from ssl_eval.orchestrate.suite.spec import load_job_suite
    from ssl_eval.protocols.cards import load_cards

    suite = load_job_suite("default")
    names = suite.all_protocols()
    card = dict(zip(names, load_cards(list(names), list(suite.set)), strict=True))["attentive@capi"]
    refs = Path(__file__).parents[1] / "results" / "reference" / "default" / "records"
    seen = [
        r["protocol"]
        for f in sorted(refs.glob("*.json"))
        for r in json.loads(f.read_text())["records"]
        if r["protocol"]["name"] == "attentive@capi"
    ]
    assert seen, "the default reference holds attentive@capi records"
    mine = card.to_record()
    for ref in seen:
        assert {k: ref[k] for k in ("name", "version", "type", "params")} == {
            k: mine[k] for k in ("name", "version", "type", "params")
        }


class _Snapshots:
    """A tracker that keeps a copy of every head after every epoch (for the rule's test)."""

    def __init__(self):
        self.heads = []

    def after_epoch(self, heads):
        import copy

        self.heads.append([copy.deepcopy(h).eval() for h in heads])

    def state(self):
        return {}

    def restore(self, st):
        pass


def _top1(head, x, y):
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["mae", "vjepa2"])
def test_each_cards_epoch_and_script_number_follow_its_scripts_rule(tmp_path, schedule):
    """attentive@eff (efficient probing's main_linprobe: max_accuracy, the best epoch on its
    test set) is scored at the (epoch, head) chosen on validation, and the script's own number
    (the best epoch's test top-1) is recorded beside it; attentive@vjepa2 (eval.py: every
    epoch's best head on test, no epoch chosen) scores the last epoch and records the last
    epoch's best head on test. Both recomputed here from every epoch's heads."""
    from ssl_eval.protocols.attentive import run_attentive
    from ssl_eval.protocols.base import ImageInputs

    bb, images = tiny_vit(8), _bundle(n=60, size=8).train.images
    # labels drawn at random: the validation top-1 wanders, so its best epoch is not the last
    split = ImageSplit(np.random.default_rng(1).integers(0, 3, 60), images)
    ds = DatasetBundle("toy", ["0", "1", "2"], split, split, {"toy": 1})
    tr_idx, va_idx = np.arange(36), np.arange(36, 48)
    kw, lrs = {"pooler": "ep", "queries": 4, "optimizer": "lars", "warmup": 1.0}, (30.0, 300.0)
    if schedule == "vjepa2":
        kw, lrs = {"pooler": "capi", "start_lr": 1e-3, "warmup": 1.0}, (0.01, 0.1)
    p = AttentiveParams(
        **kw, schedule=schedule, epochs=6.0, batch_size=6, lrs=lrs, weight_decays=(0.0,)
    )
    inp = ImageInputs(bb, ds, tr_idx, va_idx, CPU, 0, None, 0, tmp_path)
    out = run_attentive(inp, p)
    # the same heads, epoch by epoch (training draws nothing the scoring changes)
    src = token_source(bb, ds, "train", budget_bytes=10**8, device=CPU, cache_dir=tmp_path)
    x = torch.cat([t.reshape(len(t), -1, t.shape[-1]) for _, t, _ in src.batches()])
    y = torch.as_tensor(ds.train.labels)
    labels = {i: int(ds.train.labels[i]) for i in range(len(ds.train))}
    snaps = _Snapshots()
    train_heads(src, tr_idx, labels, 3, p, p.settings(), 0, CPU, None, snaps)
    val = [[_top1(h, x[va_idx], y[va_idx]) for h in hs] for hs in snaps.heads]
    test = [[_top1(h, x, y) for h in hs] for hs in snaps.heads]  # the bundle's test = train
    d = out.details
    if schedule == "mae":
        flat = [(v, -e, -k) for e, vs in enumerate(val) for k, v in enumerate(vs)]
        v, e, k = max(flat)  # the best validation top-1, the first epoch and head on ties
        e, k = -e, -k
        assert e < len(val) - 1, "a run whose best epoch is the last one tests nothing"
        assert (d["best_epoch"], d["best_val_top1"]) == (e, v)
        assert out.metrics["top1"] == pytest.approx(test[e][k], abs=1e-6)
        script = max(t[k] for t in test)
        assert d["script_choice"]["top1"] == pytest.approx(script, abs=1e-6)
        assert d["script_choice"]["selected"]["epoch"] == int(np.argmax([t[k] for t in test]))
    else:
        last = len(val) - 1
        k = int(np.argmax(val[last]))
        assert out.metrics["top1"] == pytest.approx(test[last][k], abs=1e-6)
        assert d["script_choice"]["top1"] == pytest.approx(max(test[last]), abs=1e-6)
        assert "best_epoch" not in d


@pytest.mark.slow
def test_the_best_epoch_rule_resumes_its_per_epoch_scores(tmp_path, capsys):
    """A state saved mid-run holds the per-epoch scores of attentive@eff's rule (validation
    and test top-1 of every epoch so far, the best (epoch, head) and its test hits): a resumed
    run ends with the uninterrupted run's."""
    from ssl_eval.protocols.attentive import _EpochTracker

    bb, ds = tiny_vit(8), _bundle(n=24, size=8)
    src = token_source(bb, ds, "train", budget_bytes=10**8, device=CPU, cache_dir=tmp_path)
    te = token_source(bb, ds, "test", budget_bytes=10**8, device=CPU, cache_dir=tmp_path)
    labels = {i: int(ds.train.labels[i]) for i in range(len(ds.train))}
    rows, val_idx, state = np.arange(16), np.arange(16, 24), tmp_path / "state" / "state.pt"
    y = torch.as_tensor(ds.train.labels)
    p = AttentiveParams(
        pooler="ep", queries=4, optimizer="lars", schedule="mae", epochs=4.0, warmup=1.0,
        batch_size=8, lrs=(30.0, 300.0), weight_decays=(0.0,),
    )  # fmt: skip

    def train():
        t = _EpochTracker(src, te, val_idx, y[val_idx], y, p, CPU)
        train_heads(src, rows, labels, 3, p, p.settings(), 7, CPU, state, t)
        return t

    ref = train()  # 2 steps an epoch: states after epochs 1, 2 and 3
    assert "[resume]" not in capsys.readouterr().out
    again = train()
    assert "[resume] attentive from step 6 of 8" in capsys.readouterr().out
    assert len(again.history) == 4 and again.history == ref.history
    assert {k: v for k, v in again.best.items() if k != "hits"} == {
        k: v for k, v in ref.best.items() if k != "hits"
    }
    for k in (1, 5):
        assert torch.equal(again.best["hits"][k], ref.best["hits"][k])


def test_shortening_a_card_as_the_docs_say_loads_and_a_too_long_warmup_says_what_to_set():
    """docs/protocols.md's way to shorten each attentive card loads (a run shorter than the
    card's warmup is refused, so the docs' line sets both); the refusal names the warmup, the
    run's length and the param to set."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "protocols.md").read_text()
    para = doc[doc.index("Shorten a card with") :].split("\n\n")[0]
    shortened = re.findall(r"`((?:--set \S+ ?)+)` \((attentive@\w+)", para)
    assert {card for _, card in shortened} == {
        "attentive@capi",
        "attentive@vjepa2",
        "attentive@eff",
    }
    for sets, card in shortened:
        load_card(card, sets.replace("--set ", "").split())
    with pytest.raises(UserError) as e:
        load_card("attentive@capi", ["iterations=20"])
    assert "warmup 1250" in str(e.value) and "20 iterations" in str(e.value)
    assert "--set warmup=" in str(e.value)


def test_cached_tokens_on_a_card_with_views_says_which_params_to_reset():
    """train_crop=none on attentive@capi (whose card sets hflip and a bicubic crop): the
    refusal gives the --set of each view param at its neutral value, and those load."""
    with pytest.raises(UserError) as e:
        load_card("attentive@capi", ["train_crop=none"])
    msg = str(e.value)
    assert "--set hflip=false" in msg and "--set crop_interpolation=backbone" in msg, msg
    load_card("attentive@capi", ["train_crop=none", "hflip=false", "crop_interpolation=backbone"])
