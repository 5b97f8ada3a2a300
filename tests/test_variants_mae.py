"""Every MAE tag against its own official builder (issue 20, point 0).

The reference is written here, self-contained (CI has neither network nor the authors'
repository), from facebookresearch/mae at commit efb2a8062c206524e35e47d04501ed4f544c0ae8:

- ``models_vit.py``: ``vit_base_patch16`` (768 wide, 12 blocks, 12 heads),
  ``vit_large_patch16`` (1024, 24, 16), ``vit_huge_patch14`` (1280, 32, 16), MLP ratio 4,
  ``qkv_bias=True``, LayerNorm eps 1e-6, timm's ``VisionTransformer`` underneath (the same
  pre-norm block as DINO's, whose reference ``test_variants_dino.vit_blocks`` is used);
  ``forward_features`` with ``global_pool=False`` (main_linprobe.py's default, ``--cls_token``):
  class token, ``+ pos_embed`` (no interpolation in the forward), blocks, ``norm``, ``[:, 0]``.
- ``main_linprobe.py``: the file's ``checkpoint["model"]``, ``interpolate_pos_embed`` at load
  time, ``strict=False`` with exactly ``head.weight``/``head.bias`` missing (so the released
  ``mae_pretrain_vit_{base,large,huge}.pth`` hold the encoder with ``norm``, no head).
- ``util/pos_embed.py``: ``get_2d_sincos_pos_embed`` (the fixed table MAE pre-trains with, a
  zero class entry, the first half of the channels from the column index), and
  ``interpolate_pos_embed`` (class entry kept, bicubic to the new size, align_corners=False).

Random weights (the position table MAE's own sin-cos) are written in the released files' key
layout and read through each tag at 224 px and at 112 px, at the tag's real width, heads and
patch with one block; ViT-B/16 also at its full depth (marked slow: a 344 MB file).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_checkpoint_formats import _one_thread  # noqa: F401
from test_variants_dino import check_vit_architecture, patch_tokens, rel_diff, spy_on, vit_blocks
from test_variants_dino import vit_state_dict as plain_vit_state_dict

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.adapters import TAGS
from ssl_eval.backbones.families import mae as mae_family

# models_vit.py @ efb2a80: tag -> (released file, width, depth, heads, patch)
VITS = {
    "mae_vitb16": ("mae_pretrain_vit_base.pth", 768, 12, 12, 16),
    "mae_vitl16": ("mae_pretrain_vit_large.pth", 1024, 24, 16, 16),
    "mae_vith14": ("mae_pretrain_vit_huge.pth", 1280, 32, 16, 14),
}
SIZES = (224, 112)


def mae_sincos(dim: int, grid: int) -> torch.Tensor:
    """get_2d_sincos_pos_embed(dim, grid, cls_token=True), as (1, 1 + grid*grid, dim)."""

    def one_axis(d, pos):  # get_1d_sincos_pos_embed_from_grid
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ax = np.arange(grid, dtype=np.float32)
    first, second = np.meshgrid(ax, ax)  # "w goes first": first varies along a row
    emb = np.concatenate([one_axis(dim // 2, first), one_axis(dim // 2, second)], axis=1)
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


def official_pos_embed(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """util/pos_embed.py interpolate_pos_embed for a model of new_grid x new_grid patches."""
    dim = pos_embed.shape[-1]
    orig = int((pos_embed.shape[-2] - 1) ** 0.5)
    if orig == new_grid:
        return pos_embed
    tokens = pos_embed[:, 1:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def official_feature(sd: dict[str, torch.Tensor], x: torch.Tensor, tag: str) -> torch.Tensor:
    """models_vit.VisionTransformer(global_pool=False).forward_features(x), the table loaded
    through interpolate_pos_embed for the model's img_size (the input side)."""
    _, _, _, heads, patch = VITS[tag]
    t = patch_tokens(sd, x, patch)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    t = t + official_pos_embed(sd["pos_embed"], x.shape[-1] // patch)
    return vit_blocks(sd, t, heads)[:, 0]


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, mae_family)


def test_every_mae_tag_is_covered():
    list_backbones()  # registers every family's tags
    assert {t for t, (family, _) in TAGS.items() if family == "mae"} == set(VITS)


def _compare(tag, depth, sizes, tmp_path, images=2):
    name, dim, _, _, patch = VITS[tag]
    sd = plain_vit_state_dict(
        dim, depth, patch, seed=sorted(VITS).index(tag), pos_embed=mae_sincos(dim, 224 // patch)
    )
    path = tmp_path / name
    torch.save({"model": sd}, path)
    for size in sizes:
        bb = build_backbone(tag, BuildOptions(weights=path, image_size=size))
        assert len(bb.model.blocks) == depth and bb.feature_kind == "cls"
        x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got, want = bb.embed(x), official_feature(sd, x, tag)
        assert rel_diff(got, want) < 1e-5, f"{tag} at {size} px: {rel_diff(got, want):.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(VITS))
def test_tag_gives_the_official_builders_features(tag, tmp_path, spy):
    """One block at the tag's real width, heads and patch; the full architecture the tag
    asks timm for is checked on the meta device."""
    _, dim, depth, heads, patch = VITS[tag]
    spy.shallow = True
    _compare(tag, 1, SIZES, tmp_path)
    arch, kw = spy.calls[0]
    assert kw.get("global_pool") == "token", kw  # the class token, not the mean
    check_vit_architecture(arch, kw, (dim, depth, heads, patch), tag)


@pytest.mark.slow
def test_vitb16_at_full_depth(tmp_path):
    """The tag's own 12 blocks (a 344 MB file: writing it is most of the time)."""
    _compare("mae_vitb16", VITS["mae_vitb16"][2], (112,), tmp_path, images=1)


@pytest.mark.slow
def test_the_released_table_is_maes_sincos_and_resizes_as_mae_does(tmp_path, spy):
    """The table at 224 px is the file's (MAE's sin-cos); at other grids MAE's resize."""
    spy.shallow = True
    name, dim, _, _, patch = VITS["mae_vith14"]
    sd = plain_vit_state_dict(dim, 1, patch, seed=5, pos_embed=mae_sincos(dim, 224 // patch))
    torch.save({"model": sd}, tmp_path / name)
    for size in (112, 224, 280):
        model = build_backbone(
            "mae_vith14", BuildOptions(weights=tmp_path / name, image_size=size)
        ).model
        want = official_pos_embed(sd["pos_embed"], size // patch)
        torch.testing.assert_close(model.pos_embed.detach(), want, atol=1e-6, rtol=1e-5)
