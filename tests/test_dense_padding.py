"""lindepth's ``pad: center``: DINOv3's depth wrapper centre-pads every input to a multiple of
the ViT's patch (dinov3 @ 6876159, eval/depth/models/encoder.py's default
PatchSizeAdaptationStrategy.CENTER_PADDING, embed.py CenterPadding). The padding is checked
against that module written out here; a ViT whose sides the patch does not divide runs padded
and is refused unpadded; the record says what was done; the token cache keys on it."""

import itertools
import math

import numpy as np
import pytest
import timm
import torch
from test_dense_probes import CPU, _bundle, _inputs

from ssl_eval.backbones.base import Backbone
from ssl_eval.core.errors import UserError
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.features.tokens import token_key
from ssl_eval.protocols.dense.common import center_pad, center_padded
from ssl_eval.protocols.depth import LindepthParams, run_lindepth


def official_center_padding(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """embed.py's CenterPadding.forward: for the last two sides (W, then H), the new size is
    ceil(size / multiple) * multiple, the pad split left = pad // 2, right = the rest."""

    def get_pad(size):
        new = math.ceil(size / multiple) * multiple
        pad = new - size
        return pad // 2, pad - pad // 2

    pads = list(itertools.chain.from_iterable(get_pad(m) for m in x.shape[:-3:-1]))
    return torch.nn.functional.pad(x, pads)


@pytest.mark.parametrize("h, w, m", [(480, 640, 14), (481, 639, 14), (416, 544, 16), (27, 16, 4)])
def test_center_pad_is_the_official_center_padding(h, w, m):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(h + w))
    got, want = center_pad(x, m), official_center_padding(x, m)
    assert got.shape == want.shape and torch.equal(got, want)
    assert got.shape[-2] % m == 0 and got.shape[-1] % m == 0


def _any_size_vit():
    """A ViT of patch 4 that takes any multiple of 4 (the input-size behaviour of the DINO and
    DINOv2 tags), none other."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=16,
                              patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0,
                              dynamic_img_size=True)  # fmt: skip
    return Backbone("tiny-any-vit", model, Preprocessing(crop=16))


def test_lindepth_runs_padded_where_the_patch_does_not_divide_and_says_so(tmp_path):
    """Test images of 16x27 under mode whole: 27 is no multiple of 4, refused unpadded in one
    line; with pad center each is read padded to 16x28 (a 4x7 grid), scored at 16x27, and the
    record names the padding."""
    kw = dict(size=0, mode="whole", samples=16, batch_size=8, warmup_samples=8, bins=8,
              max_depth=4.0, sigloss_warmup_samples=8)  # fmt: skip
    with pytest.raises(UserError, match="does not take 16x27") as e:
        run_lindepth(
            _inputs(_any_size_vit(), _bundle("depth"), tmp_path / "a"), LindepthParams(**kw)
        )
    assert "\n" not in str(e.value)
    grids = []
    bb = _any_size_vit()
    read = bb.patch_grid

    out = run_lindepth(
        _inputs(bb, _bundle("depth"), tmp_path / "b"), LindepthParams(pad="center", **kw)
    )
    assert out.details["input_padding"].startswith("centre-padded with zeros to multiples of 4")
    assert len(out.per_sample["rmse"]) == 4 and np.isfinite(out.metrics["rmse"])
    padded = center_padded(bb)
    x = torch.randn(1, 3, 16, 27)
    with torch.no_grad():
        g = padded.patch_grid(x)
        grids.append(g.grid)
        assert torch.equal(g.tokens, read(official_center_padding(x, 4)).tokens)
    assert grids == [(4, 7)]


def test_pad_center_leaves_a_cnn_and_a_divisible_size_alone(tmp_path):
    """A model without a patch is not padded (the record says so); sizes the patch divides are
    fed unchanged (DINOv3's ViT/16 at 416x544 and 480x640)."""
    from test_dense_probes import _pixels

    kw = dict(size=0, mode="whole", samples=16, batch_size=8, warmup_samples=8, bins=8,
              max_depth=4.0, sigloss_warmup_samples=8)  # fmt: skip
    plain = run_lindepth(_inputs(_pixels(), _bundle("depth"), tmp_path / "a"), LindepthParams(**kw))
    padded = run_lindepth(
        _inputs(_pixels(), _bundle("depth"), tmp_path / "b"), LindepthParams(pad="center", **kw)
    )
    assert padded.details["input_padding"].startswith("none: the model has no timm patch embedding")
    assert padded.metrics == plain.metrics
    assert all(np.array_equal(padded.per_sample[k], plain.per_sample[k]) for k in plain.per_sample)
    x = torch.randn(1, 3, 416, 544)
    assert center_pad(x, 16) is x


def test_the_token_cache_keys_on_the_padding(tmp_path):
    """Padded tokens are other tokens: their cache entry has another key; an unpadded backbone
    keeps the key it had (no padding field)."""
    bb, bundle = _any_size_vit(), _bundle("depth")
    rows = np.arange(4)
    plain = token_key(bb, bundle, "train", rows, CPU, 8)
    padded = token_key(center_padded(bb), bundle, "train", rows, CPU, 8)
    assert "input_padding" not in plain and padded["input_padding"] == {"center": 4}
    assert {k: v for k, v in padded.items() if k != "input_padding"} == plain


def test_pad_is_checked():
    with pytest.raises(UserError, match="pad is one of none, center, not 'reflect'"):
        LindepthParams(pad="reflect")


def test_a_hugging_face_vit_is_padded_to_its_patch_too(tmp_path):
    """transformers' DINOv2 takes any size but floors a side its patch does not divide (the
    last pixels dropped, the output then stretched over them): pad center pads it to its
    config's patch as the official wrapper pads any ViT, the grid of the padded input."""
    pytest.importorskip("transformers")
    from test_hf_models import save

    from ssl_eval.backbones.catalog import build_backbone

    bb = build_backbone(f"hf:{save(tmp_path / 'd', 'dinov2')}")  # patch 8
    padded = center_padded(bb)
    assert getattr(padded, "pad_multiple", 0) == 8
    x = torch.randn(1, 3, 36, 44)
    with torch.no_grad():
        g = padded.patch_grid(x)
        assert g.grid == (5, 6) and bb.patch_grid(x).grid == (4, 5)  # 40x48; unpadded: floored
        assert torch.equal(g.tokens, bb.patch_grid(official_center_padding(x, 8)).tokens)
