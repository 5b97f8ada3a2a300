"""Every MoCo v3 tag against its own official builder (issue 20, point 0).

The reference is written here, self-contained (CI has neither network nor the authors'
repository), from facebookresearch/moco-v3 at commit c349e6e24f40d3fedb22d973f92defa4cedf37a7:

- ``vits.py``: ``vit_small`` (384 wide, 12 blocks, **12** heads) and ``vit_base`` (768, 12, 12),
  patch 16, MLP ratio 4, ``qkv_bias=True``, LayerNorm eps 1e-6, on timm's
  ``VisionTransformer`` (the same pre-norm block as DINO's, whose reference
  ``test_variants_dino.vit_blocks`` is used; the feature is ``norm(x)[:, 0]``);
  ``build_2d_sincos_position_embedding``: a fixed table built from the patch grid
  (``torch.meshgrid`` of the grid, "ij": the first quarter of the channels is the sine of the
  row index times ``1 / 10000 ** (k / (D / 4))``, then its cosine, then the column's), with a
  zero class entry. The official code has no resize: at another input size the model is built
  for that grid, i.e. the table is this function of the new grid.
- ``moco/builder.py``: ``base_encoder`` and ``momentum_encoder`` (the projector replaces
  ``head`` on the ViTs: ``_build_mlp(3, D, 4096, 256)``, ``fc`` on the ResNet:
  ``_build_mlp(2, 2048, 4096, 256)``), ``predictor``; ``main_moco.py`` saves ``{"epoch",
  "arch", "state_dict" (of the DDP-wrapped model: ``module.*``), "optimizer", "scaler"}``.
- ``main_lincls.py``: keeps ``module.base_encoder.*`` but the projector, builds
  ``vits.<arch>()`` or torchvision's ``resnet50`` (whose reference is
  ``test_variants_dino.official_resnet50_feature``).

Random weights are written in the released files' layout (the momentum encoder, projector and
predictor at their real shapes but constant values, stored once: the reader must drop them);
each tag is read at 224 px and 112 px. ViT-S/16 and the ResNet-50 run at full depth; ViT-B/16
at its real width and heads with one block.
"""

import pytest
import torch
from test_checkpoint_formats import _one_thread  # noqa: F401
from test_variants_dino import (
    check_vit_architecture,
    official_resnet50_feature,
    patch_tokens,
    rel_diff,
    resnet50_state_dict,
    spy_on,
    vit_blocks,
    vit_state_dict,
)

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.adapters import TAGS
from ssl_eval.backbones.families import mocov3 as mocov3_family
from ssl_eval.core.errors import UserError

# vits.py @ c349e6e: tag -> (released file, arch entry, width, depth, heads)
VITS = {
    "mocov3_vits16": ("vit-s-300ep.pth.tar", "vit_small", 384, 12, 12),
    "mocov3_vitb16": ("vit-b-300ep.pth.tar", "vit_base", 768, 12, 12),
}
RESNETS = {"mocov3_r50": ("r-50-1000ep.pth.tar", "resnet50")}
FULL_DEPTH = ("mocov3_vits16",)
PATCH, SIZES, MLP, DIM = 16, (224, 112), 4096, 256


def official_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """VisionTransformerMoCo.build_2d_sincos_position_embedding for a grid x grid model."""
    ax = torch.arange(grid, dtype=torch.float32)
    first, second = torch.meshgrid(ax, ax, indexing="ij")  # vits.py: torch's default, "ij"
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    a = torch.einsum("m,d->md", first.flatten(), omega)
    b = torch.einsum("m,d->md", second.flatten(), omega)
    table = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, dim), table], dim=1)


def mlp_keys(prefix: str, dims: list[int], last_bn: bool, affine_last: bool = False) -> dict:
    """moco/builder.py _build_mlp's state dict (Linear without bias, BatchNorm1d, ReLU ...),
    real shapes, constant values (expanded from one number: stored once)."""

    def const(*shape):
        return torch.full((1,), 0.5).expand(*shape)

    sd, layers = {}, len(dims) - 1
    for i in range(layers):
        sd[f"{prefix}.{3 * i}.weight"] = const(dims[i + 1], dims[i])
        if i < layers - 1 or last_bn:
            p, c = f"{prefix}.{3 * i + 1}", dims[i + 1]
            if i < layers - 1 or affine_last:
                sd[p + ".weight"], sd[p + ".bias"] = const(c), const(c)
            sd[p + ".running_mean"], sd[p + ".running_var"] = const(c), const(c)
            sd[p + ".num_batches_tracked"] = torch.tensor(1000)
    return sd


def release(encoder: dict[str, torch.Tensor], arch: str) -> dict:
    """main_moco.py's save_checkpoint of MoCo_ViT / MoCo_ResNet wrapped in DDP."""
    vit = arch.startswith("vit")
    width = encoder["cls_token"].shape[-1] if vit else 2048
    proj = "head" if vit else "fc"
    base = encoder | mlp_keys(proj, [width, MLP, MLP, DIM] if vit else [width, MLP, DIM], True)
    momentum = {
        k: torch.tensor(-0.5 if v.is_floating_point() else 7, dtype=v.dtype).expand(v.shape)
        for k, v in base.items()
    }
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state |= {f"module.momentum_encoder.{k}": v for k, v in momentum.items()}
    state |= mlp_keys("module.predictor", [DIM, MLP, DIM], last_bn=vit)
    return {
        "epoch": 300,
        "arch": arch,
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0}]},
        "scaler": {"scale": 65536.0},
    }


def official_vit_feature(sd: dict[str, torch.Tensor], x: torch.Tensor, tag: str) -> torch.Tensor:
    """vits.<arch>(img_size=side).forward_features(x) with the encoder's weights: its own
    sin-cos table for the grid, the class token after the final norm."""
    heads = VITS[tag][4]
    t = patch_tokens(sd, x, PATCH)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    t = t + official_sincos(x.shape[-1] // PATCH, t.shape[-1])
    return vit_blocks(sd, t, heads)[:, 0]


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, mocov3_family)


def test_every_mocov3_tag_is_covered():
    list_backbones()  # registers every family's tags
    assert {t for t, (family, _) in TAGS.items() if family == "mocov3"} == set(VITS) | set(RESNETS)


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(VITS))
def test_vit_tag_gives_the_official_builders_features(tag, tmp_path, spy):
    name, arch, dim, depth, heads = VITS[tag]
    spy.shallow = tag not in FULL_DEPTH
    table = official_sincos(224 // PATCH, dim)
    enc = vit_state_dict(dim, 1 if spy.shallow else depth, PATCH, seed=len(tag), pos_embed=table)
    torch.save(release(enc, arch), tmp_path / name)
    for size in SIZES:
        bb = build_backbone(tag, BuildOptions(weights=tmp_path / name, image_size=size))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got, want = bb.embed(x), official_vit_feature(enc, x, tag)
        assert rel_diff(got, want) < 1e-5, f"{tag} at {size} px: {rel_diff(got, want):.3g}"
        assert bb.feature_kind == "cls"
    timm_arch, kw = spy.calls[0]
    check_vit_architecture(timm_arch, kw, (dim, depth, heads, PATCH), tag)


@pytest.mark.slow
def test_resnet50_tag_gives_the_official_builders_features(tmp_path):
    name, arch = RESNETS["mocov3_r50"]
    enc = resnet50_state_dict(seed=11)
    torch.save(release(enc, arch), tmp_path / name)
    bb = build_backbone("mocov3_r50", BuildOptions(weights=tmp_path / name))
    assert sum(len(getattr(bb.model, f"layer{i}")) for i in range(1, 5)) == 16  # 3 + 4 + 6 + 3
    for size, n in ((224, 1), (112, 2)):  # the default crop, and another size
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got, want = bb.embed(x), official_resnet50_feature(enc, x)
        assert got.shape == (n, 2048) and rel_diff(got, want) < 1e-5, (size, rel_diff(got, want))


def test_the_table_is_vits_sincos_at_every_grid(tmp_path, spy):
    """The table the model holds at 224 px is the file's, at other grids vits.py's own."""
    name, arch, dim, _, _ = VITS["mocov3_vitb16"]
    spy.shallow = True
    enc = vit_state_dict(dim, 1, PATCH, seed=3, pos_embed=official_sincos(224 // PATCH, dim))
    torch.save(release(enc, arch), tmp_path / name)
    for size in (96, 224, 384):
        model = build_backbone(
            "mocov3_vitb16", BuildOptions(weights=tmp_path / name, image_size=size)
        ).model
        want = official_sincos(size // PATCH, dim)
        torch.testing.assert_close(model.pos_embed.detach(), want, atol=1e-6, rtol=1e-5)
    # a learnt table is not MoCo v3's: vits.py has no rule to resize it
    enc["pos_embed"] = enc["pos_embed"] + 0.01
    torch.save(release(enc, arch), tmp_path / name)
    with pytest.raises(UserError, match="not that table"):
        build_backbone("mocov3_vitb16", BuildOptions(weights=tmp_path / name, image_size=112))
