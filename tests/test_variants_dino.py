"""Every DINO tag against its own official builder (issue 20, point 0).

The reference is written here, self-contained (CI has neither network nor the authors'
repository), from facebookresearch/dino at commit 7c446df5b9f45747937fb0d72314eb9f7b66930a:

- ``hubconf.py``: ``dino_vits16/vits8/vitb16/vitb8`` are ``vision_transformer.vit_small`` /
  ``vit_base`` with patch 16 or 8 and ``num_classes=0``, loaded ``strict=True`` from the flat
  ``dino_deitsmall16_pretrain.pth`` ... (the model's whole state dict, no head);
  ``dino_resnet50`` is torchvision's ``resnet50`` with ``fc = Identity``, loaded
  ``strict=False`` from ``dino_resnet50_pretrain.pth``.
- ``vision_transformer.py``: ``vit_small`` (384 wide, 12 blocks, 6 heads), ``vit_base`` (768,
  12, 12), MLP ratio 4, ``qkv_bias=True``, LayerNorm eps 1e-6, default ``img_size=[224]`` (the
  table holds the class entry and (224 / patch)^2 patch entries); pre-norm ``Block``
  (``norm1``, ``attn.qkv``, scale ``head_dim ** -0.5``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
  GELU, ``mlp.fc2``); ``prepare_tokens`` (class token, then + ``interpolate_pos_encoding``:
  the table untouched when the grid and the side agree, else bicubic by scale factor
  ``(new + 0.1) / old``, no antialiasing); ``forward`` returns ``norm(x)[:, 0]``.
- torchvision ``resnet50`` (what the hub builds): 7x7/2 stem, BatchNorm, 3x3/2 max pool,
  bottlenecks (3, 4, 6, 3) with the stride on the 3x3, 1x1 projection shortcuts, average pool.

Random weights are written in the hub files' exact key layout and read through each tag, at
224 px and at 112 px (the position table resized). ViT-S/16 and the ResNet-50 run at full depth;
the other ViTs at their real width, heads and patch with one block. The architecture the tag
path asks timm for is checked on the meta device against the builders' table.
"""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from test_checkpoint_formats import _one_thread  # noqa: F401
from torch import nn

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.adapters import TAGS
from ssl_eval.backbones.families import dino as dino_family

# hubconf.py @ 7c446df: tag -> (hub file, width, depth, heads, patch)
VITS = {
    "dino_vits16": ("dino_deitsmall16_pretrain", 384, 12, 6, 16),
    "dino_vits8": ("dino_deitsmall8_pretrain", 384, 12, 6, 8),
    "dino_vitb16": ("dino_vitbase16_pretrain", 768, 12, 12, 16),
    "dino_vitb8": ("dino_vitbase8_pretrain", 768, 12, 12, 8),
}
RESNETS = {"dino_resnet50": "dino_resnet50_pretrain"}
FULL_DEPTH = ("dino_vits16",)
SIZES = (224, 112)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-image relative L2 difference."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def _rnd(seed: int):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    return rnd


def smooth_table(rnd, grid: int, dim: int) -> torch.Tensor:
    """A smooth (1, grid*grid, dim) position table, like a trained one, with some noise."""
    coarse = F.interpolate(rnd(1, dim, 5, 5), size=(grid, grid), mode="bicubic", align_corners=True)
    return coarse.flatten(2).transpose(1, 2) + rnd(1, grid * grid, dim, std=0.05)


def vit_state_dict(
    dim: int, depth: int, patch: int, seed: int, pos_embed: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Random weights under the names of a timm-style ViT (DINO's vision_transformer.py, MAE's
    and MoCo v3's timm VisionTransformer): class token, position table for 224 px with its
    class entry, qkv biases, pre-norm blocks, final norm; no head."""
    rnd = _rnd(seed)
    grid = 224 // patch
    if pos_embed is None:
        pos_embed = torch.cat([rnd(1, 1, dim), smooth_table(rnd, grid, dim)], dim=1)
    sd = {
        "cls_token": rnd(1, 1, dim),
        "pos_embed": pos_embed,
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "patch_embed.proj.bias": rnd(dim, std=0.02),
    }
    linears = {
        "attn.qkv": (3 * dim, dim),
        "attn.proj": (dim, dim),
        "mlp.fc1": (4 * dim, dim),
        "mlp.fc2": (dim, 4 * dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[p + norm + ".weight"] = rnd(dim, std=0.1, mean=1.0)
            sd[p + norm + ".bias"] = rnd(dim, std=0.02)
        for name, (out, inp) in linears.items():
            sd[p + name + ".weight"] = rnd(out, inp, std=0.5 * inp**-0.5)
            sd[p + name + ".bias"] = rnd(out, std=0.02)
    sd["norm.weight"] = rnd(dim, std=0.1, mean=1.0)
    sd["norm.bias"] = rnd(dim, std=0.02)
    return sd


def vit_blocks(
    sd: dict[str, torch.Tensor], t: torch.Tensor, heads: int, final_norm: bool = True
) -> torch.Tensor:
    """The pre-norm blocks of DINO's vision_transformer.py Block (also timm's, under MAE's
    models_vit.py and MoCo v3's vits.py), then the final norm (``final_norm``; MAE's global
    pool drops it): (B, N, D) -> (B, N, D)."""
    b, n, dim = t.shape
    hd = dim // heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def lin(p, y):
        return F.linear(y, sd[p + ".weight"], sd[p + ".bias"])

    def norm(p, y):
        return F.layer_norm(y, (dim,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    for i in range(depth):
        p = f"blocks.{i}."
        qkv = lin(p + "attn.qkv", norm(p + "norm1", t)).reshape(b, n, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        t = t + lin(p + "attn.proj", (attn @ v).transpose(1, 2).reshape(b, n, dim))
        t = t + lin(p + "mlp.fc2", F.gelu(lin(p + "mlp.fc1", norm(p + "norm2", t))))
    return norm("norm", t) if final_norm else t


def patch_tokens(sd: dict[str, torch.Tensor], x: torch.Tensor, patch: int) -> torch.Tensor:
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    return t.flatten(2).transpose(1, 2)


def official_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """DINO's VisionTransformer.interpolate_pos_encoding for an input of w x h pixels."""
    n = pos_embed.shape[1] - 1
    npatch = (w // patch) * (h // patch)
    if npatch == n and w == h:
        return pos_embed
    dim, m = pos_embed.shape[-1], math.sqrt(n)
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(m), int(m), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / m, h0 / m), mode="bicubic")
    assert (int(w0), int(h0)) == tuple(grid.shape[-2:])
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def official_at_sizes(bb, official, sizes, patch: int) -> None:
    """``bb``'s class feature against ``official(x)`` (< 1e-5) and its patch grid at each
    input size (h, w)."""
    for h, w in sizes:
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            got, want = bb.embed(x), official(x)
            grid = bb.patch_grid(x).grid
        assert rel_diff(got, want) < 1e-5, f"{bb.tag} at {h}x{w}: {rel_diff(got, want):.3g}"
        assert grid == (h // patch, w // patch)


def official_vit_feature(sd: dict[str, torch.Tensor], x: torch.Tensor, tag: str) -> torch.Tensor:
    """dino_vit*(x): norm(blocks(prepare_tokens(x)))[:, 0]."""
    _, _, _, heads, patch = VITS[tag]
    t = patch_tokens(sd, x, patch)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1)
    t = t + official_pos_encoding(sd["pos_embed"], x.shape[2], x.shape[3], patch)
    return vit_blocks(sd, t, heads)[:, 0]


def resnet50_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random weights under torchvision resnet50's state-dict names, without ``fc``."""
    rnd = _rnd(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(p, out, inp, k):
        sd[p + ".weight"] = rnd(out, inp, k, k, std=(inp * k * k) ** -0.5)

    def bn(p, c, gain=1.0):
        sd[p + ".weight"] = rnd(c, std=0.1, mean=gain)
        sd[p + ".bias"] = rnd(c, std=0.1)
        sd[p + ".running_mean"] = rnd(c, std=0.1)
        sd[p + ".running_var"] = 0.5 + torch.rand(c, generator=torch.Generator().manual_seed(c))
        sd[p + ".num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for j in range(n):
            p = f"layer{i + 1}.{j}."
            conv(p + "conv1", planes, inplanes, 1)
            bn(p + "bn1", planes)
            conv(p + "conv2", planes, planes, 3)
            bn(p + "bn2", planes)
            conv(p + "conv3", 4 * planes, planes, 1)
            bn(p + "bn3", 4 * planes, gain=0.3)
            if j == 0:
                conv(p + "downsample.0", 4 * planes, inplanes, 1)
                bn(p + "downsample.1", 4 * planes)
            inplanes = 4 * planes
    return sd


def official_resnet50_feature(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """torchvision resnet50 with fc = Identity: the 2048-d average pool."""

    def bn(p, y):
        return F.batch_norm(
            y,
            sd[p + ".running_mean"],
            sd[p + ".running_var"],
            sd[p + ".weight"],
            sd[p + ".bias"],
            training=False,
            eps=1e-5,
        )

    def conv(p, y, stride=1, padding=0):
        return F.conv2d(y, sd[p + ".weight"], stride=stride, padding=padding)

    x = F.relu(bn("bn1", conv("conv1", x, stride=2, padding=3)))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for i, n in enumerate((3, 4, 6, 3)):
        for j in range(n):
            p = f"layer{i + 1}.{j}."
            stride = 2 if i > 0 and j == 0 else 1  # the stride on the 3x3 (torchvision's v1.5)
            y = F.relu(bn(p + "bn1", conv(p + "conv1", x)))
            y = F.relu(bn(p + "bn2", conv(p + "conv2", y, stride=stride, padding=1)))
            y = bn(p + "bn3", conv(p + "conv3", y))
            short = x if j else bn(p + "downsample.1", conv(p + "downsample.0", x, stride=stride))
            x = F.relu(y + short)
    return x.mean(dim=(2, 3))


class Spy:
    """Records what a family's reader asks timm for; builds one block when ``shallow``."""

    def __init__(self, create):
        self.create, self.calls, self.shallow = create, [], False

    def __call__(self, arch, img_size=None, **kw):
        self.calls.append((arch, dict(kw)))
        if self.shallow:
            kw["depth"] = 1
        return self.create(arch, img_size, **kw)


def spy_on(monkeypatch, family) -> Spy:
    """A Spy in place of ``family.create_timm`` for the test."""
    s = Spy(family.create_timm)
    monkeypatch.setattr(family, "create_timm", s)
    return s


@pytest.fixture
def spy(monkeypatch):
    return spy_on(monkeypatch, dino_family)


def check_vit_architecture(arch: str, kw: dict, want: tuple, what: str) -> None:
    """The model the tag path builds (with a full-depth file), on the meta device, against the
    official builder's (width, depth, heads, patch): class token and its position entry, no
    registers, no pre-norm, MLP 4x, qkv bias, LayerNorm eps 1e-6, class-token pooling."""
    width, depth, heads, patch = want
    with torch.device("meta"):
        m = timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kw, "img_size": 224})
    blk = m.blocks[0]
    got = (m.embed_dim, len(m.blocks), blk.attn.num_heads, m.patch_embed.proj.kernel_size)
    assert got == (width, depth, heads, (patch, patch)), what
    assert m.pos_embed.shape == (1, 1 + (224 // patch) ** 2, width), what
    assert m.cls_token is not None and m.num_reg_tokens == 0 and not m.no_embed_class, what
    assert isinstance(m.norm_pre, nn.Identity) and isinstance(blk.ls1, nn.Identity), what
    assert blk.mlp.fc1.out_features == 4 * width and blk.attn.qkv.bias is not None, what
    assert (blk.norm1.eps, blk.norm2.eps) == (1e-6, 1e-6), what
    assert isinstance(blk.mlp.act, nn.GELU) and blk.attn.scale == (width // heads) ** -0.5, what


def test_every_dino_tag_is_covered():
    from test_variants_dino_xcit import XCITS  # the XCiTs' own file (it imports this one)

    list_backbones()  # registers every family's tags
    dino = {t for t, (family, _) in TAGS.items() if family == "dino"}
    assert dino == set(VITS) | set(RESNETS) | set(XCITS)


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(VITS))
def test_vit_tag_gives_the_official_builders_features(tag, tmp_path, spy):
    hub, dim, depth, heads, patch = VITS[tag]
    spy.shallow = tag not in FULL_DEPTH
    sd = vit_state_dict(dim, 1 if spy.shallow else depth, patch, seed=sorted(VITS).index(tag))
    path = tmp_path / f"{hub}.pth"
    torch.save(sd, path)
    for size in SIZES:
        bb = build_backbone(tag, BuildOptions(weights=path, image_size=size))
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got, want = bb.embed(x), official_vit_feature(sd, x, tag)
        assert rel_diff(got, want) < 1e-5, f"{tag} at {size} px: {rel_diff(got, want):.3g}"
        assert bb.feature_kind == "cls"
    arch, kw = spy.calls[0]
    check_vit_architecture(arch, kw, (dim, depth, heads, patch), tag)


@pytest.mark.slow
def test_resnet50_tag_gives_the_official_builders_features(tmp_path):
    sd = resnet50_state_dict(seed=9)
    path = tmp_path / f"{RESNETS['dino_resnet50']}.pth"
    torch.save(sd, path)
    bb = build_backbone("dino_resnet50", BuildOptions(weights=path))
    assert sum(len(getattr(bb.model, f"layer{i}")) for i in range(1, 5)) == 16  # 3 + 4 + 6 + 3
    for size, n in ((224, 1), (112, 2)):  # the default crop, and another size
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got, want = bb.embed(x), official_resnet50_feature(sd, x)
        assert got.shape == (n, 2048) and rel_diff(got, want) < 1e-5, (size, rel_diff(got, want))


def test_position_table_at_other_grids(tmp_path, spy):
    """The resized table itself, shrunk and enlarged, and untouched at 224 px."""
    tag = "dino_vits8"
    hub, dim, _, _, patch = VITS[tag]
    spy.shallow = True
    sd = vit_state_dict(dim, 1, patch, seed=7)
    torch.save(sd, tmp_path / f"{hub}.pth")
    for size in (96, 224, 232, 320):
        model = build_backbone(
            tag, BuildOptions(weights=tmp_path / f"{hub}.pth", image_size=size)
        ).model
        want = official_pos_encoding(sd["pos_embed"], size, size, patch)
        torch.testing.assert_close(model.pos_embed.detach(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_a_model_built_at_224_takes_any_patch_multiple_as_the_hub_model(tmp_path):
    """DINO's ViTs resize their table in every forward (interpolate_pos_encoding): a tag built
    at 224 px gives the official features at other sizes, square or not (DINOv3's dense
    recipes' 416 x 544 views and 480 x 640 test images among them), and its patch grid."""
    tag = "dino_vits16"
    hub, dim, depth, _, patch = VITS[tag]
    sd = vit_state_dict(dim, depth, patch, seed=5)
    torch.save(sd, tmp_path / f"{hub}.pth")
    bb = build_backbone(tag, BuildOptions(weights=tmp_path / f"{hub}.pth"))
    sizes = ((416, 544), (480, 640), (96, 160), (224, 224))
    official_at_sizes(bb, lambda x: official_vit_feature(sd, x, tag), sizes, patch)
    assert "resized in each forward from the file's 14x14 table" in str(bb.load_report)
