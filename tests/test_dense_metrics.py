"""Dense metrics against direct numpy formulas on hand-made arrays (mmseg's mIoU / aAcc,
DINOv3's depth metrics), the bootstrap over test images, and the refusal of a prediction that
is not at the target's full resolution."""

import math

import numpy as np
import pytest

from ssl_eval.core.errors import UserError
from ssl_eval.core.stats import bootstrap_sum_ci
from ssl_eval.protocols.dense.metrics import DepthScorer, SegmentationScorer, valid_depth

IGN = 255


def _pairs():
    g = np.random.default_rng(3)
    out = []
    for h, w in ((7, 9), (5, 11), (8, 8)):
        t = g.integers(0, 4, (h, w))
        t[g.random((h, w)) < 0.2] = IGN
        p = np.where(g.random((h, w)) < 0.6, np.where(t == IGN, 0, t), g.integers(0, 4, (h, w)))
        out.append((p, t))
    return out


def test_miou_pixel_acc_and_per_class_iou_match_numpy():
    pairs = _pairs()
    s = SegmentationScorer(5, IGN)  # class 4 never occurs: absent from the mean
    for p, t in pairs:
        s.add(p, t)
    res = s.results(200, 0)
    pr_all = np.concatenate([p.ravel() for p, _ in pairs])
    tg_all = np.concatenate([t.ravel() for _, t in pairs])
    keep = tg_all != IGN
    pr_all, tg_all = pr_all[keep], tg_all[keep]
    ious = []
    for c in range(4):
        inter = np.sum((pr_all == c) & (tg_all == c))
        union = np.sum((pr_all == c) | (tg_all == c))
        ious.append(inter / union)
    assert res["per_class_iou"][:4] == pytest.approx(ious)
    assert res["per_class_iou"][4] is None
    assert res["miou"] == pytest.approx(np.mean(ious))
    assert res["pixel_acc"] == pytest.approx(np.mean(pr_all == tg_all))
    lo, hi = res["intervals"]["miou"]
    assert lo <= res["miou"] <= hi


def test_predicted_but_absent_class_scores_zero():
    s = SegmentationScorer(3, IGN)
    s.add(np.array([[0, 2]]), np.array([[0, 0]]))  # class 2 predicted, never labelled: IoU 0
    r = s.results(0)
    assert r["per_class_iou"] == [0.5, None, 0.0] and r["miou"] == pytest.approx(0.25)


def test_downsampled_target_refused():
    s = SegmentationScorer(3, IGN)
    with pytest.raises(UserError, match="full resolution"):
        s.add(np.zeros((8, 8), int), np.zeros((4, 4), int))
    with pytest.raises(UserError, match="full resolution"):
        DepthScorer().add(np.ones((8, 8)), np.ones((16, 16)))


def test_bootstrap_sum_ci_is_the_statistic_of_resampled_sums():
    parts = np.array([[1.0, 2.0], [3.0, 1.0], [0.0, 4.0], [2.0, 2.0]])
    stat = lambda s: s[:, 0] / s[:, 1]  # noqa: E731
    lo, hi = bootstrap_sum_ci(parts, stat, 300, seed=5)
    rng = np.random.default_rng(5)  # the same draws, by hand
    idx = rng.integers(0, 4, size=(300, 4))
    vals = [parts[i, 0].sum() / parts[i, 1].sum() for i in idx]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(vals, [0.025, 0.975])))


def test_depth_metrics_match_numpy_on_valid_pixels():
    g = np.random.default_rng(0)
    gts, preds = [], []
    s = DepthScorer(depth_range=(1e-3, 10.0), eval_box=(0.25, 0.75, 0.0, 1.0))
    for _ in range(3):
        gt = g.uniform(0.5, 12.0, (8, 6)).astype(np.float32)
        gt[1, 1] = 0.0
        gt[3, :2] = 10.0, 1e-3  # the range's ends: not valid (DINOv3's bounds are exclusive)
        pr = (gt * g.uniform(0.7, 1.4, gt.shape)).astype(np.float32)
        pr[4, :2] = 11.5, 1e-4  # beyond the range: clamped before scoring
        s.add(pr, gt)
        gts.append(gt)
        preds.append(pr)
    r = s.results(100, 0)
    rm, ar, d1 = [], [], []
    for gt, pr in zip(gts, preds, strict=True):
        # eval/depth/eval.py: targets >= max or <= min set to the ignored 0, the mask of the
        # box and of non-zero targets, the prediction clamped to [min, max]
        gt = np.where((gt >= 10.0) | (gt <= 1e-3), 0.0, gt)
        v = gt > 0
        v[:2], v[6:] = False, False  # rows 2..5 of 8: the box
        e, t = np.clip(pr, 1e-3, 10.0)[v].astype(float), gt[v].astype(float)
        rm.append(np.sqrt(np.mean((e - t) ** 2)))
        ar.append(np.mean(np.abs(e - t) / t))
        d1.append(np.mean(np.maximum(e / t, t / e) < 1.25))
    assert r["rmse"] == pytest.approx(np.mean(rm), rel=1e-6)
    assert r["abs_rel"] == pytest.approx(np.mean(ar), rel=1e-6)
    assert r["delta1"] == pytest.approx(np.mean(d1))
    assert valid_depth(gts[0], (1e-3, 10.0), (0.25, 0.75, 0, 1))[1].sum() == 0


def test_depth_head_and_sigloss_follow_the_official_formulas():
    """The bins head (ReLU + 0.1, normalised, weighted sum of linear bins; the class token
    concatenated to every patch) and SigLoss, against numpy written from DINOv3's code."""
    import torch

    from ssl_eval.protocols.depth import LindepthParams, LinearDepthHead, sigloss

    torch.manual_seed(0)
    p = LindepthParams(bins=5, min_depth=0.5, max_depth=4.5, use_cls_token=True)
    head = LinearDepthHead(3, p).eval()
    tokens, prefix = torch.randn(2, 2, 3, 3), torch.randn(2, 1, 3)
    out = head(tokens, prefix).detach().numpy()
    bn = head.bn
    x = np.concatenate(
        [tokens.numpy(), np.broadcast_to(prefix.numpy()[:, :, None], (2, 2, 3, 3))], -1
    )
    x = (x - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps)
    x = x * bn.weight.detach().numpy() + bn.bias.detach().numpy()
    logits = x @ head.conv.weight.detach().numpy()[:, :, 0, 0].T + head.conv.bias.detach().numpy()
    w = np.maximum(logits, 0) + 0.1
    w /= w.sum(-1, keepdims=True)
    expect = w @ np.linspace(0.5, 4.5, 5)
    np.testing.assert_allclose(out[:, 0], expect, rtol=1e-5)
    pred, gt = torch.tensor([1.0, 2.0, 3.0, 9.0]), torch.tensor([1.5, 2.0, 2.5, 0.0])
    valid = gt > 0
    g = np.log(pred.numpy()[:3] + 1e-3) - np.log(gt.numpy()[:3] + 1e-3)
    full = np.sqrt(np.var(g, ddof=1) + 0.15 * g.mean() ** 2)
    assert float(sigloss(pred, gt, valid, variance=True)) == pytest.approx(full, rel=1e-5)
    warm = np.sqrt(0.15 * g.mean() ** 2)
    assert float(sigloss(pred, gt, valid, variance=False)) == pytest.approx(warm, rel=1e-5)


def _official_one_cycle(s, max_lr, total, warmup, ratio, div, final_div, momenta):
    """WarmupOneCycleLR._compute_lr_momentum's arithmetic at scheduler step ``s``
    (facebookresearch/dinov3 @ 6876159, eval/segmentation/schedulers.py; the same lines in
    eval/depth/schedulers.py), written out here on its own: (lr, momentum)."""
    min_lr = max_lr / div / final_div  # group["min_lr"] = group["initial_lr"] / final_div
    if s < warmup:
        if ratio:
            k = (1 - s / warmup) * (1 - ratio)
            return max_lr * (1 - k) * (1 - s / total), 0
        gmax = max_lr * (1 + math.cos(math.pi * s / float(total))) / 2
        return max_lr / final_div + gmax * s / float(warmup), 0
    pct = (s - warmup) / float(total - warmup)
    base, top = momenta
    momentum = top + (base - top) / 2.0 * (math.cos(math.pi * pct) + 1)
    lr = min_lr + (max_lr - min_lr) / 2.0 * (math.cos(math.pi * (s + 1) / float(total)) + 1)
    return lr, momentum


def test_dense_schedules_are_dinov3s_warmup_one_cycle():
    """linseg's (config-ade20k-linear-training: warmup_ratio 1e-6, final_div_factor inf, beta1
    untouched) and lindepth's (config-nyu: final_div_factor 1000, use_beta1 true: Adam's beta1
    0 in the warm-up, then 0.85 -> 0.95) schedules at their published lengths."""
    from ssl_eval.protocols.dense_seg import LinsegParams
    from ssl_eval.protocols.depth import LindepthParams

    seg = LinsegParams().schedule()
    assert (seg.total, seg.warmup, seg.use_beta1) == (40_000, 1_500, False)
    for s in (0, 1, 750, 1_499, 1_500, 1_501, 20_000, 39_999):
        lr, _ = _official_one_cycle(s, 1e-3, 40_000, 1_500, 1e-6, 25.0, math.inf, (0.85, 0.95))
        assert seg.at(s) == (pytest.approx(lr, rel=1e-12, abs=1e-300), None), s
    assert seg.at(0)[0] == pytest.approx(1e-9) and seg.at(39_999)[0] == 0.0
    dep = LindepthParams().schedule()
    assert (dep.total, dep.warmup, dep.use_beta1) == (38_400, 12_800, True)
    for s in (0, 1, 6_400, 12_799, 12_800, 12_801, 25_600, 38_399):
        lr, m = _official_one_cycle(s, 3e-4, 38_400, 12_800, 0.0, 25.0, 1000.0, (0.85, 0.95))
        got = dep.at(s)
        assert got[0] == pytest.approx(lr, rel=1e-12) and got[1] == pytest.approx(m, abs=1e-15)
    assert dep.at(0) == (pytest.approx(3e-7), 0.0)  # lr / final_div, beta1 0
    assert dep.at(12_799)[0] == pytest.approx(0.75 * 3e-4 + 3e-7, rel=1e-3)  # cos(pi/3): 0.75
    assert dep.at(12_800)[1] == pytest.approx(0.85) and dep.at(38_399)[1] == pytest.approx(0.95)
    assert dep.at(38_399)[0] == pytest.approx(3e-4 / 25_000)


def test_linseg_loss_and_test_resize_are_dinov3s():
    """The cross-entropy averaged over every pixel, ignored ones counting 0 (DINOv3's
    CrossEntropyLoss, avg_non_ignore false), and the test resize's longer side rounded half
    up (its FixedSideResize: 300x400 at 512 is 512x683)."""
    import torch

    from ssl_eval.protocols.dense.common import shorter_side
    from ssl_eval.protocols.dense_seg import seg_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = 255
    logp = torch.log_softmax(logits, 1)
    keep = target != 255
    picked = logp.gather(1, torch.where(keep, target, 0)[:, None])[:, 0]
    expect = -(picked * keep).sum() / target.numel()
    assert float(seg_loss(logits, target)) == pytest.approx(float(expect), rel=1e-6)
    assert shorter_side(300, 400, 512) == (512, 683)
    assert shorter_side(400, 300, 512) == (683, 512)
    assert shorter_side(32, 32, 16) == (16, 16)
