"""The dense probes end to end on tiny data: linear segmentation, patch k-NN segmentation and
linear depth, scored on each test image's original target (never a resized one), a backbone
whose "patch tokens" are its pixels making k-NN exact; the gate reading a rise of RMSE as the
regression; the leaderboard's mIoU / RMSE columns beside top-1."""

import dataclasses

import numpy as np
import pytest
import timm
import torch
from torch import nn

from ssl_eval.backbones.base import Backbone
from ssl_eval.data.datasets import DatasetBundle, ImageSplit
from ssl_eval.data.dense import DenseSplit, DenseTargets
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.protocols.base import ImageInputs
from ssl_eval.protocols.dense import metrics as dense_metrics
from ssl_eval.protocols.dense_knn import KnnsegParams, run_knnseg
from ssl_eval.protocols.dense_seg import LinsegParams, run_linseg
from ssl_eval.protocols.depth import LindepthParams, run_lindepth

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


GREY, RED = (128, 128, 128), (220, 40, 40)


def _scene(g, h, w):
    """An image of red rectangles on grey, its mask (1 = red) and depth (red nearer)."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GREY
    m = np.zeros((h, w), np.int64)
    for _ in range(2):
        y, x = g.integers(0, h - 3), g.integers(0, w - 3)
        m[y : y + g.integers(2, 7), x : x + g.integers(1, 5)] = 1  # thin parts: 1 pixel wide
    img[m == 1] = RED
    return img, m, np.where(m == 1, 1.0, 3.0).astype(np.float32)


def _bundle(task="segmentation", n_train=24, n_test=4):
    g = np.random.default_rng(0)
    tr = [_scene(g, 16, 16) for _ in range(n_train)]
    te = [_scene(g, 16, 27) for _ in range(n_test)]  # wider than a window: slides
    k = 1 if task == "segmentation" else 2
    dense = DenseTargets(
        task,
        DenseSplit(np.stack([s[k] for s in tr])),
        DenseSplit(np.stack([s[k] for s in te])),
        classes=("grey", "red") if task == "segmentation" else (),
        depth_range=(1e-3, 10.0) if task == "depth" else None,
    )
    return DatasetBundle(
        "toy-dense",
        ["x"],
        ImageSplit(np.zeros(n_train, np.int64), np.stack([s[0] for s in tr])),
        ImageSplit(np.zeros(n_test, np.int64), np.stack([s[0] for s in te])),
        {"toy": 1},
        dense=dense,
    )


class PixelTokens(nn.Module):
    """A "backbone" whose patch tokens are its pixels (stride 1) with a constant channel."""

    def forward_features(self, x):
        return torch.cat([x, torch.ones_like(x[:, :1])], 1)


def _inputs(bb, bundle, tmp_path, n_val=4):
    n = len(bundle.train)
    return ImageInputs(
        bb,
        bundle,
        np.arange(n_val, n),
        np.arange(n_val),
        CPU,
        0,
        tmp_path / "state",
        0,
        cache_dir=tmp_path / "cache",
        batch_size=8,
        bootstrap_resamples=50,
    )


def _pixels():
    return Backbone("pixel-tokens", PixelTokens(), Preprocessing(crop=16))


def _tiny_vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16,
                              patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0)  # fmt: skip
    return Backbone("tiny-vit", model, Preprocessing(crop=16))


def test_knnseg_on_pixel_tokens_is_exact_at_full_resolution(tmp_path):
    """Each pixel its own patch: the nearest training pixel of the same colour gives the
    exact label, so any misalignment of crops, windows or upsampling costs mIoU."""
    out = run_knnseg(_inputs(_pixels(), _bundle(), tmp_path), KnnsegParams(ks=(1, 3)))
    assert out.metrics["miou"] == pytest.approx(1.0)
    assert out.metrics["pixel_acc"] == pytest.approx(1.0)
    assert out.details["geometry"] == {"size": 16, "crop": 16, "stride": 11}


def test_linseg_scores_the_original_targets(tmp_path, monkeypatch):
    """What the scorer receives is each test image's own target, untouched, and a prediction
    of its shape; the reported mIoU is numpy's over those pairs."""
    seen = []
    row = dense_metrics.SegmentationScorer.row

    def spy(self, pred, target):
        seen.append((pred.copy(), target.copy()))
        return row(self, pred, target)

    monkeypatch.setattr(dense_metrics.SegmentationScorer, "row", spy)
    bundle = _bundle()
    p = LinsegParams(size=0, crop=0, stride=0, samples=200, batch_size=8, warmup_samples=16,
                     lr=0.01, examples=1)  # fmt: skip
    out = run_linseg(_inputs(_tiny_vit(), bundle, tmp_path), p)
    assert len(seen) == len(bundle.test)
    for r, (pred, target) in enumerate(seen):
        assert np.array_equal(target, bundle.dense.test.targets[r])  # not resized
        assert pred.shape == (16, 27)
    pr_all = np.concatenate([a.ravel() for a, _ in seen])
    tg_all = np.concatenate([b.ravel() for _, b in seen])
    ious = [
        np.sum((pr_all == c) & (tg_all == c)) / np.sum((pr_all == c) | (tg_all == c))
        for c in (0, 1)
    ]
    assert out.metrics["miou"] == pytest.approx(np.nanmean(ious))
    lo, hi = out.intervals["miou"]
    assert lo <= out.metrics["miou"] <= hi
    assert set(out.details["per_class_iou"]) == {"grey", "red"}
    assert out.details["tokens"] == "cached" and len(out.details["examples"]) == 1


@pytest.mark.slow
def test_lindepth_learns_depth_from_pixel_tokens(tmp_path):
    p = LindepthParams(size=0, samples=1600, batch_size=8, warmup_samples=80, lr=0.05,
                       grad_clip=35, sigloss_warmup_samples=80, bins=64, max_depth=4.0)  # fmt: skip
    out = run_lindepth(_inputs(_pixels(), _bundle("depth"), tmp_path), p)
    m = out.metrics
    # red 1 m, grey 3 m: a constant guess of 2 m would give AbsRel ~0.6 and delta1 0
    assert m["abs_rel"] < 0.15 and m["delta1"] > 0.8 and m["rmse"] < 0.5
    assert len(out.per_sample["rmse"]) == 4


def test_gate_reads_a_rise_of_rmse_as_the_regression():
    from ssl_eval.report.gate import check

    def row(metric, value, half=0.005):
        return {"backbone": "b", "dataset": "nyu-depth", "protocol": "lindepth@dinov3",
                "seed": 0, "metric": metric, "value": value, "ci95": [value - half, value + half],
                "setting": {"hash": "h", "summary": {}}, "time": "t"}  # fmt: skip

    base = [row("rmse", 0.50), row("miou", 0.40)]
    worse = check(base, [row("rmse", 0.60), row("miou", 0.40)])
    kinds = {f.metric: f.kind for f in worse.findings}
    assert kinds == {"rmse": "regression", "miou": "ok"} and worse.exit_code != 0
    f = next(f for f in worse.findings if f.metric == "rmse")
    assert (f.old, f.new) == pytest.approx((0.50, 0.60))  # shown as recorded
    better = check(base, [row("rmse", 0.40), row("miou", 0.30)])
    kinds = {f.metric: f.kind for f in better.findings}
    assert kinds == {"rmse": "improvement", "miou": "regression"}


@pytest.mark.slow
def test_cli_dense_run_on_shapes_leaderboard_and_check(tmp_path, monkeypatch, capsys):
    """`ssl-eval run` on shapes-seg with a tiny random ViT, linseg and knnseg: records with
    intervals, an mIoU column beside top-1 in the leaderboard, a baseline the check passes;
    a classification protocol on a dense-only dataset and a dense one on shapes are refused."""
    from ssl_eval.cli import main
    from ssl_eval.data import dense
    from ssl_eval.records.store import load_records

    monkeypatch.setattr(dense, "SHAPES_DENSE_TRAIN", 40)
    monkeypatch.setattr(dense, "SHAPES_DENSE_TEST", 12)
    monkeypatch.chdir(tmp_path)
    common = ["--backbone", "random:vit_tiny_patch16_224", "--image-size", "32", "--no-progress",
              "--results-dir", "r", "--cache-dir", "c"]  # fmt: skip
    argv = ["run", "--dataset", "shapes-seg", "--protocol", "linseg@dinov3,knnseg@capi"]
    assert main(argv + common) != 0  # the card's 512 crops: refused in one line
    assert "does not take 512x512 inputs" in capsys.readouterr().err
    sets = ["--set", "linseg@dinov3.samples=64", "--set", "linseg@dinov3.warmup_samples=16"]
    sets += [a for k in ("size", "crop", "stride") for a in ("--set", f"linseg@dinov3.{k}=0")]
    assert main(argv + common + sets) == 0
    recs = {(r.protocol["name"], r.metric): r for r in load_records(tmp_path / "r")}
    for proto in ("linseg@dinov3", "knnseg@capi"):
        r = recs[(proto, "miou")]
        assert r.ci95[0] <= r.value <= r.ci95[1] and r.ci_method == "bootstrap-test"
        assert len(r.details["per_class_iou"]) == 7 and r.details["examples"]
    md = (tmp_path / "r" / "leaderboard.md").read_text()
    assert "shapes-seg / linseg@dinov3 (mIoU %)" in md and "shapes-seg / knnseg@capi" in md
    assert main(["baseline", "--results-dir", "r", "--out", "b.json"]) == 0
    assert main(["check", "--results-dir", "r", "--baseline", "b.json"]) == 0
    assert main(["report", "--results-dir", "r", "--cache-dir", "c", "--no-progress"]) == 0
    assert "Dense predictions" in (tmp_path / "r" / "report" / "index.html").read_text()
    assert len(list((tmp_path / "r" / "report").glob("dense-*.png"))) == 2
    capsys.readouterr()
    assert main(["run", "--dataset", "shapes", "--protocol", "linseg@dinov3", *common]) != 0
    assert "no segmentation targets" in capsys.readouterr().err


def test_the_dense_job_loads_and_names_dense_cards():
    from ssl_eval.orchestrate.suite.spec import load_job_suite

    job = load_job_suite("dense")
    assert job.datasets == ("shapes-seg",)
    assert set(job.protocols) == {"linseg@dinov3", "knnseg@capi"}
    assert {m.name for m in job.models} >= {"mae", "simclr"}


def test_leaderboard_best_rmse_is_the_smallest():
    from ssl_eval.report.leaderboard import Cell, Table, _clip

    cells = {(b, c): Cell(v, None, None, "", 1, []) for b, c, v in
             (("a", "seg", 40.0), ("b", "seg", 50.0), ("a", "depth", 0.6), ("b", "depth", 0.4))}  # fmt: skip
    t = Table(["a", "b"], ["seg", "depth"], {}, {}, {}, {}, cells, "top1",
              {"seg": "miou", "depth": "rmse"})  # fmt: skip
    assert t.best("seg") == 50.0 and t.best("depth") == 0.4
    assert _clip(0.3, 1.7, "rmse") == (0.3, 1.7, False)  # an error in metres: no cut at 1
    assert _clip(0.3, 1.7, "miou") == (0.3, 1.0, True)


def test_knnseg_bank_memory_is_bounded_by_the_bank_not_the_training_set(tmp_path, monkeypatch):
    """The largest tensor knnseg allocates outside the search itself (whose working memory is
    ``memory_mb``) stays far below the training set's tokens: the bank is cut to
    ``max_bank_patches`` while the batches are read, and no crop target is kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ssl_eval.protocols import dense_knn

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest, self.paused = 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not self.paused:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        self.largest = max(self.largest, t.numel() * t.element_size())
            return out

    spy = Largest()
    search = dense_knn.knn_search

    def unwatched(*a, **k):
        spy.paused = True
        try:
            return search(*a, **k)
        finally:
            spy.paused = False

    monkeypatch.setattr(dense_knn, "knn_search", unwatched)
    bundle = _bundle(n_train=400, n_test=2)
    inp = _inputs(_pixels(), bundle, tmp_path)
    whole = (len(bundle.train) - 4) * 16 * 16 * 4 * 4  # the training patches' float32 tokens
    with spy:
        out = run_knnseg(inp, KnnsegParams(ks=(1, 3), max_bank_patches=1000, token_budget_mb=1))
    assert out.details["bank_patches"] == 1000
    assert spy.largest < whole / 8, (spy.largest, whole)


def _seg_params(**kw):
    """linseg at the toy's own size (the card's 512 is ADE20K's), a short schedule."""
    return LinsegParams(**({"size": 0, "crop": 0, "stride": 0, "samples": 400, "batch_size": 8,
                            "warmup_samples": 16, "lr": 0.01, "examples": 0} | kw))  # fmt: skip


def test_linseg_learns_pixel_tokens_to_miou_one(tmp_path, monkeypatch):
    """Each pixel its own token, red against grey: a linear head separates them exactly, so a
    trained head reaches mIoU 1.0 at the original resolution; with the schedule's lr at 0 the
    head keeps its random initialisation and does not."""
    from ssl_eval.protocols.dense import common

    out = run_linseg(_inputs(_pixels(), _bundle(), tmp_path / "a"), _seg_params())
    assert out.metrics["miou"] == 1.0 and out.metrics["pixel_acc"] == 1.0
    assert out.details["trained_on"].startswith("all 24 training images")
    monkeypatch.setattr(common.OneCycle, "at", lambda self, s: (0.0, None))
    out = run_linseg(_inputs(_pixels(), _bundle(), tmp_path / "b"), _seg_params())
    assert out.metrics["miou"] < 0.9


def test_linseg_head_is_dinov3s_dropout_then_batchnorm_then_conv():
    """DINOv3's LinearHead.forward: channel dropout (Dropout2d: whole channels zeroed), then
    BatchNorm, then the 1x1 convolution; in eval mode no dropout."""
    from ssl_eval.protocols.dense_seg import LinearSegHead

    torch.manual_seed(0)
    head = LinearSegHead(6, 3, dropout=0.5).train()
    x = torch.randn(4, 5, 5, 6)
    torch.manual_seed(1)
    out = head(x)
    torch.manual_seed(1)
    keep = torch.empty(4, 6, 1, 1).bernoulli_(0.5) / 0.5  # Dropout2d's draw: one per channel
    dropped = x.permute(0, 3, 1, 2) * keep
    mean, var = (
        dropped.mean((0, 2, 3), keepdim=True),
        dropped.var((0, 2, 3), unbiased=False, keepdim=True),
    )
    normed = (dropped - mean) / torch.sqrt(var + head.bn.eps)
    expect = torch.nn.functional.conv2d(normed, head.conv.weight, head.conv.bias)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)
    assert isinstance(head.drop, nn.Dropout2d)
    head.eval()
    bn = head.bn
    normed = (x.permute(0, 3, 1, 2) - bn.running_mean[:, None, None]) / torch.sqrt(
        bn.running_var[:, None, None] + bn.eps
    )
    expect = torch.nn.functional.conv2d(normed, head.conv.weight, head.conv.bias)
    torch.testing.assert_close(head(x), expect, rtol=1e-5, atol=1e-6)


def test_dense_trainers_step_as_dinov3s(tmp_path, monkeypatch):
    """What the optimiser runs with at each iteration: one AdamW group, weight decay on every
    head parameter (BatchNorm and bias included); linseg's iteration i at the schedule's step
    max(0, i - 1) (the segmentation trainer skips scheduler.step() after iteration 0), beta1
    as the card says; lindepth's at step i with Adam's beta1 set by the schedule."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        (g,) = self.param_groups
        seen.append((g["lr"], g["betas"], g["weight_decay"], len(g["params"])))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    p = _seg_params(samples=80, warmup_samples=24)  # 10 iterations, 3 of warm-up
    run_linseg(_inputs(_pixels(), _bundle(n_test=1), tmp_path / "s"), p)
    sched = p.schedule()
    assert [x[0] for x in seen] == [sched.at(max(0, i - 1))[0] for i in range(10)]
    assert {(x[1], x[2], x[3]) for x in seen} == {((0.9, 0.999), 1e-3, 4)}  # bn w, b; conv w, b
    seen.clear()
    p = LindepthParams(size=0, samples=80, batch_size=8, warmup_samples=24, bins=8, max_depth=4.0)
    run_lindepth(_inputs(_pixels(), _bundle("depth", n_test=1), tmp_path / "d"), p)
    sched = p.schedule()
    want = [sched.at(i) for i in range(10)]
    assert [x[0] for x in seen] == [w[0] for w in want]
    assert [x[1] for x in seen] == [(w[1], 0.99) for w in want]
    assert [x[1][0] for x in seen[:3]] == [0.0] * 3 and seen[3][1][0] == pytest.approx(0.85)
    assert {(x[2], x[3]) for x in seen} == {(1e-4, 4)}


def test_drop_last_trains_whole_batches_for_exactly_the_schedule(tmp_path, monkeypatch):
    """DINOv3's dense loaders drop the last partial batch of each pass (drop_last: the
    segmentation trainer's make_data_loader default, the depth trainer's is_train), so every
    iteration is a full batch and the run is exactly total_iter iterations. With drop_last
    (the shipped cards) 22 training images in batches of 8 give passes of 2 full batches and
    the 80 samples are 10 steps of 8; without it (the neutral value, the records before it)
    each pass ends on a batch of 6, and the run takes 11 steps, past the schedule's 10."""
    from ssl_eval.core.errors import UserError
    from ssl_eval.protocols import dense_seg, depth
    from ssl_eval.protocols.cards import load_card

    sizes = []
    seg_loss = dense_seg.seg_loss
    monkeypatch.setattr(dense_seg, "seg_loss", lambda o, t: sizes.append(len(t)) or seg_loss(o, t))
    bundle = _bundle(n_train=22, n_test=1)
    out = run_linseg(
        _inputs(_pixels(), bundle, tmp_path / "a"), _seg_params(samples=80, drop_last=True)
    )
    assert sizes == [8] * 10 and out.details["steps"] == 10
    sizes.clear()
    out = run_linseg(_inputs(_pixels(), bundle, tmp_path / "b"), _seg_params(samples=80))
    assert sizes == [8, 8, 6] * 3 + [8, 6] and out.details["steps"] == 11
    sizes.clear()
    sig = depth.sigloss
    monkeypatch.setattr(
        depth, "sigloss", lambda o, *a, **k: sizes.append(len(o)) or sig(o, *a, **k)
    )
    p = LindepthParams(size=0, samples=80, batch_size=8, warmup_samples=8, bins=8, max_depth=4.0,
                       drop_last=True)  # fmt: skip
    out = run_lindepth(
        _inputs(_pixels(), _bundle("depth", n_train=22, n_test=1), tmp_path / "d"), p
    )
    assert sizes == [8] * 10 and out.details["steps"] == 10
    with pytest.raises(UserError, match="whole batches of 8, and there are 6 training") as e:
        run_linseg(_inputs(_pixels(), _bundle(n_train=6, n_test=1), tmp_path / "e", n_val=2),
                   _seg_params(drop_last=True))  # fmt: skip
    assert "\n" not in str(e.value)
    # the shipped cards drop the last batch; false is neutral (out of a card's setting)
    assert load_card("linseg@dinov3").params.drop_last is True
    assert load_card("lindepth@dinov3").params.drop_last is True
    assert "drop_last" not in load_card("linseg@dinov3", ["drop_last=false"]).params_dict()


def test_sigloss_is_each_gpus_pair_averaged_as_dinov3s_trainer(tmp_path, monkeypatch):
    """config-nyu.yaml trains on 8 GPUs of 2 images (bs 2, n_gpus 8): each GPU's criterion is
    the SigLoss of its own 2 images and DDP averages the gradients, so the batch's loss is the
    mean of the pairs' SigLoss, not one SigLoss over the 16 images pooled (whose log-error
    variance and mean are the pool's). Written out in numpy from eval/depth/loss.py."""
    from ssl_eval.protocols import depth
    from ssl_eval.protocols.cards import load_card
    from ssl_eval.protocols.depth import batch_sigloss

    g = np.random.default_rng(0)
    pred = torch.from_numpy(g.uniform(0.5, 4.0, (4, 3, 5)).astype(np.float32))
    target = torch.from_numpy(g.uniform(0.5, 4.0, (4, 3, 5)).astype(np.float32))
    target[1, 0] = 0.0  # no measurement: out of the loss
    target[2] *= 3.0  # one pair's errors unlike the other's: pooled and paired differ

    def official(pr, gt):
        v = gt > 0
        e = np.log(pr[v] + 1e-3) - np.log(gt[v] + 1e-3)
        return np.sqrt(0.15 * e.mean() ** 2 + np.var(e, ddof=1))

    pr, gt = pred.numpy(), target.numpy()
    pairs = np.mean([official(pr[i : i + 2], gt[i : i + 2]) for i in (0, 2)])
    assert float(batch_sigloss(pred, target, True, group=2)) == pytest.approx(pairs, rel=1e-5)
    assert float(batch_sigloss(pred, target, True)) == pytest.approx(official(pr, gt), rel=1e-5)
    assert abs(official(pr, gt) - pairs) > 0.01
    # the run computes it per pair; the card says so (0, one loss over the batch, is neutral)
    sizes = []
    sig = depth.sigloss
    monkeypatch.setattr(
        depth, "sigloss", lambda o, *a, **k: sizes.append(len(o)) or sig(o, *a, **k)
    )
    p = LindepthParams(size=0, samples=16, batch_size=8, warmup_samples=8, bins=8, max_depth=4.0,
                       sigloss_group=2)  # fmt: skip
    run_lindepth(_inputs(_pixels(), _bundle("depth", n_test=1), tmp_path), p)
    assert sizes == [2] * 8
    assert load_card("lindepth@dinov3").params.sigloss_group == 2
    assert "sigloss_group" not in load_card("lindepth@dinov3", ["sigloss_group=0"]).params_dict()


def test_dense_heads_start_from_the_runs_seed_not_the_processs(tmp_path):
    """The heads' initialisation (the convolution's normal draw) comes from the run's seed:
    whatever the process drew before (another protocol of the same run, another import), the
    same run gives the same losses and numbers; another seed, another start."""
    seg = _seg_params(samples=32)
    dep = LindepthParams(size=0, samples=32, batch_size=8, warmup_samples=8, bins=8, max_depth=4.0)
    for k, (run, task, p) in enumerate(
        ((run_linseg, "segmentation", seg), (run_lindepth, "depth", dep))
    ):
        losses = []
        for before in (1, 2):
            torch.manual_seed(before)  # what the process drew before this run
            inp = _inputs(_pixels(), _bundle(task, n_test=1), tmp_path / f"{k}{before}")
            losses.append(run(inp, p).details["final_loss"])
        assert losses[0] == losses[1]
        torch.manual_seed(1)
        inp = dataclasses.replace(
            _inputs(_pixels(), _bundle(task, n_test=1), tmp_path / f"{k}s"), seed=1
        )
        assert run(inp, p).details["final_loss"] != losses[0]


def test_whole_image_and_flip_averaging_as_dinov3s_depth_eval():
    """mode whole: each test image at its native resolution in one forward (DINOv3's depth
    evaluation); flip: the output averaged with the flipped-back output of the mirror image
    (LeftRightFlipAug's inverse). A head adding the column index to the red channel gives
    red + x alone and red + (w - 1) / 2 with the flip averaging."""
    from ssl_eval.protocols.dense.common import slide_predict

    bundle = _bundle(n_test=2)
    bb, calls = _pixels(), []

    def head(tokens, prefix):
        calls.append(tuple(tokens.shape))
        x = torch.arange(tokens.shape[2], dtype=torch.float32)
        return (tokens[..., 0] + x)[:, None]

    def run(flip):
        calls.clear()
        kw = dict(size=None, crop=None, stride=0, head=head, device=CPU, batch_size=8)
        return dict(slide_predict(bb, bundle.test, [0, 1], flip=flip, **kw))

    red = {r: bb.preprocessing.normalise(torch.from_numpy(bundle.test.load(r)).permute(2, 0, 1)
                                         [None])[0, 0].half().float() for r in (0, 1)}  # fmt: skip
    plain = run(False)
    assert calls == [(2, 16, 27, 4)]  # both images whole, native 16 x 27, one forward
    for r in (0, 1):
        torch.testing.assert_close(plain[r][0], red[r] + torch.arange(27.0))
    flipped = run(True)
    assert calls == [(2, 16, 27, 4)] * 2  # the image and its mirror
    for r in (0, 1):
        torch.testing.assert_close(flipped[r][0], red[r] + 13.0)
    # resized (size 20) and whole: 16x27 becomes 20x34, the longer side rounded half up as
    # DINOv3's FixedSideResize (27 x 20 / 16 = 33.75; torchvision's [20] would give 33)
    calls.clear()
    kw = dict(crop=None, stride=0, head=head, device=CPU, batch_size=8)
    out = dict(slide_predict(bb, bundle.test, [0], size=20, **kw))
    assert calls == [(1, 20, 34, 4)] and out[0].shape == (1, 16, 27)


def test_slide_predict_yields_each_image_when_done_within_a_bounded_batch(monkeypatch):
    """Memory on real data (ADE20K's 150 classes at 512 px: 157 MB of upsampled output a
    window): an image's output is yielded as soon as its own windows are done, not after the
    whole chunk's, and with ``channels`` a forward batch holds no more windows than keep their
    upsampled outputs within WINDOW_OUTPUT_MB; the outputs are those of unbounded batches."""
    from ssl_eval.protocols.dense import common

    bundle = _bundle(n_test=3)  # 16 x 27 images: 2 x 4 windows of 8 each
    bb, calls = _pixels(), []

    def head(tokens, prefix):
        calls.append(tokens.shape[0])
        return tokens.permute(0, 3, 1, 2)[:, :3] * 2.0

    kw = dict(size=None, crop=8, stride=8, head=head, device=CPU, batch_size=64)
    whole = dict(common.slide_predict(bb, bundle.test, [0, 1, 2], **kw))
    assert calls == [24]  # one forward of the chunk's 24 windows
    calls.clear()
    per = 3 * 8 * 8 * 4  # one window's upsampled output, bytes
    monkeypatch.setattr(common, "WINDOW_OUTPUT_MB", 4 * per / 2**20)
    gen = common.slide_predict(bb, bundle.test, [0, 1, 2], channels=3, **kw)
    row, first = next(gen)
    assert row == 0 and calls == [4, 4]  # image 0's 8 windows, then image 0 out
    bounded = {row: first, **dict(gen)}
    assert max(calls) == 4 and sum(calls) == 24 and list(bounded) == [0, 1, 2]
    for r in (0, 1, 2):
        torch.testing.assert_close(bounded[r], whole[r])
