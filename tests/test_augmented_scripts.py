"""linear_aug against the scripts' own data rules, written out here (not ssl-eval's functions):

* ``stream`` with ``iterations`` (linear_aug@dinov2, @dinov3): facebookresearch/dinov2
  dinov2/data/samplers.py (ShardedInfiniteSampler, the sampler dinov2/eval/linear.py asks for)
  and facebookresearch/dinov3 dinov3/data/samplers.py (InfiniteSampler): on one process, an
  endless sequence of permutations of the training rows, one drawn per pass, read through by a
  DataLoader in batches of ``batch`` (drop_last never bites: the sequence has no end), for
  epochs x epoch_length iterations; CosineAnnealingLR(max_iter) stepped after each iteration;
  the heads scored every eval_period_iterations (``(iteration + 1) % eval_period == 0``, not
  on the last) and after the loop.
"""

import dataclasses

import numpy as np
import pytest
import torch
from test_augmented_recipes import EPOCHWISE, _stream_run
from test_augmented_recipes import eval_linear_lrs as script_lrs  # CosineAnnealingLR per step

from ssl_eval.core.errors import UserError
from ssl_eval.protocols import augmented
from ssl_eval.protocols.augmented import AugmentedParams

# ------------------------------------------------------------- DINOv2's / DINOv3's sampler


def infinite_sampler_batches(perms: list[list[int]], batch: int, max_iter: int) -> list:
    """The script's first ``max_iter`` batches: the permutations of the passes one after
    another (InfiniteSampler's ``while True: yield from randperm``), cut every ``batch`` rows
    whatever pass they come from; each row as (pass, index)."""
    sequence = [(q, i) for q, perm in enumerate(perms) for i in perm]
    assert len(sequence) >= batch * max_iter
    return [sequence[k * batch : (k + 1) * batch] for k in range(max_iter)]


def script_eval_points(max_iter: int, eval_period: int) -> list[int]:
    """The iterations done when dinov2/eval/linear.py (and dinov3's) scores the heads: inside
    the loop after iteration i when (i + 1) % eval_period == 0 and i != max_iter - 1, then
    once after the loop."""
    inside = [
        i + 1
        for i in range(max_iter)
        if eval_period > 0 and (i + 1) % eval_period == 0 and i != max_iter - 1
    ]
    return inside + [max_iter]


# 96 training rows, batches of 40: 7 iterations read 280 rows, the end of pass 2
DINO_STREAM = dataclasses.replace(
    EPOCHWISE,
    stream=True,
    iterations=7,
    eval_period=3,
    lr_update="step",
    drop_last=True,
    forward_batch=40,
)


@pytest.fixture(scope="module")
def dino_stream_run(tmp_path_factory):
    return _stream_run(tmp_path_factory.mktemp("dino_stream"), DINO_STREAM)


SLOW_FIXTURES = ("dino_stream_run",)


def test_stream_with_iterations_is_the_infinite_samplers_batches(dino_stream_run):
    rows, lrs, out = dino_stream_run
    n, batch, max_iter = 96, 40, 7
    perms = [augmented.pass_order(0, q, n) for q in range(3)]  # a new permutation each pass
    theirs = infinite_sampler_batches(perms, batch, max_iter)
    assert rows == [list(b) for b in theirs]
    assert {q for q, _ in rows[2]} == {0, 1} and {q for q, _ in rows[4]} == {1, 2}  # crossing
    assert out.details["steps"] == max_iter == len(lrs)
    assert out.details["stream"] == {"passes": 3, "scored_at": [3, 6, 7]}


def test_stream_with_iterations_steps_torchs_cosine_every_iteration(dino_stream_run):
    _, lrs, _ = dino_stream_run
    for h, (base, _) in enumerate(DINO_STREAM.settings()):
        want = script_lrs(base * 40 / 256, 7)
        got = [float(lr[h]) for lr in lrs]
        assert got == pytest.approx(want, rel=1e-6), h


def test_stream_heads_scored_at_the_scripts_eval_points(dino_stream_run):
    _, _, out = dino_stream_run
    history = out.details["history"]
    assert [e["steps_done"] for e in history] == script_eval_points(7, 3) == [3, 6, 7]


@pytest.mark.parametrize(
    ("iterations", "period", "ends"),
    [
        (12_500, 1250, [1250 * k for k in range(1, 11)]),  # the scripts' defaults
        (12_500, 0, None),  # eval_period 0: a scoring when each pass's last batch is done
        (10, 4, [4, 8, 10]),
        (3, 1250, [3]),  # fewer iterations than the period: scored at the end only
    ],
)
def test_scoring_points_of_a_stream(iterations, period, ends):
    from ssl_eval.protocols._aug_grid import schedule, stream_ends

    p = AugmentedParams(
        stream=True,
        iterations=iterations,
        eval_period=period,
        warmup_epochs=0.0,
        optimizer="sgd",
    )
    n, batch = 1_281_167, 1024
    got = stream_ends(p, n, batch)
    if ends is None:  # after the batch holding each pass's last row, the last at 12,500
        ends = [(q + 1) * n // batch for q in range(9)] + [12_500]  # pass 10 cut short
        assert ends[:3] == [1251, 2502, 3753]
    else:
        assert ends == script_eval_points(iterations, period)
    assert got == ends
    assert schedule(n // batch, p, n, batch) == (len(ends), iterations)


def test_a_stream_fills_every_batch_on_fewer_rows_than_a_batch(tmp_path):
    """InfiniteSampler fills the script's 1024 rows whatever the dataset's size: a batch larger
    than the 96 training rows spans passes, and the lr scales with the full batch."""
    p = dataclasses.replace(
        DINO_STREAM, batch_size=200, forward_batch=200, iterations=2, eval_period=0
    )
    rows, lrs, out = _stream_run(tmp_path, p)
    perms = [augmented.pass_order(0, q, 96) for q in range(5)]
    assert rows == [list(b) for b in infinite_sampler_batches(perms, 200, 2)]
    assert out.details["batch"] == 200 and {q for q, _ in rows[1]} == {2, 3, 4}
    assert float(lrs[0][0]) == pytest.approx(p.base_lrs[0] * 200 / 256, rel=1e-6)
    # one scoring where a batch ends two passes (pass ends after steps 0, 0, 1, 1, 2 -> 1, 2)
    assert out.details["stream"]["scored_at"] == [1, 2]


def test_eval_period_needs_a_stream():
    with pytest.raises(UserError, match="eval_period"):
        AugmentedParams(eval_period=10)
    with pytest.raises(UserError, match="eval_period"):
        AugmentedParams(stream=True, warmup_epochs=0.0, optimizer="sgd", eval_period=-1)
    # a stream with a fixed iteration count is the DINO scripts' sampler: accepted
    AugmentedParams(stream=True, iterations=10, warmup_epochs=0.0, optimizer="sgd")


# ------------------------------------------------------------- SimCLR's crops and resize
# google-research/simclr@383d414 data_util.py (TF1): crop_and_resize calls
# tf.image.sample_distorted_bounding_box(shape, [[[0, 0, 1, 1]]], min_object_covered=0.1,
# aspect_ratio_range=(3/4, 4/3), area_range=(0.08, 1.0), max_attempts=100,
# use_image_if_no_bounding_boxes=True), then tf.image.resize_bicubic to 224; center_crop cuts
# rint(0.875 x the shorter side) square at ((H - h + 1) // 2, (W - w + 1) // 2).

# TensorFlow 2.21 (tf.image.sample_distorted_bounding_box with SimCLR's arguments), 4000
# draws per shape: the mean area share and the mean aspect ratio w / h of the boxes
TF_BOX_MEANS = {
    (375, 500): (0.3882, 1.0440),
    (500, 333): (0.3376, 1.0451),
    (32, 32): (0.4267, 1.0448),
}


def _simclr_boxes(hw, n=4000, scale=(0.08, 1.0)):
    from ssl_eval.protocols._images import CROPS

    g = torch.Generator().manual_seed(11)
    return np.array([CROPS["simclr"](hw, scale, g) for _ in range(n)])


@pytest.mark.parametrize("hw", list(TF_BOX_MEANS))
def test_simclr_boxes_follow_sample_distorted_bounding_box(hw):
    H, W = hw
    boxes = _simclr_boxes(hw)
    top, left, h, w = boxes.T
    inside = (top >= 0) & (left >= 0) & (top + h <= H) & (left + w <= W)
    assert inside.all()
    # TF's corner is Uniform(H - h): [0, H - h), so a box short of the image never touches
    # the bottom (or right) edge
    assert ((top < H - h) | (h == H)).all() and ((left < W - w) | (w == W)).all()
    share = h * w / (H * W)
    # area_range 0.08-1, and min_object_covered 0.1 of the whole image: at least 10%
    assert share.min() >= 0.1 and share.max() <= 1.0
    # the width is the height times an aspect ratio in [3/4, 4/3], rounded (lrintf)
    assert (w >= np.rint(h * np.float32(0.75))).all()
    assert (w <= np.rint(h * np.float32(4 / 3))).all()
    # the distribution: the height uniform between the smallest and largest area's, the
    # ratio uniform (not log-uniform) in the range, as TF's draws show
    area, ratio = TF_BOX_MEANS[hw]
    assert share.mean() == pytest.approx(area, abs=0.015)
    assert (w / h).mean() == pytest.approx(ratio, abs=0.012)


def test_simclr_box_falls_back_to_the_whole_image_after_100_attempts(monkeypatch):
    from ssl_eval.protocols import _images

    tries, one = [], _images._tf_crop

    def counted(*a):
        tries.append(1)
        return one(*a)

    monkeypatch.setattr(_images, "_tf_crop", counted)
    # areas of at most 9%: every box misses min_object_covered 0.1
    assert _simclr_boxes((40, 50), n=3, scale=(0.08, 0.09)).tolist() == [[0, 0, 40, 50]] * 3
    assert len(tries) == 300
    # a 1 x 20 strip: a box within the aspect range is at most 1 x 1, 5% of it
    assert _simclr_boxes((1, 20), n=3).tolist() == [[0, 0, 1, 20]] * 3


@pytest.mark.parametrize(
    ("hw", "box"),
    [
        ((375, 500), (24, 86, 328, 328)),  # rint(328.125) = 328; (375 - 328 + 1) // 2 = 24
        ((500, 333), (105, 21, 291, 291)),  # rint(0.875 x 333 = 291.375)
        ((32, 32), (2, 2, 28, 28)),
        ((12, 20), (1, 5, 10, 10)),  # 0.875 x 12 = 10.5: tf.rint rounds half to even
        ((4, 9), (0, 3, 4, 4)),  # 3.5 -> 4 (even); the odd extra pixel goes below / right
    ],
)
def test_simclr_centre_crop_box(hw, box):
    from ssl_eval.protocols._tf_crops import simclr_centre_box

    assert simclr_centre_box(*hw, 0.875) == box


# TensorFlow 2.21's tf.compat.v1.image.resize_bicubic (TF1's, legacy) of this 5 x 6 image
# (as convert_image_dtype's float / 255), times 255
SMALL = [[12, 200, 37, 90, 255, 3], [44, 18, 160, 77, 9, 130], [250, 61, 5, 199, 120, 66],
         [71, 140, 222, 33, 58, 247], [0, 95, 180, 15, 210, 101]]  # fmt: skip
TF1_3X4 = [[12.0, 131.1562, 90.0, 144.4688], [206.8849, 2.5115, 178.3589, 66.3213],
           [28.7843, 214.6889, 8.8952, 168.4933]]  # fmt: skip


def test_tf1_bicubic_is_tensorflows_legacy_resize():
    from ssl_eval.protocols._tf_crops import tf1_bicubic, tf1_weights

    x = torch.tensor(SMALL, dtype=torch.float64) / 255
    got = tf1_weights(5, 3) @ x @ tf1_weights(6, 4).T * 255
    np.testing.assert_allclose(got.numpy(), TF1_3X4, atol=1e-3)
    # the uint8 path: TF's values rounded (none within 0.01 of a tie)
    img = torch.tensor(SMALL, dtype=torch.uint8)[None].expand(3, 5, 6)
    want = torch.tensor(np.clip(np.rint(TF1_3X4), 0, 255), dtype=torch.uint8)
    assert torch.equal(tf1_bicubic(img, (3, 4)), want.expand(3, 3, 4))
    # the rule: output i reads input i x in / out (no half-pixel offset), Keys' kernel with
    # a = -0.75, edge taps clamped. Doubling: even outputs copy, odd ones are at 1/2
    w = tf1_weights(6, 12).numpy()
    a = -0.75
    near = ((a + 2) * 0.5 - (a + 3)) * 0.25 + 1  # kernel at 1/2: 0.59375
    far = ((a * 1.5 - 5 * a) * 1.5 + 8 * a) * 1.5 - 4 * a  # at 3/2: -0.09375
    assert (near, far) == (0.59375, -0.09375)
    for k in range(6):
        want = np.zeros(6)
        want[k] = 1.0
        np.testing.assert_allclose(w[2 * k], want, atol=1e-7)
    np.testing.assert_allclose(w[5, [1, 2, 3, 4]], [far, near, near, far], atol=1e-6)
    # torch's bicubic (half-pixel centres) is not this resize: 4 grey levels off and more
    torch_up = torch.nn.functional.interpolate(
        x[None, None], (3, 4), mode="bicubic", align_corners=False
    )[0, 0]
    assert float((torch_up * 255 - torch.tensor(TF1_3X4)).abs().max()) > 4


def test_simclr_cards_images_are_the_scripts(tmp_path):
    """linear@simclr's training crops and evaluation images: SimCLR's box rule, TF1's resize,
    center_crop's box at 0.875 (pixels rounded to uint8)."""
    from ssl_eval.data.datasets import ImageSplit
    from ssl_eval.data.transforms import Preprocessing
    from ssl_eval.protocols._tf_crops import ScriptImages, tf1_bicubic
    from ssl_eval.protocols.cards import load_card

    p = load_card("linear@simclr").params
    assert (p.crop, p.crop_interpolation, p.eval_interpolation) == (
        "simclr", "tf1_bicubic", "tf1_bicubic",
    )  # fmt: skip
    assert p.eval_crop_fraction == 0.875
    rng = np.random.default_rng(0)
    split = ImageSplit(np.arange(3) % 2, rng.integers(0, 255, (3, 37, 50, 3), np.uint8))
    pre = Preprocessing(resize=18, crop=16, interpolation="bilinear")
    ev = augmented.probe_images(split, np.arange(3), pre, 0, False, p)
    tr = augmented.probe_images(split, np.arange(3), pre, 5, True, p)
    assert isinstance(ev, ScriptImages) and isinstance(tr, ScriptImages)
    full = torch.from_numpy(split.images[1]).permute(2, 0, 1)
    # center_crop: side rint(0.875 x 37) = 32, corner ((37 - 32 + 1) // 2, (50 - 32 + 1) // 2)
    assert torch.equal(ev[1][0], tf1_bicubic(full[:, 3:35, 9:41], (16, 16)))
    img, _ = tr[1]
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
