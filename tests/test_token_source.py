"""The token source (features/tokens.py): cached within the budget, streamed beyond it, the same
values either way, and both equal to the model's own forward_features read by hand."""

import numpy as np
import pytest
import timm
import torch

from ssl_eval.backbones.base import Backbone
from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import DatasetBundle, ImageSplit
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.features.tokens import token_key, token_source

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _backbone(size=16, reg=0, seed=0) -> Backbone:
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=size,
        patch_size=4,
        embed_dim=16,
        depth=1,
        num_heads=2,
        reg_tokens=reg,
        num_classes=0,
    )
    return Backbone(f"tiny-vit-{seed}", model, Preprocessing(crop=size, mean=MEAN, std=STD))


def _bundle(n=10, size=16) -> DatasetBundle:
    g = np.random.default_rng(0)
    imgs = g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    split = ImageSplit(np.arange(n) % 3, imgs)
    return DatasetBundle("toy", ["a", "b", "c"], split, split, {"toy": 1})


def _by_hand(bb: Backbone, imgs: np.ndarray, prefix: int) -> np.ndarray:
    """forward_features of the normalised images, prefix dropped, as an (N, h, w, D) grid,
    rounded through float16: independent of ssl-eval's token reading."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = bb.model.forward_features(x)
    side = int(round((out.shape[1] - prefix) ** 0.5))
    return out[:, prefix:].reshape(len(x), side, side, -1).half().float().numpy()


def _all(src, order=None, bs=None):
    rows, toks, pres = [], [], []
    for r, t, p in src.batches(order, bs):
        rows.append(r)
        toks.append(t.numpy())
        pres.append(None if p is None else p.numpy())
    return np.concatenate(rows), np.concatenate(toks), pres


def test_cached_and_streamed_give_the_same_tokens_and_the_models_own(tmp_path):
    bb, ds = _backbone(reg=2), _bundle()
    rows = np.array([7, 1, 4, 2, 9, 0])
    kw = {"device": CPU, "batch_size": 4, "cache_dir": tmp_path}
    cached = token_source(bb, ds, "train", rows, budget_bytes=10**9, **kw)
    streamed = token_source(bb, ds, "train", rows, budget_bytes=0, **kw)
    assert cached.cached and not streamed.cached
    assert (cached.path / "tokens.npy").is_file() and streamed.path is None
    # the bank's size from the shapes: 6 rows x (4x4 patches + cls + 2 registers) x 16 x 2 bytes
    assert cached.nbytes == streamed.nbytes == 6 * (16 + 3) * 16 * 2
    assert cached.record()["tokens"] == "cached" and streamed.record()["tokens"] == "streamed"
    assert cached.grid == (4, 4) and cached.dim == 16 and cached.num_prefix == 3
    # in the cache's own batches, bit-equal; both equal to forward_features read by hand
    r1, t1, p1 = _all(cached)
    r2, t2, p2 = _all(streamed)
    np.testing.assert_array_equal(r1, rows)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(np.concatenate(p1), np.concatenate(p2))
    np.testing.assert_allclose(t1, _by_hand(bb, ds.train.images[rows], 3), atol=2e-3)
    # any order and batch size: the rows asked for, in that order
    order = np.array([2, 9, 7, 0])
    r3, t3, _ = _all(cached, order, 3)
    r4, t4, _ = _all(streamed, order, 3)
    np.testing.assert_array_equal(r3, order)
    np.testing.assert_array_equal(t3, t1[[3, 4, 0, 5]])
    np.testing.assert_allclose(t4, t3, atol=2e-3)


def test_second_source_reuses_the_entry_and_a_damaged_one_is_rebuilt(tmp_path):
    bb, ds = _backbone(), _bundle()
    kw = {"budget_bytes": 10**9, "device": CPU, "batch_size": 4, "cache_dir": tmp_path}
    a = token_source(bb, ds, "train", None, **kw)
    b = token_source(bb, ds, "train", None, **kw)
    assert not a.cache_hit and b.cache_hit and a.path == b.path
    assert a.num_prefix == 1
    _, ta, _ = _all(a)
    a._bank = None
    with open(b.path / "tokens.npy", "r+b") as f:  # one flipped byte in the bank
        f.seek(-3, 2)
        f.write(b"\x7f")
    c = token_source(bb, ds, "train", None, **kw)
    assert not c.cache_hit
    np.testing.assert_array_equal(_all(c)[1], ta)


def test_the_key_changes_with_weights_size_rows_and_batch(tmp_path):
    ds = _bundle()
    rows = np.arange(5)
    base = token_key(_backbone(), ds, "train", rows, CPU, 4)
    assert token_key(_backbone(), ds, "train", rows, CPU, 4) == base
    for other in (
        token_key(_backbone(seed=1), ds, "train", rows, CPU, 4),
        token_key(_backbone(size=12), _bundle(size=12), "train", rows, CPU, 4),
        token_key(_backbone(), ds, "train", rows[:4], CPU, 4),
        token_key(_backbone(), ds, "train", rows, CPU, 8),
        token_key(_backbone(), ds, "test", rows, CPU, 4),
    ):
        assert other != base
    assert base["output"] == "patch-grid" and base["dtype"] == "float16"


def test_a_backbone_without_patch_tokens_is_one_line(tmp_path):
    from ssl_eval.backbones import BuildOptions, build_backbone

    bb = build_backbone("pixels", BuildOptions(image_size=16))
    with pytest.raises(UserError) as e:
        token_source(
            bb, _bundle(), "train", budget_bytes=0, device=CPU, batch_size=4, cache_dir=tmp_path
        )
    assert "\n" not in str(e.value) and "forward_features" in str(e.value)
