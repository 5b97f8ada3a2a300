"""Every DINOv2 tag against its own official builder (issue 20, point 0).

The reference is written here, self-contained (CI has neither network nor the authors'
repository), from facebookresearch/dinov2 at commit b8931f7bf91576930313be2c6d6af376033b35f0:

- ``dinov2/hub/backbones.py``: ``_make_dinov2_model`` builds every hub model with img_size 518,
  patch 14, init_values 1.0 (layer scale), block_chunks 0, and by default
  ``interpolate_antialias=False, interpolate_offset=0.1``; ``dinov2_vit{s,b,l,g}14_reg`` pass
  ``num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0``; the giants
  use ``arch_name="vit_giant2", ffn_layer="swiglufused"``.
- ``dinov2/models/vision_transformer.py``: ``vit_small/base/large/giant2`` (width, depth,
  heads), ``DinoVisionTransformer.interpolate_pos_encoding`` (the table untouched at its own
  grid, else bicubic in float32 by scale factor ``(new + offset) / M`` when the offset is
  non-zero, else to the size, antialiased as set), ``prepare_tokens_with_masks`` (class
  token, + position, then the registers after the class token) and the norm'd class token.
- ``dinov2/layers``: pre-norm blocks with LayerScale (``ls1.gamma``, ``ls2.gamma``), GELU MLP
  ``fc1``/``fc2``, ``SwiGLUFFNFused`` (``w12`` chunked in two, ``silu(x1) * x2``, ``w3``,
  hidden ``(int(4 * D * 2 / 3) + 7) // 8 * 8``), LayerNorm eps 1e-6.

Random weights are written in the hub files' exact key layout and read through each tag. ViT-S
runs at its full depth; ViT-B/L/g at their real width, heads and MLP with one block
(``create_timm`` is asked for one block; the tag path is otherwise the tag's: a full ViT-g costs
minutes on a 2-core CPU, and depth does not touch the position table). Each tag's full
architecture is checked on the meta device against the builders' table.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from test_checkpoint_formats import _one_thread  # noqa: F401
from test_variants_dino import official_at_sizes, rel_diff

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.adapters import TAGS
from ssl_eval.backbones.families import dinov2 as dinov2_family

# dinov2/hub/backbones.py @ b8931f7: tag -> (width, depth, heads, ffn, registers, antialias, offset)
OFFICIAL = {
    "dinov2_vits14": (384, 12, 6, "mlp", 0, False, 0.1),
    "dinov2_vitb14": (768, 12, 12, "mlp", 0, False, 0.1),
    "dinov2_vitl14": (1024, 24, 16, "mlp", 0, False, 0.1),
    "dinov2_vitg14": (1536, 40, 24, "swiglufused", 0, False, 0.1),
    "dinov2_vits14_reg": (384, 12, 6, "mlp", 4, True, 0.0),
    "dinov2_vitb14_reg": (768, 12, 12, "mlp", 4, True, 0.0),
    "dinov2_vitl14_reg": (1024, 24, 16, "mlp", 4, True, 0.0),
    "dinov2_vitg14_reg": (1536, 40, 24, "swiglufused", 4, True, 0.0),
}
FULL_DEPTH = ("dinov2_vits14", "dinov2_vits14_reg")
PATCH, HUB_GRID = 14, 37  # img_size 518 / patch 14


def official_file_name(tag: str) -> str:
    """hub/utils.py _make_dinov2_model_name: dinov2_vit{s}14[_reg4]_pretrain.pth."""
    return tag.replace("_reg", "_reg4") + "_pretrain.pth"


def official_state_dict(tag: str, depth: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the names DinoVisionTransformer saves (mask_token included), of
    sensible scales; the position table is smooth, like a trained one."""
    dim, _, _, ffn, regs, _, _ = OFFICIAL[tag]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    coarse = rnd(1, dim, 6, 6)
    smooth = F.interpolate(coarse, size=(HUB_GRID, HUB_GRID), mode="bicubic", align_corners=True)
    patch_pe = smooth.flatten(2).transpose(1, 2) + rnd(1, HUB_GRID * HUB_GRID, dim, std=0.05)
    sd = {
        "cls_token": rnd(1, 1, dim),
        "pos_embed": torch.cat([rnd(1, 1, dim), patch_pe], dim=1),
        "mask_token": torch.zeros(1, dim),
        "patch_embed.proj.weight": rnd(dim, 3, PATCH, PATCH, std=(3 * PATCH * PATCH) ** -0.5),
        "patch_embed.proj.bias": rnd(dim, std=0.02),
        "norm.weight": rnd(dim, std=0.1, mean=1.0),
        "norm.bias": rnd(dim, std=0.02),
    }
    if regs:
        sd["register_tokens"] = rnd(1, regs, dim)
    hidden = 4 * dim
    if ffn == "swiglufused":
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        mlp = {"w12": (2 * hidden, dim), "w3": (dim, hidden)}
    else:
        mlp = {"fc1": (hidden, dim), "fc2": (dim, hidden)}
    for i in range(depth):
        p = f"blocks.{i}."
        linears = {"attn.qkv": (3 * dim, dim), "attn.proj": (dim, dim)}
        linears |= {f"mlp.{k}": shape for k, shape in mlp.items()}
        for name, (out, inp) in linears.items():
            sd[p + name + ".weight"] = rnd(out, inp, std=inp**-0.5)
            sd[p + name + ".bias"] = rnd(out, std=0.02)
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = rnd(dim, std=0.1, mean=1.0)
            sd[p + norm + ".bias"] = rnd(dim, std=0.02)
        for ls in ("ls1", "ls2"):
            sd[p + ls + ".gamma"] = rnd(dim, std=0.1, mean=0.3)
    return sd


def official_pos_encoding(
    pos_embed: torch.Tensor, w: int, h: int, antialias: bool, offset: float
) -> torch.Tensor:
    """DinoVisionTransformer.interpolate_pos_encoding for an input of w x h pixels."""
    npatch, n = (w // PATCH) * (h // PATCH), pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pe = pos_embed.float()
    dim, m = pe.shape[-1], int(math.sqrt(n))
    w0, h0 = w // PATCH, h // PATCH
    if offset:  # the "historical kludge": a scale factor, not a size
        how = {"scale_factor": (float(w0 + offset) / m, float(h0 + offset) / m)}
    else:
        how = {"size": (w0, h0)}
    grid = pe[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **how)
    assert tuple(grid.shape[-2:]) == (w0, h0)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def official_cls_feature(sd: dict[str, torch.Tensor], x: torch.Tensor, tag: str) -> torch.Tensor:
    """forward_features(x)["x_norm_clstoken"] of the official model holding ``sd``."""
    dim, _, heads, ffn, regs, antialias, offset = OFFICIAL[tag]
    b, _, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)], dim=1)
    t = t + official_pos_encoding(sd["pos_embed"], w, h, antialias, offset)
    if regs:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], dim=1)
    n, hd = t.shape[1], dim // heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def lin(p, y):
        return F.linear(y, sd[p + ".weight"], sd[p + ".bias"])

    def norm(p, y):
        return F.layer_norm(y, (dim,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        qkv = lin(p + "attn.qkv", norm(p + "norm1", t)).reshape(b, n, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = lin(p + "attn.proj", (attn @ v).transpose(1, 2).reshape(b, n, dim))
        t = t + sd[p + "ls1.gamma"] * y
        y = norm(p + "norm2", t)
        if ffn == "swiglufused":
            x1, x2 = lin(p + "mlp.w12", y).chunk(2, dim=-1)
            y = lin(p + "mlp.w3", F.silu(x1) * x2)
        else:
            y = lin(p + "mlp.fc2", F.gelu(lin(p + "mlp.fc1", y)))
        t = t + sd[p + "ls2.gamma"] * y
    return norm("norm", t)[:, 0]


@pytest.fixture
def shallow(monkeypatch):
    """Ask the tag path for one block (ViT-B/L/g at their real width, heads and MLP)."""
    create = dinov2_family.create_timm

    def one_block(arch, img_size=None, **kw):
        return create(arch, img_size, **{**kw, "depth": 1})

    monkeypatch.setattr(dinov2_family, "create_timm", one_block)


@pytest.mark.slow
def test_every_dinov2_tag_is_covered_with_its_builders_architecture():
    list_backbones()  # registers every family's tags
    assert {t for t, (family, _) in TAGS.items() if family == "dinov2"} == set(OFFICIAL)
    for tag, (dim, depth, heads, ffn, regs, _, _) in OFFICIAL.items():
        with torch.device("meta"):
            m = timm.create_model(TAGS[tag][1], pretrained=False, num_classes=0)
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 * 2 if ffn == "swiglufused" else 4 * dim
        got = (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads, m.num_reg_tokens)
        assert got == (dim, depth, heads, regs), tag
        assert m.patch_embed.proj.kernel_size == (PATCH, PATCH), tag
        assert m.patch_embed.grid_size == (HUB_GRID, HUB_GRID), tag  # img_size 518
        assert m.blocks[0].mlp.fc1.out_features == hidden, tag


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(OFFICIAL))
def test_tag_gives_the_official_builders_features(tag, tmp_path, request):
    depth = OFFICIAL[tag][1] if tag in FULL_DEPTH else 1
    if tag not in FULL_DEPTH:
        request.getfixturevalue("shallow")
    sd = official_state_dict(tag, depth, seed=sorted(OFFICIAL).index(tag))
    path = tmp_path / official_file_name(tag)
    torch.save(sd, path)
    for size in (224, 98):
        bb = build_backbone(tag, BuildOptions(weights=path, image_size=size))
        assert len(bb.model.blocks) == depth
        x = torch.randn(
            2 if size < 224 else 1, 3, size, size, generator=torch.Generator().manual_seed(size)
        )
        with torch.no_grad():
            got, want = bb.embed(x), official_cls_feature(sd, x, tag)
        assert rel_diff(got, want) < 1e-5, f"{tag} at {size} px: {rel_diff(got, want):.3g}"


@pytest.mark.parametrize("tag", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_position_table_at_every_grid(tag, tmp_path, shallow):
    """The resized table itself, shrunk and enlarged (antialiasing changes the bicubic
    kernel even when enlarging), and untouched at the file's own 518 px."""
    _, _, _, _, regs, antialias, offset = OFFICIAL[tag]
    sd = official_state_dict(tag, 1, seed=7)
    path = tmp_path / official_file_name(tag)
    torch.save(sd, path)
    for size in (98, 224, 252, 518, 546):
        model = build_backbone(tag, BuildOptions(weights=path, image_size=size)).model
        want = official_pos_encoding(sd["pos_embed"], size, size, antialias, offset)
        got = model.pos_embed.detach()
        if regs:  # timm folds the class token's entry into cls_token (no_embed_class)
            cls_pe = model.cls_token.detach() - sd["cls_token"]
            got = torch.cat([cls_pe, got], dim=1)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=f"{tag} at {size} px")


@pytest.mark.slow
def test_detected_files_take_the_settings_of_their_registers(tmp_path):
    """ckpt:PATH (no tag): a file with registers is read as the _reg builders (and the eval
    configs vit*14_reg4_pretrain.yaml) build it, one without as the plain ones."""
    for tag in ("dinov2_vits14", "dinov2_vits14_reg"):
        sd = official_state_dict(tag, 2, seed=11)
        path = tmp_path / official_file_name(tag)
        torch.save(sd, path)
        bb = build_backbone(f"ckpt:{path}", BuildOptions(image_size=224))
        x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got, want = bb.embed(x), official_cls_feature(sd, x, tag)
        assert rel_diff(got, want) < 1e-5, f"ckpt: {tag}: {rel_diff(got, want):.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("tag", FULL_DEPTH)
def test_a_model_built_at_224_takes_any_patch_multiple_as_the_hub_model(tag, tmp_path):
    """The hub's models resize their table in every forward (interpolate_pos_encoding), so
    they take any input whose sides are multiples of 14, square or not: a tag built at 224 px
    gives the official features at other sizes, non-square ones and the file's own 518 px
    (the table untouched) included, and its patch grid at each."""
    from ssl_eval.core.errors import UserError

    sd = official_state_dict(tag, OFFICIAL[tag][1], seed=3)
    path = tmp_path / official_file_name(tag)
    torch.save(sd, path)
    bb = build_backbone(tag, BuildOptions(weights=path))
    sizes = ((98, 126), (140, 70), (518, 518), (224, 224), (42, 252))
    official_at_sizes(bb, lambda x: official_cls_feature(sd, x, tag), sizes, PATCH)
    # a table being trained (fine-tuning) is trained at the built grid only
    with pytest.raises(UserError, match="built"):
        bb.model(torch.zeros(1, 3, 98, 126))
