"""DINO's four XCiT tags against their own official builder (issue 20, point 0).

The reference is written here, self-contained (CI has neither network nor the authors'
repositories), from facebookresearch/dino at commit 7c446df5b9f45747937fb0d72314eb9f7b66930a
and facebookresearch/xcit at commit 82f5291f412604970c39a912586e008ec009cdca:

- dino ``hubconf.py``: ``dino_xcit_small_12_p16`` ... are
  ``torch.hub.load("facebookresearch/xcit:main", "xcit_small_12_p16", num_classes=0)``, loaded
  ``strict=True`` from ``dino_xcit_small_12_p16_pretrain.pth`` (the flat state dict, no head).
  ``eval_linear.py`` and ``eval_knn.py`` call ``model(inp)`` for an XCiT (its name lacks
  "vit": no ``n_last_blocks``, no patch average), after resize 256 (bicubic), centre crop 224,
  ImageNet mean/std.
- xcit ``xcit.py``: ``xcit_small_12_*`` (384 wide, 12 XCA blocks, 8 heads), ``xcit_medium_24_*``
  (512, 24, 8), both ``tokens_norm=True``; ``xcit_nano_12_*`` (128, 12, 4) ``tokens_norm=False``.
  ``ConvPatchEmbed``: 3x3 stride-2 convolutions (padding 1, no bias), each followed by
  BatchNorm, GELU between them: widths D/8, D/4, D/2, D for patch 16, D/4, D/2, D for patch 8.
  ``PositionalEncodingFourier`` (hidden 32, temperature 10000): normalised cumulative row and
  column indices times 2 pi, sin/cos interleaved per frequency, y half first, then a 1x1
  ``token_projection``, added to the patch tokens. ``XCABlock``: x + g1 * XCA(norm1 x), then
  x + g3 * LPI(norm3 x), then x + g2 * MLP(norm2 x); XCA: q, k, v per head transposed to
  (channels x tokens), q and k L2-normalised over the tokens, softmax(q k^T * temperature) v;
  LPI: depthwise 3x3 conv (padding 1), GELU, BatchNorm, depthwise 3x3 conv. Then the class
  token is prepended and two ``ClassAttentionBlock``s run: x + g1 * [CA(norm1 x) for the class
  token, norm1 x for the patches]; norm2 over every token (tokens_norm) or only the class
  token; x + [g2 * MLP(class token), the patch tokens] (the patch tokens so doubled). Then
  ``norm`` (LayerNorm eps 1e-6) and ``[:, 0]``.

Random weights are written in the hub files' exact key layout and read through each tag, at
224 px and at 132 px (a size the patches do not divide: the padded stride-2 convolutions give
a 9x9 grid at patch 16 and 17x17 at patch 8, and the Fourier encoding follows the grid). The S12s run
at full depth; the M24s at their real width, heads and patch with two XCA blocks, and their
full-depth model is checked key by key against the official layout.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from test_checkpoint_formats import _one_thread  # noqa: F401
from test_variants_dino import rel_diff, vit_state_dict
from torch import nn

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.adapters import TAG_WEIGHTS, TAGS
from ssl_eval.backbones.families import dino as dino_family
from ssl_eval.core.errors import UserError

# hubconf.py @ 7c446df: tag -> (hub file, xcit.py name); xcit.py @ 82f5291: the dimensions
XCITS = {
    "dino_xcit_small_12_p16": ("dino_xcit_small_12_p16_pretrain", "xcit_small_12_p16"),
    "dino_xcit_small_12_p8": ("dino_xcit_small_12_p8_pretrain", "xcit_small_12_p8"),
    "dino_xcit_medium_24_p16": ("dino_xcit_medium_24_p16_pretrain", "xcit_medium_24_p16"),
    "dino_xcit_medium_24_p8": ("dino_xcit_medium_24_p8_pretrain", "xcit_medium_24_p8"),
}
# xcit.py: name -> (width, depth, heads, patch, tokens_norm)
OFFICIAL = {
    "xcit_small_12_p16": (384, 12, 8, 16, True),
    "xcit_small_12_p8": (384, 12, 8, 8, True),
    "xcit_medium_24_p16": (512, 24, 8, 16, True),
    "xcit_medium_24_p8": (512, 24, 8, 8, True),
    "xcit_nano_12_p16": (128, 12, 4, 16, False),
}
FULL_DEPTH = ("dino_xcit_small_12_p16", "dino_xcit_small_12_p8")
SHALLOW = 2  # XCA blocks of the M24 files
SIZES = (224, 132)
URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"  # hubconf.py's load_state_dict_from_url


# ---------------------------------------------------------------- the official layout


def _rnd(seed: int):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    return rnd


def xcit_state_dict(
    width: int, depth: int, heads: int, patch: int, seed: int, meta: bool = False
) -> dict[str, torch.Tensor]:
    """Random weights under xcit.py's own state-dict names (``XCiT(num_classes=0)``: no head),
    in its shapes; ``meta``: the shapes only, on the meta device."""
    rnd = _rnd(seed)
    if meta:

        def rnd(*shape, std=1.0, mean=0.0):  # noqa: F811
            return torch.empty(*shape, device="meta")

    sd: dict[str, torch.Tensor] = {}
    d = width

    def bn(p, c):
        sd[p + ".weight"] = rnd(c, std=0.1, mean=1.0)
        sd[p + ".bias"] = rnd(c, std=0.1)
        sd[p + ".running_mean"] = rnd(c, std=0.1)
        sd[p + ".running_var"] = 0.5 + rnd(c).abs() if not meta else rnd(c)
        sd[p + ".num_batches_tracked"] = torch.tensor(1000)

    def linear(p, out, inp, bias=True, gain=0.5):
        sd[p + ".weight"] = rnd(out, inp, std=gain * inp**-0.5)
        if bias:
            sd[p + ".bias"] = rnd(out, std=0.02)

    def norm(p):
        sd[p + ".weight"] = rnd(d, std=0.1, mean=1.0)
        sd[p + ".bias"] = rnd(d, std=0.02)

    def gammas(p, names):
        for n in names:
            sd[p + n] = rnd(d, std=0.05, mean=0.3)

    sd["cls_token"] = rnd(1, 1, d, std=0.5)
    widths = [3] + ([d // 8, d // 4, d // 2, d] if patch == 16 else [d // 4, d // 2, d])
    for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        p = f"patch_embed.proj.{2 * i}"  # Sequential(conv3x3, GELU, conv3x3, ...)
        sd[p + ".0.weight"] = rnd(cout, cin, 3, 3, std=1.4 * (cin * 9) ** -0.5)
        bn(p + ".1", cout)
    for i in range(depth):
        p = f"blocks.{i}."
        gammas(p, ("gamma1", "gamma2", "gamma3"))
        norm(p + "norm1")
        sd[p + "attn.temperature"] = 0.5 + rnd(heads, 1, 1).abs() if not meta else rnd(heads, 1, 1)
        linear(p + "attn.qkv", 3 * d, d)
        linear(p + "attn.proj", d, d)
        norm(p + "norm2")
        linear(p + "mlp.fc1", 4 * d, d)
        linear(p + "mlp.fc2", d, 4 * d)
        norm(p + "norm3")
        sd[p + "local_mp.conv1.weight"] = rnd(d, 1, 3, 3, std=1 / 3)
        sd[p + "local_mp.conv1.bias"] = rnd(d, std=0.02)
        bn(p + "local_mp.bn", d)
        sd[p + "local_mp.conv2.weight"] = rnd(d, 1, 3, 3, std=1 / 3)
        sd[p + "local_mp.conv2.bias"] = rnd(d, std=0.02)
    for i in range(2):
        p = f"cls_attn_blocks.{i}."
        gammas(p, ("gamma1", "gamma2"))
        norm(p + "norm1")
        linear(p + "attn.qkv", 3 * d, d, gain=3.0)  # a peaked attention: the image matters
        linear(p + "attn.proj", d, d)
        norm(p + "norm2")
        linear(p + "mlp.fc1", 4 * d, d)
        linear(p + "mlp.fc2", d, 4 * d)
    norm("norm")
    sd["pos_embeder.token_projection.weight"] = rnd(d, 64, 1, 1, std=64**-0.5)
    sd["pos_embeder.token_projection.bias"] = rnd(d, std=0.02)
    return sd


# ---------------------------------------------------------------- the official forward


def fourier_encoding(sd: dict[str, torch.Tensor], h: int, w: int) -> torch.Tensor:
    """PositionalEncodingFourier(hidden_dim=32, temperature=10000) for an h x w grid, (1, h*w, D)."""
    hidden, eps = 32, 1e-6
    ones = torch.ones(h, w)
    y, x = ones.cumsum(0), ones.cumsum(1)
    y = y / (y[-1:, :] + eps) * 2 * math.pi
    x = x / (x[:, -1:] + eps) * 2 * math.pi
    k = torch.arange(hidden, dtype=torch.float32)
    freq = 10000 ** (2 * torch.div(k, 2, rounding_mode="floor") / hidden)

    def embed(c):
        a = c[:, :, None] / freq
        return torch.stack((a[:, :, 0::2].sin(), a[:, :, 1::2].cos()), dim=3).flatten(2)

    pos = torch.cat((embed(y), embed(x)), dim=2).permute(2, 0, 1)[None]  # (1, 64, h, w)
    p = "pos_embeder.token_projection"
    pos = F.conv2d(pos, sd[p + ".weight"], sd[p + ".bias"])
    return pos.flatten(2).transpose(1, 2)


def official_xcit_tokens(
    sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, tokens_norm: bool
) -> tuple[torch.Tensor, tuple[int, int]]:
    """XCiT.forward_features before its ``[:, 0]``: every token after the final norm
    (B, 1 + h*w, D), and the patch grid (h, w)."""
    d = sd["cls_token"].shape[-1]
    hd = d // heads

    def lin(p, y):
        return F.linear(y, sd[p + ".weight"], sd.get(p + ".bias"))

    def ln(p, y):
        return F.layer_norm(y, (d,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)

    def bn(p, y):
        stats = (sd[p + ".running_mean"], sd[p + ".running_var"])
        return F.batch_norm(y, *stats, sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)

    def mlp(p, y):
        return lin(p + ".fc2", F.gelu(lin(p + ".fc1", y)))

    convs = sorted({int(k.split(".")[2]) for k in sd if k.startswith("patch_embed.proj.")})
    for n, i in enumerate(convs):
        p = f"patch_embed.proj.{i}"
        x = bn(p + ".1", F.conv2d(x, sd[p + ".0.weight"], stride=2, padding=1))
        if n < len(convs) - 1:
            x = F.gelu(x)
    b, _, h, w = x.shape
    t = x.flatten(2).transpose(1, 2) + fourier_encoding(sd, h, w)

    def xca(p, y):
        n = y.shape[1]
        q, k, v = lin(p + ".qkv", y).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # (b, heads, hd, n)
        attn = ((q @ k.transpose(-2, -1)) * sd[p + ".temperature"]).softmax(dim=-1)
        return lin(p + ".proj", (attn @ v).permute(0, 3, 1, 2).reshape(b, n, d))

    def lpi(p, y):
        g = y.transpose(1, 2).reshape(b, d, h, w)
        g = F.conv2d(g, sd[p + ".conv1.weight"], sd[p + ".conv1.bias"], padding=1, groups=d)
        g = bn(p + ".bn", F.gelu(g))
        g = F.conv2d(g, sd[p + ".conv2.weight"], sd[p + ".conv2.bias"], padding=1, groups=d)
        return g.reshape(b, d, h * w).transpose(1, 2)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        t = t + sd[p + "gamma1"] * xca(p + "attn", ln(p + "norm1", t))
        t = t + sd[p + "gamma3"] * lpi(p + "local_mp", ln(p + "norm3", t))
        t = t + sd[p + "gamma2"] * mlp(p + "mlp", ln(p + "norm2", t))

    def class_attention(p, y):
        n = y.shape[1]
        q, k, v = lin(p + ".qkv", y).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q[:, :, :1] * k).sum(-1) * hd**-0.5).softmax(dim=-1)  # (b, heads, n)
        cls = (attn[:, :, None] @ v).transpose(1, 2).reshape(b, 1, d)
        return torch.cat([lin(p + ".proj", cls), y[:, 1:]], dim=1)

    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], dim=1)
    for i in range(2):
        p = f"cls_attn_blocks.{i}."
        t = t + sd[p + "gamma1"] * class_attention(p + "attn", ln(p + "norm1", t))
        if tokens_norm:
            t = ln(p + "norm2", t)
        else:
            t = torch.cat([ln(p + "norm2", t[:, :1]), t[:, 1:]], dim=1)
        t = t + torch.cat([sd[p + "gamma2"] * mlp(p + "mlp", t[:, :1]), t[:, 1:]], dim=1)
    return ln("norm", t), (h, w)


# ---------------------------------------------------------------- the tags


class Spy:
    """Records the architectures the family asks for; builds ``depth`` XCA blocks if set."""

    def __init__(self, create):
        self.create, self.specs, self.depth = create, [], None

    def __call__(self, spec):
        self.specs.append(spec)
        if self.depth is not None:
            spec = dino_family.replace(spec, depth=self.depth)
        return self.create(spec)


@pytest.fixture
def spy(monkeypatch):
    s = Spy(dino_family.create_xcit)
    monkeypatch.setattr(dino_family, "create_xcit", s)
    return s


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


def test_every_xcit_of_dinos_hub_is_a_tag():
    list_backbones()  # registers every family's tags
    xcit_tags = {t for t, (family, v) in TAGS.items() if family == "dino" and "xcit" in v}
    assert xcit_tags == set(XCITS)
    for tag, (hub, name) in XCITS.items():
        assert TAGS[tag] == ("dino", name)
        assert TAG_WEIGHTS[tag].url == URL.format(hub)
        assert TAG_WEIGHTS[tag].filenames[0] == f"{hub}.pth"


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(XCITS))
def test_xcit_tag_gives_the_official_builders_features(tag, tmp_path, spy):
    hub, name = XCITS[tag]
    width, depth, heads, patch, tokens_norm = OFFICIAL[name]
    spy.depth = None if tag in FULL_DEPTH else SHALLOW
    sd = xcit_state_dict(width, spy.depth or depth, heads, patch, seed=sorted(XCITS).index(tag))
    path = tmp_path / f"{hub}.pth"
    torch.save(sd, path)
    for size in SIZES:
        bb = build_backbone(tag, BuildOptions(weights=path, image_size=size))
        x = _images(1, size)
        with torch.no_grad():
            tokens, grid = official_xcit_tokens(sd, x, heads, tokens_norm)
            got = bb.embed(x)
            patches = bb.patch_grid(x)
        assert got.shape == (1, width) and grid == (-(-size // patch),) * 2
        assert rel_diff(got, tokens[:, 0]) < 1e-5, (
            f"{tag} at {size} px: {rel_diff(got, tokens[:, 0]):.3g}"
        )
        assert patches.grid == grid
        assert rel_diff(patches.sequence()[0], tokens[0, 1:]) < 1e-5, (tag, size)
        assert bb.feature_kind == "cls"
    spec = spy.specs[0]
    assert (spec.width, spec.depth, spec.heads, spec.patch, spec.tokens_norm) == OFFICIAL[name]


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(XCITS))
def test_xcit_tag_builds_the_full_official_layout(tag):
    """At full depth (the official shapes on the meta device): the model the tag builds holds exactly the official
    file's tensors (renamed to timm's names), shape for shape, and xcit.py's settings."""
    _, name = XCITS[tag]
    width, depth, heads, patch, tokens_norm = OFFICIAL[name]
    spec = dino_family.ARCHS.pick(TAGS[tag][1], "the tag", "x.pth").spec
    model = dino_family.create_xcit(spec)  # uninitialised: allocated, not filled
    official = dino_family.xcit_to_timm(xcit_state_dict(width, depth, heads, patch, 0, meta=True))
    own = model.state_dict()
    assert sorted(own) == sorted(official)
    assert all(own[k].shape == official[k].shape for k in own), tag
    assert len(model.blocks) == depth and len(model.cls_attn_blocks) == 2
    assert all(b.tokens_norm == tokens_norm for b in model.cls_attn_blocks)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.cls_attn_blocks[0].attn.scale == (width // heads) ** -0.5


def test_xcit_tags_use_dinos_evaluation_preprocessing(tmp_path, spy):
    """eval_linear.py / eval_knn.py: Resize(256, interpolation=3), CenterCrop(224), ImageNet."""
    spy.depth = 1
    hub, name = XCITS["dino_xcit_small_12_p16"]
    width, _, heads, patch, _ = OFFICIAL[name]
    torch.save(xcit_state_dict(width, 1, heads, patch, seed=3), tmp_path / f"{hub}.pth")
    bb = build_backbone("dino_xcit_small_12_p16", BuildOptions(weights=tmp_path / f"{hub}.pth"))
    pre = bb.preprocessing
    assert (pre.resize, pre.crop, pre.interpolation) == (256, 224, "bicubic")
    assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
    arch = bb.load_report["architecture"]
    assert arch["type"] == "xcit" and arch["embed_dim"] == width and arch["patch_size"] == 16
    assert arch["from"].startswith("the tag: 'xcit_small_12_p16'")
    with pytest.raises(UserError, match="class token joins only in its two class-attention"):
        build_backbone(
            "dino_xcit_small_12_p16",
            BuildOptions(weights=tmp_path / f"{hub}.pth", feature_kind="last:4"),
        ).embed(_images(1, 32))


# ---------------------------------------------------------------- ckpt:PATH


def _nano(seed: int) -> dict[str, torch.Tensor]:
    width, depth, heads, patch, _ = OFFICIAL["xcit_nano_12_p16"]
    return xcit_state_dict(width, depth, heads, patch, seed=seed)


def _training_file(path, sd, arch, head=True):
    """main_dino.py's checkpoint: teacher and student in DDP (XCiT has BatchNorm), the DINO
    head beside the backbone, args with the default --patch_size 16 (unused by an XCiT)."""
    ckpt = {
        "teacher": {f"module.backbone.{k}": v for k, v in sd.items()},
        "student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()},
        "args": argparse.Namespace(arch=arch, patch_size=16),
        "epoch": 3,
    }
    if head:
        ckpt["teacher"]["module.head.last_layer.weight_v"] = torch.zeros(5, 8)
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
def test_xcit_files_read_as_ckpt_path(tmp_path):
    """A hub-style flat file (the architecture from its shapes) and a training checkpoint
    (args.arch, the teacher): xcit_nano_12_p16, whose class-attention norm2 sees only the
    class token (tokens_norm=False), at 64 px."""
    sd = _nano(seed=11)
    x = _images(2, 64)
    with torch.no_grad():
        want = official_xcit_tokens(sd, x, 4, tokens_norm=False)[0][:, 0]
    torch.save(sd, tmp_path / "flat.pth")
    flat = build_backbone(f"ckpt:{tmp_path / 'flat.pth'}", BuildOptions(image_size=64))
    assert flat.load_report["family"] == "dino"
    assert flat.load_report["architecture"]["from"].startswith("the tensor shapes (128 wide")
    assert "'xcit_nano_12_p16'" in flat.load_report["architecture"]["from"]
    trained = _training_file(tmp_path / "checkpoint.pth", sd, "xcit_nano_12_p16")
    train = build_backbone(f"ckpt:{trained}", BuildOptions(image_size=64))
    assert train.load_report["format"] == "dino (teacher.module.backbone)"
    for bb in (flat, train):
        with torch.no_grad():
            got = bb.embed(x)
        assert rel_diff(got, want) < 1e-5, bb.load_report["architecture"]["from"]


@pytest.mark.slow
def test_xcit_files_refuse_what_disagrees(tmp_path):
    sd = _nano(seed=12)
    flat = tmp_path / "flat.pth"
    torch.save(sd, flat)
    opt = BuildOptions(image_size=64)
    with pytest.raises(UserError, match="holds an XCiT, not the vit_small_patch16_224"):
        build_backbone("dino_vits16", BuildOptions(weights=flat))
    with pytest.raises(UserError, match="holds an XCiT, but --arch says 'vit_small'"):
        build_backbone(f"ckpt:{flat}", BuildOptions(image_size=64, arch="vit_small"))
    with pytest.raises(UserError, match="does not match the architecture"):
        build_backbone(f"ckpt:{flat}", BuildOptions(image_size=64, arch="xcit_tiny_12_p16"))
    with pytest.raises(UserError, match="builds no model of that name"):
        build_backbone(f"ckpt:{flat}", BuildOptions(image_size=64, arch="xcit"))
    trained = _training_file(tmp_path / "t.pth", sd, "xcit_nano_12_p8")
    with pytest.raises(UserError, match="checkpoint does not match the architecture"):
        build_backbone(f"ckpt:{trained}", opt)
    torch.save(vit_state_dict(384, 1, 16, seed=1), tmp_path / "vit.pth")
    with pytest.raises(UserError, match="holds a ViT, but the tag says 'xcit_small_12_p16'"):
        build_backbone("dino_xcit_small_12_p16", BuildOptions(weights=tmp_path / "vit.pth"))
    shallow = {k: v for k, v in sd.items() if not k.startswith("blocks.11.")}
    torch.save(shallow, tmp_path / "shallow.pth")
    with pytest.raises(UserError, match="no XCiT of xcit.py is 128 wide with 11 blocks"):
        build_backbone(f"ckpt:{tmp_path / 'shallow.pth'}", opt)
