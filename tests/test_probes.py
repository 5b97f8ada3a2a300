"""Invariance probes and label-free diagnostics: the numbers mean what they say on backbones
whose answer is known by construction."""

import numpy as np
import pytest
import torch
from torch import nn

from ssl_eval.backbones.base import Backbone
from ssl_eval.cli import main
from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.data.splits import stratified_val_split
from ssl_eval.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ssl_eval.protocols import ImageInputs
from ssl_eval.protocols.diagnostics import alignment, rankme, uniformity
from ssl_eval.protocols.invariance import InvarianceParams, run_invariance

SMALL = InvarianceParams(train_images=300, val_images=100, test_images=200)


class Flat(nn.Module):
    def __init__(self, gray=False, flip_sum=False):
        super().__init__()
        self.gray, self.flip_sum = gray, flip_sum

    def forward(self, x):
        if self.gray:
            x = x.mean(dim=1, keepdim=True)
        if self.flip_sum:
            x = x + x.flip(-1)
        return x.flatten(1)


def _bb(tag, **kw):
    pre = Preprocessing(resize=16, crop=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Backbone(tag, Flat(**kw), pre)


@pytest.fixture(scope="module")
def shapes():
    b = get_dataset("shapes", DatasetOptions())
    tr, va = stratified_val_split(b.train.labels, 0.1, 0)
    return b, tr, va


def _probe(shapes, bb, p=SMALL):
    b, tr, va = shapes
    inp = ImageInputs(bb, b, tr, va, torch.device("cpu"), 0, None)
    return run_invariance(inp, p).metrics


@pytest.mark.slow
def test_grayscale_pixels_cannot_tell_colours_apart(shapes):
    rgb, gray = _probe(shapes, _bb("rgb")), _probe(shapes, _bb("gray", gray=True))
    assert rgb["decode_colour"] > gray["decode_colour"] + 0.2, (rgb, gray)


@pytest.mark.slow
def test_flip_invariant_by_construction_scores_one(shapes):
    sym, plain = _probe(shapes, _bb("sym", flip_sum=True)), _probe(shapes, _bb("plain"))
    assert sym["inv_flip"] > 0.999 and plain["inv_flip"] < 0.9, (sym["inv_flip"], plain["inv_flip"])


def test_invariance_refuses_a_dataset_without_factors():
    b = get_dataset("digits", DatasetOptions())
    tr, va = stratified_val_split(b.train.labels, 0.1, 0)
    inp = ImageInputs(_bb("x"), b, tr, va, torch.device("cpu"), 0, None)
    with pytest.raises(UserError, match="several factor labels"):
        run_invariance(inp, SMALL)


def test_rankme_of_a_rank_r_matrix_and_the_papers_formula():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(200, 3)))
    x = q @ np.diag([5.0, 5.0, 5.0]) @ np.linalg.qr(rng.normal(size=(64, 3)))[0].T
    assert rankme(x) == pytest.approx(3.0, abs=1e-3)
    y = rng.normal(size=(300, 20)) * np.linspace(0.1, 3, 20)
    s = np.linalg.svd(y, compute_uv=False)
    p = s / (s.sum() + 1e-7) + 1e-7
    assert rankme(y) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)


def test_alignment_and_uniformity():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(100, 16))
    assert alignment(a, a) == pytest.approx(0.0, abs=1e-12)
    assert alignment(a, -a) == pytest.approx(4.0)
    collapsed = np.ones((50, 8))
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-9)
    assert uniformity(rng.normal(size=(200, 32))) < -2.0


@pytest.mark.slow
def test_probes_from_the_cli_reach_the_leaderboard(tmp_path, capsys):
    r = tmp_path / "r"
    args = [
        "run",
        "--backbone",
        "pixels",
        "--dataset",
        "shapes",
        "--protocol",
        "invariance,diagnostics",
    ]
    args += ["--image-size", "16", "--no-progress", "--results-dir", str(r)]
    args += ["--set", "train_images=300", "--set", "val_images=100", "--set", "test_images=200"]
    args += ["--set", "images=200"]
    assert main(args) == 0
    md = (r / "leaderboard.md").read_text()
    assert "## Invariance probes and label-free diagnostics" in md
    row = next(line for line in md.splitlines() if line.startswith("| pixels |"))
    assert len(row.split("|")) == 2 + 1 + 12  # 4 decode + 5 inv + 3 diagnostics
    assert (r / "probes.csv").is_file()


def test_augmented_probe_images_are_kept_per_input_and_handed_out_as_copies():
    """augment_all keeps its last results for the next backbone: a repeat is the image-by-image
    augmentation's bytes, a caller writing into its array leaves the next caller's intact, and
    each input the output depends on (bytes, indices, augmentation, seed, strength) is a new
    computation."""
    from ssl_eval.data import views

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 20, 20, 3), np.uint8)
    idx = np.arange(100, 112)
    s = {"crop_scale": (0.3, 1.0), "jitter": 0.6, "hue": 0.4, "blur_sigma": 1.0}

    def by_hand(images, indices, aug, seed, strength):
        return np.stack(
            [
                views.augment(torch.from_numpy(im).permute(2, 0, 1), aug, seed, int(i), strength)
                .permute(1, 2, 0)
                .numpy()
                for im, i in zip(images, indices, strict=True)
            ]
        )

    views._MEMO.clear()
    first = views.augment_all(imgs, idx, "crop", 0, s)
    assert len(views._MEMO) == 1 and np.array_equal(first, by_hand(imgs, idx, "crop", 0, s))
    first[:] = 0  # the caller's array is its own (diagnostics flips in place)
    again = views.augment_all(imgs, idx, "crop", 0, s)
    assert len(views._MEMO) == 1 and np.array_equal(again, by_hand(imgs, idx, "crop", 0, s))
    other = imgs.copy()
    other[3, 5, 5, 0] ^= 1
    for args in (
        (other, idx, "crop", 0, s),
        (imgs, idx + 1, "crop", 0, s),
        (imgs, idx, "colour", 0, s),
        (imgs, idx, "crop", 1, s),
        (imgs, idx, "crop", 0, {**s, "crop_scale": (0.5, 1.0)}),
    ):
        assert np.array_equal(views.augment_all(*args), by_hand(*args))
    assert len(views._MEMO) == 6
    views._MEMO_BYTES, budget = 3 * imgs.nbytes, views._MEMO_BYTES  # bounded in bytes
    try:
        for n in range(5):
            views.augment_all(imgs, idx, "flip", n, s)
        assert len(views._MEMO) == 3 and list(views._MEMO.values())[0].nbytes == imgs.nbytes
        big = np.zeros((48, 20, 20, 3), np.uint8)  # more than the budget: computed, not kept
        assert np.array_equal(views.augment_all(big, np.arange(48), "flip", 0, s), big[:, :, ::-1])
        assert len(views._MEMO) == 3
    finally:
        views._MEMO_BYTES = budget
        views._MEMO.clear()
