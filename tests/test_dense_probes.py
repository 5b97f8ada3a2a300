"""The dense probes end to end on tiny data: linear segmentation, patch k-NN segmentation and
linear depth, scored on each test image's original target (never a resized one), a backbone
whose "patch tokens" are its pixels making k-NN exact; the gate reading a rise of RMSE as the
regression; the leaderboard's mIoU / RMSE columns beside top-1."""

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


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny heads: one thread (two threads on a loaded 2-core machine wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    p = LinsegParams(samples=200, batch_size=8, warmup_samples=16, lr=0.01, examples=1)
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
    p = LindepthParams(samples=1600, batch_size=8, warmup_samples=80, lr=0.05, grad_clip=35,
                       sigloss_warmup_samples=80, bins=64, max_depth=4.0)  # fmt: skip
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
    sets = ["--set", "linseg@dinov3.samples=64", "--set", "linseg@dinov3.warmup_samples=16"]
    argv = ["run", "--dataset", "shapes-seg", "--protocol", "linseg@dinov3,knnseg@capi"]
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
