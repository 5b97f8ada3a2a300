"""The dense probes' online training views (``augment: dinov3``, dense/augment.py) against
the rules of DINOv3's training transforms as written here from facebookresearch/dinov3 @
6876159 (eval/segmentation/transforms.py with config-ade20k-linear-training.yaml;
eval/depth/transforms.py with config-nyu.yaml): the random resize's ratio range and rounding,
the label's nearest-neighbour resize, the crop's cat_max_ratio rule and ignore padding, the
photometric distortion's draws, the depth's NYU box, rotation, native-resolution crop and
colour change. Then: views that change at every step, a tiny run that learns, one-line
refusals, and augment none leaving the records' setting as it was."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_eval.core.errors import UserError
from ssl_eval.protocols.dense import augment as A
from ssl_eval.protocols.dense_seg import LinsegParams, run_linseg
from ssl_eval.protocols.depth import LindepthParams, run_lindepth

sys.path.insert(0, str(Path(__file__).parent))
from test_dense_probes import _bundle, _inputs, _pixels, _tiny_vit  # noqa: E402

SEG, DEPTH = A.SegAugment(), A.DepthAugment()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def _label(h, w, seed=0):
    g = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int64)
    lab[:, w // 2 :] = 1
    lab[h // 3 : h // 2, :] = 2
    lab[g.random((h, w)) < 0.05] = 255
    return lab


def test_random_resize_draws_dinov3s_ratio_range_and_rounding():
    """FixedSideResize with random_img_size_ratio_range [0.5, 2.0]: shorter side
    int(size x (U x 1.5 + 0.5)), the longer int(small x long / short + 0.5); labels nearest
    neighbour (only values of the original)."""
    img = torch.zeros(3, 30, 47, dtype=torch.uint8)
    lab = torch.from_numpy(_label(30, 47))
    sides = []
    for seed in range(60):
        g, ref = np.random.default_rng(seed), np.random.default_rng(seed)
        out, olab = A.random_resize(img, lab, 16, g, SEG, "bilinear")
        small = int(16 * (ref.random() * (2.0 - 0.5) + 0.5))  # the official rule
        assert tuple(out.shape[1:]) == (small, int(small * 47 / 30 + 0.5)) == tuple(olab.shape)
        assert set(np.unique(olab.numpy())) <= {0, 1, 2, 255}
        sides.append(small)
    assert min(sides) <= 9 and max(sides) >= 30  # the range reaches 0.5x and 2x of 16


def _official_crop(label, crop, g):
    """RandomCropWithLabel.forward as the official code runs it (cat_max_ratio 0.75)."""
    h, w = label.shape

    def draw():
        y = g.integers(0, max(h - crop, 0) + 1)
        x = g.integers(0, max(w - crop, 0) + 1)
        return y, y + crop, x, x + crop

    box = draw()
    for _ in range(10):
        ids, cnt = np.unique(label[box[0] : box[1], box[2] : box[3]], return_counts=True)
        cnt = cnt[ids != 255]
        if len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75:
            break
        box = draw()
    return box


def test_crop_redraws_while_one_class_dominates_ignoring_255():
    """Only crops of 16 starting at columns 41-47 hold class 1 in 5 to 11 of their 16 columns
    (no class at 75% or more; 255 is left out of the count): one draw in 7 lands there, and
    the crop is redrawn up to 10 times to find one."""
    lab = np.zeros((8, 64), np.int64)
    lab[:, 52:] = 1
    lab[:, :8] = 255  # the ignore index never counts as a class
    found = 0
    for seed in range(40):
        box = A.crop_with_label(torch.from_numpy(lab), 16, np.random.default_rng(seed), SEG)
        assert tuple(int(b) for b in box) == _official_crop(lab, 16, np.random.default_rng(seed))
        found += 41 <= box[2] <= 47
    assert found > 24  # 1 - (6/7)^11: 4 in 5; a single draw: 1 in 7


def test_seg_view_pads_with_ignore_and_zero_and_keeps_image_and_label_aligned(monkeypatch):
    """A view smaller than the crop is padded at the bottom and right: the label with 255, the
    normalised image with 0 (the official PadTensor after NormalizeImage); without the
    photometric distortion and with the crop held on the class boundary, every pixel inside a
    uniform region shows that region's colour (image and label resized, cropped and flipped
    together), and about half the views are mirrored."""
    monkeypatch.setattr(A, "photometric", lambda img, rng, aug: img.float())

    def centred(lab, crop, rng, aug):
        x = max(0, lab.shape[1] // 2 - crop // 2)
        return 0, crop, x, x + crop

    monkeypatch.setattr(A, "crop_with_label", centred)
    lab = np.zeros((24, 40), np.int64)
    lab[:, 20:] = 1
    image = np.array([[200, 0, 0], [0, 200, 0]], np.uint8)[lab]
    pre = _pixels().preprocessing
    flips = 0
    for seed in range(30):
        ref = np.random.default_rng(seed)
        small = int(16 * (ref.random() * 1.5 + 0.5))
        h, w = min(small, 16), min(int(small * 40 / 24 + 0.5), 16)
        x, t = A.seg_view(image, lab, 16, pre, np.random.default_rng(seed), SEG)
        assert x.shape == (3, 16, 16) and t.shape == (16, 16)
        pad = torch.ones(16, 16, dtype=torch.bool)
        pad[:h, :w] = False
        assert bool((t[pad] == 255).all()) and bool((x[:, pad] == 0).all())
        assert not bool((t[~pad] == 255).any())
        inner = t[:h, :w].numpy()
        assert set(np.unique(inner)) == {0, 1}
        red = x[0, :h, :w].numpy() > 0  # channel 0 above the mean: the red class (0)
        core = np.ones_like(inner, bool)  # columns two or more away from the boundary
        for dx in range(-2, 3):
            core &= np.roll(inner, dx, 1) == inner
        core[:, :2], core[:, -2:] = False, False
        assert core.any() and np.array_equal(red[core], inner[core] == 0)
        flips += int(inner[0, 0] == 1)  # the right-hand class on the left: mirrored
    assert 5 < flips < 25


def _official_photometric(img, g):
    """PhotoMetricDistortion.forward on a uint8 HWC array: the draws in the official order,
    each convert() clipped and truncated to uint8, saturation and hue through torchvision's
    functions on uint8 tensors, as the official code calls them."""
    import torchvision.transforms.functional as Fv

    def conv(v, alpha=1.0, beta=0.0):
        return np.clip(v.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def tv(fn, v, f):
        return fn(torch.tensor(v).permute(2, 0, 1), f).permute(1, 2, 0).numpy()

    if g.integers(2):
        img = conv(img, beta=g.uniform(-32, 32))
    mode = g.integers(2)
    if mode == 1 and g.integers(2):
        img = conv(img, alpha=g.uniform(0.5, 1.5))
    if g.integers(2):
        img = tv(Fv.adjust_saturation, img, g.uniform(0.5, 1.5))
    if g.integers(2):
        img = tv(Fv.adjust_hue, img, g.uniform(-0.5, 0.5))
    if mode == 0 and g.integers(2):
        img = conv(img, alpha=g.uniform(0.5, 1.5))
    return img.astype(np.float32)


def test_photometric_distortion_draws_as_dinov3s():
    """Brightness +-32, contrast x 0.5-1.5 first or last at random, saturation x 0.5-1.5, hue
    +-0.5, each with probability 0.5, in the official order of draws."""
    img = np.random.default_rng(1).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    seen = set()
    for seed in range(60):
        out = A.photometric(
            torch.from_numpy(img).permute(2, 0, 1), np.random.default_rng(seed), SEG
        )
        want = _official_photometric(img, np.random.default_rng(seed))
        assert out.dtype == torch.float32
        assert np.array_equal(out.permute(1, 2, 0).numpy(), want), seed
        seen.add(float(want.mean()))
    assert len(seen) > 30


def _depth_scene(h=48, w=64):
    depth = (1 + np.arange(h)[:, None] * 0.01 + np.arange(w)[None] * 1e-4).astype(np.float32)
    image = np.full((h, w, 3), 140, np.uint8)
    return image, depth


def test_depth_view_nyu_box_rotation_flip_and_native_crop():
    """NYUCrop's box (x 43..608, y 45..472 of 640x480) scaled to the image (int()), rotation
    by uniform(-2.5, 2.5) degrees with p 0.5 (the depth nearest neighbour, the corners 0: only
    measured values or 0), flip with p 0.5, a crop of exactly train_crop at a uniform offset,
    no resize of the depth."""
    import torchvision.transforms.functional as Fv
    from torchvision.transforms import InterpolationMode

    image, depth = _depth_scene(96, 128)
    y1, y2 = int(45 / 480 * 96), int(472 / 480 * 96)
    x1, x2 = int(43 / 640 * 128), int(608 / 640 * 128)
    box = depth[y1:y2, x1:x2]
    pre = _pixels().preprocessing
    rotated = corners = 0
    for seed in range(40):
        g = np.random.default_rng(seed)
        x, d = A.depth_view(image, depth, (40, 48), pre, np.random.default_rng(seed), DEPTH)
        assert x.shape == (3, 40, 48) and d.shape == (40, 48)
        ref = box
        if g.random() < 0.5:
            rotated += 1
            angle = g.uniform(-2.5, 2.5)
            t = torch.from_numpy(box.copy())[None]
            ref = Fv.rotate(t, angle, interpolation=InterpolationMode.NEAREST, fill=0.0)[0].numpy()
            assert set(np.unique(ref)) <= set(np.unique(box)) | {0.0}
            corners += bool((ref == 0).any())
        if g.random() < 0.5:
            ref = ref[:, ::-1]
        top, left = g.integers(0, box.shape[0] - 40 + 1), g.integers(0, box.shape[1] - 48 + 1)
        assert np.array_equal(d.numpy(), ref[top : top + 40, left : left + 48]), seed
    assert 5 < rotated < 35 and corners > 3


def test_depth_colour_change_as_dinov3s_coloraug():
    """ColorAug (p 0.5): x 255, ** U(0.9, 1.1), x U(0.75, 1.25), x U(0.9, 1.1) per channel,
    clipped to 0..255, / 255; then the backbone's normalisation."""
    image, depth = _depth_scene()
    pre = _pixels().preprocessing
    changed = 0
    for seed in range(30):
        g = np.random.default_rng(seed)
        x, _ = A.depth_view(image, depth, (20, 24), pre, np.random.default_rng(seed), DEPTH)
        if g.random() < 0.5:
            g.uniform(-2.5, 2.5)
        g.random()
        g.integers(0, 43 - 20 + 1), g.integers(0, 56 - 24 + 1)  # the crop's (box 43 x 56)
        v = np.full(3, 140 / 255)
        if g.random() < 0.5:
            changed += 1
            v = v * 255
            v = v ** g.uniform(0.9, 1.1) * g.uniform(0.75, 1.25) * g.uniform(0.9, 1.1, size=3)
            v = np.clip(v, 0, 255) / 255
        want = (v - np.array(pre.mean)) / np.array(pre.std)
        centre = x[:, 10, 12].double().numpy()  # away from any rotated corner
        np.testing.assert_allclose(centre, want, rtol=1e-5, atol=1e-5)
    assert 5 < changed < 25


def _spy_inputs(monkeypatch, bb):
    """Every batch the backbone embeds, as given."""
    seen = []
    grid = type(bb).patch_grid

    def spy(self, x):
        seen.append(x.clone())
        return grid(self, x)

    monkeypatch.setattr(type(bb), "patch_grid", spy)
    return seen


def test_training_views_change_at_every_step(tmp_path, monkeypatch):
    """augment dinov3: each step embeds fresh views of its images (24 training images, 6
    steps of 8: every image twice, never the same view twice); augment none embeds each
    training crop once, into the cache."""
    bb = _pixels()
    seen = _spy_inputs(monkeypatch, bb)
    p = LinsegParams(size=0, crop=0, stride=0, samples=48, batch_size=8, warmup_samples=8,
                     augment="dinov3")  # fmt: skip
    out = run_linseg(_inputs(bb, _bundle(n_test=1), tmp_path / "a"), p)
    train = [x for x in seen[1:] if x.shape[0] == 8]  # after the width probe: the 6 steps
    assert len(train) == 6 and all(x.shape[0] == 8 for x in train)
    views = torch.cat(train).flatten(1)
    assert len({tuple(v.tolist()) for v in views}) == 48
    assert out.details["tokens"] == "online" and "augmented online" in out.details["train_views"]
    seen.clear()
    p = LinsegParams(size=0, crop=0, stride=0, samples=48, batch_size=8, warmup_samples=8)
    out = run_linseg(_inputs(bb, _bundle(n_test=1), tmp_path / "b"), p)
    assert out.details["tokens"] == "cached" and "train_views" not in out.details


def test_same_seed_same_views_other_seed_other_views(tmp_path):
    """The views come from one generator seeded by the run's seed, drawn in order by the
    prefetching thread: a rerun gives the same head to the bit, another seed another."""
    from dataclasses import replace

    p = LinsegParams(size=0, crop=0, stride=0, samples=48, batch_size=8, warmup_samples=8,
                     augment="dinov3", dropout=0.0)  # fmt: skip
    runs = []
    for k, seed in enumerate((0, 0, 1)):
        inp = replace(_inputs(_pixels(), _bundle(n_test=2), tmp_path / str(k)), seed=seed)
        torch.manual_seed(0)  # the head's initialisation (the runner seeds it per run)
        runs.append(run_linseg(inp, p).details["final_loss"])
    assert runs[0] == runs[1] != runs[2]
    bundle = _bundle(n_test=1)
    views = {}
    for seed in (0, 0, 1):
        inp = replace(_inputs(_pixels(), bundle, tmp_path / "v"), seed=seed)
        src = A.OnlineViews(inp, bundle.dense, "segmentation", "dinov3", 16)
        views.setdefault(seed, []).append(src.views(np.arange(8))[0])
    assert torch.equal(*views[0]) and not torch.equal(views[0][0], views[1][0])


@pytest.mark.slow
def test_augmented_runs_learn(tmp_path):
    """On pixel tokens, the augmented linear heads beat the same heads left untrained."""
    kw = dict(size=0, crop=0, stride=0, samples=480, batch_size=8, warmup_samples=16,
              augment="dinov3", dropout=0.0)  # fmt: skip
    seg = {
        lr: run_linseg(
            _inputs(_pixels(), _bundle(), tmp_path / f"s{lr}"), LinsegParams(lr=lr, **kw)
        )
        for lr in (0.05, 1e-12)
    }
    assert seg[0.05].metrics["miou"] > 0.9 > seg[1e-12].metrics["miou"] + 0.3
    kw = dict(size=0, samples=480, batch_size=8, warmup_samples=40, sigloss_warmup_samples=40,
              bins=64, max_depth=4.0, augment="dinov3", train_crop=(12, 12))  # fmt: skip
    depth = {
        lr: run_lindepth(
            _inputs(_pixels(), _bundle("depth"), tmp_path / f"d{lr}"), LindepthParams(lr=lr, **kw)
        )
        for lr in (0.05, 1e-12)
    }
    assert depth[0.05].metrics["rmse"] < 0.5 < 0.9 < depth[1e-12].metrics["rmse"]
    assert depth[0.05].details["train_view_size"] == [12, 12]


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda: LinsegParams(augment="mmseg"), "augment is one of none, dinov3, not 'mmseg'"),
        (lambda: LindepthParams(augment="dinov3"), "needs train_crop [h, w]"),
        (lambda: LindepthParams(augment="dinov3", train_crop=(0, 4)), "needs train_crop"),
        (lambda: LindepthParams(train_crop=(416, 544)), "train_crop is the augmented views'"),
    ],
)
def test_params_refused_in_one_line(make, says):
    with pytest.raises(UserError) as e:
        make()
    assert says in str(e.value) and "\n" not in str(e.value)


def test_runs_refused_in_one_line(tmp_path):
    """A train_crop larger than the images after the NYU box, and one the backbone cannot
    take (a ViT of fixed 16 px input), are refused before or at the first batch."""
    p = LindepthParams(size=0, samples=16, batch_size=8, warmup_samples=8, bins=8,
                       max_depth=4.0, augment="dinov3", train_crop=(15, 15))  # fmt: skip
    with pytest.raises(UserError, match="smaller than train_crop 15x15") as e:
        run_lindepth(_inputs(_pixels(), _bundle("depth"), tmp_path / "a"), p)
    assert "\n" not in str(e.value)
    p = LindepthParams(size=0, samples=16, batch_size=8, warmup_samples=8, bins=8,
                       max_depth=4.0, augment="dinov3", train_crop=(8, 12))  # fmt: skip
    with pytest.raises(UserError, match=r"does not take 8x12 inputs .*set train_crop") as e:
        run_lindepth(_inputs(_tiny_vit(), _bundle("depth"), tmp_path / "b"), p)
    assert "\n" not in str(e.value)


def test_augment_none_leaves_the_setting_as_it_was():
    """augment none (and train_crop ()) are the NEUTRAL values: out of a card's params, so a
    card that does not augment keeps its setting; the shipped cards augment and say so."""
    from ssl_eval.protocols.cards import load_card

    card = load_card("linseg@dinov3", ["augment=none"])
    assert "augment" not in card.params_dict()
    card = load_card("lindepth@dinov3", ["augment=none", "train_crop=[]"])
    assert not {"augment", "train_crop"} & set(card.params_dict())
    seg, depth = load_card("linseg@dinov3"), load_card("lindepth@dinov3")
    assert seg.params_dict()["augment"] == "dinov3" and seg.version == 4
    assert depth.params_dict()["train_crop"] == [416, 544] and depth.version == 4
