"""Every DINOv3 tag against its own official builder (issue 20, point 0).

The reference is written here, self-contained (CI has neither network nor the authors'
repository), from facebookresearch/dinov3 at commit 6876159a11b4df116f30f667f8c9888617df0751:

- ``dinov3/hub/backbones.py``: ``dinov3_vits16``, ``vits16plus``, ``vitb16``, ``vitl16``,
  ``vitl16plus``, ``vith16plus``, ``vit7b16`` (width, depth, heads, ffn_ratio, ``mlp``,
  ``swiglu`` or ``swiglu64``; the 7B with ``qkv_bias=False``; the 7B and ``vitl16`` with
  ``Weights.SAT493M`` with ``untie_global_and_local_cls_norm=True``), all with patch 16,
  ``n_storage_tokens=4``, ``layerscale_init=1e-5``, ``norm_layer="layernormbf16"`` (LayerNorm
  eps 1e-5), ``mask_k_bias=True``, RoPE base 100 with ``normalize_coords="separate"`` (its
  ``rescale_coords`` acts in training only), rope dtype fp32; ``dinov3_convnext_*`` with
  ``convnext_sizes`` (depths, dims) of ``models/convnext.py``. The hub loads with
  ``strict=True``: the file holds every key of the model's ``state_dict``.
- ``models/vision_transformer.py``: ``prepare_tokens_with_masks`` (class token, the 4 storage
  tokens, then the patches; no absolute position table), the ``x_norm_clstoken`` of
  ``forward_features`` (the final ``norm`` on every token, the class token taken; untied, at
  evaluation, ``norm`` on the class and storage tokens and ``norm`` on the patches: the
  ``local_cls_norm`` the file also holds acts on local crops in training only).
- ``layers/rope_position_encoding.py``: the persistent ``periods`` buffer (filled from the
  file by the strict load; the schedule ``base ** (2k / (D_head / 2))`` only at
  initialisation), coordinates ``(i + 0.5) / H`` mapped to [-1, 1], angles
  ``2 pi coord / period`` for (h, w) flattened then tiled twice.
- ``layers/attention.py``: ``LinearKMaskedBias`` (bias times the file's ``bias_mask``), RoPE
  on the patch tokens only (``rope_apply``: ``x cos + rotate_half(x) sin``), scaled dot-product
  attention; ``layers/block.py`` pre-norm with LayerScale ``ls1``/``ls2``;
  ``layers/ffn_layers.py`` ``Mlp`` (``fc1``, GELU, ``fc2``) and ``SwiGLUFFN`` (``w1`` gate,
  ``w2`` value, ``w3``; hidden ``int(2/3 h)`` rounded up to ``align_to``: 8, 64 for
  ``swiglu64``).
- ``README.md``: the SAT-493M weights' transform normalises with mean (0.430, 0.411, 0.296),
  std (0.213, 0.156, 0.143); ``hub/backbones.py`` ``_make_dinov3_vit_model_url`` names the files
  ``<hub>/<hub>_pretrain_<lvd1689m|sat493m>-<hash>.pth``.
- ``models/convnext.py``: stem conv 4/4 + channels-first LayerNorm, downsamples LayerNorm +
  conv 2/2, blocks dwconv 7 -> LayerNorm -> ``pwconv1`` -> GELU -> ``pwconv2`` -> ``gamma``,
  the feature ``norm`` of the average pool (``x_norm_clstoken``); ``self.norms[3]`` is the same
  module as ``self.norm``, so its state dict holds ``norms.3.*`` beside ``norm.*``.

Random weights are written in the hub files' exact key layout and read through each tag. The
released ViT files hold RoPE periods rounded to bfloat16 (timm's port notes it), which the
official model uses; the tests write such periods. ViT-S/16 and ConvNeXt-T run at full depth;
the others at their real width, heads and MLP with one block (one per stage), but the 7B: its
full-size architecture is built on the meta device and checked against the hub's table and the
official file's keys and shapes, and its features are compared through the same code path at
width 112, 2 heads, 2 blocks, where ``swiglu64`` rounds the SwiGLU width (224 -> 256) unlike
``swiglu`` (224), with no q/k/v bias and the untied norm.
"""

import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from test_checkpoint_formats import _one_thread  # noqa: F401
from test_variants_dino import rel_diff

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.adapters import TAG_WEIGHTS, TAGS
from ssl_eval.backbones.checkpoints import strict_load
from ssl_eval.backbones.families import dinov3 as dinov3_family
from ssl_eval.backbones.vit import split_keys
from ssl_eval.core.errors import UserError

PATCH, STORAGE, BASE = 16, 4, 100.0
# hub/backbones.py @ 6876159: tag -> (hub function, hash, width, depth, heads, ffn_ratio, ffn)
VITS = {
    "dinov3_vits16": ("dinov3_vits16", "08c60483", 384, 12, 6, 4.0, "mlp"),
    "dinov3_vitsp16": ("dinov3_vits16plus", "4057cbaa", 384, 12, 6, 6.0, "swiglu"),
    "dinov3_vitb16": ("dinov3_vitb16", "73cec8be", 768, 12, 12, 4.0, "mlp"),
    "dinov3_vitl16": ("dinov3_vitl16", "8aa4cbdd", 1024, 24, 16, 4.0, "mlp"),
    "dinov3_vith16p": ("dinov3_vith16plus", "7c1da9a5", 1280, 32, 20, 6.0, "swiglu"),
    "dinov3_vitl16p": ("dinov3_vitl16plus", "46503df0", 1024, 24, 16, 6.0, "swiglu"),
    "dinov3_vit7b16": ("dinov3_vit7b16", "a955f4ea", 4096, 40, 32, 3.0, "swiglu64"),
    "dinov3_vitl16_sat": ("dinov3_vitl16", "eadcf0ff", 1024, 24, 16, 4.0, "mlp"),
    "dinov3_vit7b16_sat": ("dinov3_vit7b16", "a6675841", 4096, 40, 32, 3.0, "swiglu64"),
}
FIRST = ("dinov3_vits16", "dinov3_vitsp16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16p")
SAT = {"dinov3_vitl16_sat", "dinov3_vit7b16_sat"}  # weights=Weights.SAT493M
NO_QKV_BIAS = {"dinov3_vit7b16", "dinov3_vit7b16_sat"}  # qkv_bias=False
UNTIED = {"dinov3_vit7b16", "dinov3_vit7b16_sat", "dinov3_vitl16_sat"}  # untie_global_and_...
ALIGN = {"mlp": None, "swiglu": 8, "swiglu64": 64}  # vision_transformer.py ffn_layer_dict
# README.md, the SAT-493M transform's Normalize; the LVD-1689M one's is ImageNet's
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# the 7B's features are compared at this (width, heads, depth): swiglu64 matters at 112
SMALL_7B = (112, 2, 2)
# models/convnext.py convnext_sizes: tag -> (hub function, hash, depths, dims)
CONVNEXTS = {
    "dinov3_convnext_tiny": ("dinov3_convnext_tiny", "21b726bb", (3, 3, 9, 3), (96, 192, 384, 768)),
    "dinov3_convnext_small": (
        "dinov3_convnext_small",
        "296db49d",
        (3, 3, 27, 3),
        (96, 192, 384, 768),
    ),
    "dinov3_convnext_base": (
        "dinov3_convnext_base",
        "801f2ba9",
        (3, 3, 27, 3),
        (128, 256, 512, 1024),
    ),
    "dinov3_convnext_large": (
        "dinov3_convnext_large",
        "61fa432d",
        (3, 3, 27, 3),
        (192, 384, 768, 1536),
    ),
}
FULL_DEPTH = ("dinov3_vits16", "dinov3_convnext_tiny")


def file_name(tag: str) -> str:
    """hub/backbones.py _make_dinov3_*_model_url: dinov3_<arch>_pretrain_<weights>-<hash>.pth."""
    hub, h = (VITS.get(tag) or CONVNEXTS[tag])[:2]
    return f"{hub}_pretrain_{'sat493m' if tag in SAT else 'lvd1689m'}-{h}.pth"


def official_periods(head_dim: int) -> torch.Tensor:
    """RopePositionEmbedding._init_weights with base 100, in float32."""
    k = torch.arange(head_dim // 4, dtype=torch.float32)
    return BASE ** (2 * k / (head_dim // 2))


def swiglu_hidden(dim: int, ratio: float, align: int = 8) -> int:
    """SelfAttentionBlock's int(dim * ffn_ratio) through SwiGLUFFN(align_to=align)."""
    d = int(int(dim * ratio) * 2 / 3)
    return d + (-d % align)


def vit_shapes(tag: str, depth: int, dim: int | None = None, heads: int | None = None) -> dict:
    """DinoVisionTransformer.state_dict()'s names and shapes for the tag's hub builder (at
    ``dim`` wide with ``heads`` heads where given)."""
    _, _, width, _, n_heads, ratio, ffn = VITS[tag]
    dim, heads = dim or width, heads or n_heads
    shapes = {
        "cls_token": (1, 1, dim),
        "storage_tokens": (1, STORAGE, dim),
        "mask_token": (1, dim),
        "rope_embed.periods": (dim // heads // 4,),
        "patch_embed.proj.weight": (dim, 3, PATCH, PATCH),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if tag in UNTIED:
        shapes |= {"local_cls_norm.weight": (dim,), "local_cls_norm.bias": (dim,)}
    if ffn == "mlp":
        h = int(dim * ratio)
        mlp = {"fc1": (h, dim), "fc2": (dim, h)}
    else:
        h = swiglu_hidden(dim, ratio, ALIGN[ffn])
        mlp = {"w1": (h, dim), "w2": (h, dim), "w3": (dim, h)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes[p + "attn.qkv.weight"] = (3 * dim, dim)
        if tag not in NO_QKV_BIAS:  # LinearKMaskedBias: a bias_mask only with a bias
            shapes[p + "attn.qkv.bias"] = shapes[p + "attn.qkv.bias_mask"] = (3 * dim,)
        shapes[p + "attn.proj.weight"], shapes[p + "attn.proj.bias"] = (dim, dim), (dim,)
        for k, (out, inp) in mlp.items():
            shapes[p + f"mlp.{k}.weight"], shapes[p + f"mlp.{k}.bias"] = (out, inp), (out,)
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            shapes[p + name] = (dim,)
        shapes[p + "ls1.gamma"] = shapes[p + "ls2.gamma"] = (dim,)
    return shapes


def _rnd(g):
    def rnd(*shape, std=1.0, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    return rnd


def vit_state_dict(
    tag: str, depth: int, seed: int, periods=None, dim: int | None = None, heads: int | None = None
) -> dict[str, torch.Tensor]:
    """Random weights under DinoVisionTransformer's state-dict names (buffers included)."""
    shapes = vit_shapes(tag, depth, dim, heads)
    dim = shapes["cls_token"][-1]
    rnd = _rnd(torch.Generator().manual_seed(seed))
    if periods is None:  # as released: the schedule rounded to bfloat16
        periods = official_periods(4 * shapes["rope_embed.periods"][0]).to(torch.bfloat16)
    mask = torch.ones(3 * dim)
    mask[dim : 2 * dim] = 0  # init_weights_vit: the k third
    sd = {}
    for k, shape in shapes.items():
        if k == "mask_token":
            sd[k] = torch.zeros(shape)
        elif k == "rope_embed.periods":
            sd[k] = periods
        elif k.endswith("bias_mask"):
            sd[k] = mask.clone()
        elif k.endswith("norm.weight") or k.endswith(("norm1.weight", "norm2.weight")):
            sd[k] = rnd(*shape, std=0.1, mean=1.0)
        elif k.endswith(".gamma"):
            sd[k] = rnd(*shape, std=0.1, mean=0.3)
        elif k == "patch_embed.proj.weight":
            sd[k] = rnd(*shape, std=(3 * PATCH * PATCH) ** -0.5)
        elif k.startswith("blocks.") and k.endswith(".weight"):
            sd[k] = rnd(*shape, std=shape[1] ** -0.5)
        elif k.startswith("blocks.") and k.endswith(".bias") and "norm" not in k:
            sd[k] = rnd(*shape, std=0.1)
        elif k.endswith(".bias"):
            sd[k] = rnd(*shape, std=0.02)
        else:  # cls_token, storage_tokens
            sd[k] = rnd(*shape)
    return sd


def official_rope(periods: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RopePositionEmbedding.forward (eval, normalize_coords="separate")."""
    ch = torch.arange(0.5, h, dtype=torch.float32) / h
    cw = torch.arange(0.5, w, dtype=torch.float32) / w
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods.float()[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return angles.sin(), angles.cos()


def rope_apply(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def official_vit_feature(
    sd: dict[str, torch.Tensor], x: torch.Tensor, tag: str, heads: int | None = None
) -> torch.Tensor:
    """x_norm_clstoken of DinoVisionTransformer.forward_features (eval) holding ``sd``."""
    _, _, _, _, n_heads, _, ffn = VITS[tag]
    dim, heads = sd["cls_token"].shape[-1], heads or n_heads
    hd = dim // heads
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    b, _, h, w = t.shape
    t = t.flatten(2).transpose(1, 2)
    cls = sd["cls_token"] + 0 * sd["mask_token"]
    t = torch.cat([cls.expand(b, -1, -1), sd["storage_tokens"].expand(b, -1, -1), t], dim=1)
    n, prefix = t.shape[1], 1 + STORAGE
    sin, cos = official_rope(sd["rope_embed.periods"], h, w)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})

    def lin(p, y, bias=None):
        return F.linear(y, sd[p + ".weight"], sd[p + ".bias"] if bias is None else bias)

    def norm(p, y):
        return F.layer_norm(y, (dim,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    for i in range(depth):
        p = f"blocks.{i}."
        if tag in NO_QKV_BIAS:  # nn.Linear(bias=False) inside LinearKMaskedBias
            qkv = F.linear(norm(p + "norm1", t), sd[p + "attn.qkv.weight"])
        else:
            bias = sd[p + "attn.qkv.bias"] * sd[p + "attn.qkv.bias_mask"]
            qkv = lin(p + "attn.qkv", norm(p + "norm1", t), bias)
        qkv = qkv.reshape(b, n, 3, heads, hd)
        q, k, v = (u.transpose(1, 2) for u in qkv.unbind(2))
        q = torch.cat([q[:, :, :prefix], rope_apply(q[:, :, prefix:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :prefix], rope_apply(k[:, :, prefix:], sin, cos)], dim=2)
        attn = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        y = lin(p + "attn.proj", (attn @ v).transpose(1, 2).reshape(b, n, dim))
        t = t + sd[p + "ls1.gamma"] * y
        y = norm(p + "norm2", t)
        if ffn != "mlp":
            y = lin(p + "mlp.w3", F.silu(lin(p + "mlp.w1", y)) * lin(p + "mlp.w2", y))
        else:
            y = lin(p + "mlp.fc2", F.gelu(lin(p + "mlp.fc1", y)))
        t = t + sd[p + "ls2.gamma"] * y
    if tag in UNTIED:  # not training: self.norm on class + storage tokens, self.norm on patches
        return norm("norm", t[:, :prefix])[:, 0]
    return norm("norm", t)[:, 0]


def convnext_state_dict(tag: str, depths, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under models/convnext.py ConvNeXt's state-dict names (norms.3 included)."""
    dims = CONVNEXTS[tag][3]
    rnd = _rnd(torch.Generator().manual_seed(seed))

    def ln(p, d):
        return {p + ".weight": rnd(d, std=0.1, mean=1.0), p + ".bias": rnd(d, std=0.02)}

    sd = {
        "downsample_layers.0.0.weight": rnd(dims[0], 3, 4, 4, std=48**-0.5),
        "downsample_layers.0.0.bias": rnd(dims[0], std=0.02),
        **ln("downsample_layers.0.1", dims[0]),
    }
    for i in range(1, 4):
        sd |= ln(f"downsample_layers.{i}.0", dims[i - 1])
        sd[f"downsample_layers.{i}.1.weight"] = rnd(
            dims[i], dims[i - 1], 2, 2, std=(4 * dims[i - 1]) ** -0.5
        )
        sd[f"downsample_layers.{i}.1.bias"] = rnd(dims[i], std=0.02)
    for i, (n, d) in enumerate(zip(depths, dims, strict=True)):
        for j in range(n):
            p = f"stages.{i}.{j}."
            sd[p + "dwconv.weight"] = rnd(d, 1, 7, 7, std=49**-0.5)
            sd[p + "dwconv.bias"] = rnd(d, std=0.02)
            sd |= ln(p + "norm", d)
            sd[p + "pwconv1.weight"] = rnd(4 * d, d, std=d**-0.5)
            sd[p + "pwconv1.bias"] = rnd(4 * d, std=0.02)
            sd[p + "pwconv2.weight"] = rnd(d, 4 * d, std=(4 * d) ** -0.5)
            sd[p + "pwconv2.bias"] = rnd(d, std=0.02)
            sd[p + "gamma"] = rnd(d, std=0.1, mean=0.3)
    sd |= ln("norm", dims[-1])
    sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"], sd["norm.bias"]
    return sd


def official_convnext_feature(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """x_norm_clstoken of models/convnext.py ConvNeXt.forward_features: norm of the mean."""

    def ln_first(p, y):  # LayerNorm, channels_first, eps 1e-6
        u = y.mean(1, keepdim=True)
        s = (y - u).pow(2).mean(1, keepdim=True)
        y = (y - u) / torch.sqrt(s + 1e-6)
        return sd[p + ".weight"][:, None, None] * y + sd[p + ".bias"][:, None, None]

    def conv(p, y, **kw):
        return F.conv2d(y, sd[p + ".weight"], sd[p + ".bias"], **kw)

    for i in range(4):
        if i == 0:
            x = ln_first("downsample_layers.0.1", conv("downsample_layers.0.0", x, stride=4))
        else:
            x = conv(f"downsample_layers.{i}.1", ln_first(f"downsample_layers.{i}.0", x), stride=2)
        n = len({k.split(".")[2] for k in sd if k.startswith(f"stages.{i}.")})
        for j in range(n):
            p = f"stages.{i}.{j}."
            d = x.shape[1]
            y = conv(p + "dwconv", x, padding=3, groups=d).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (d,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-6)
            y = F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"])
            y = F.linear(F.gelu(y), sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
            x = x + (sd[p + "gamma"] * y).permute(0, 3, 1, 2)
    pool = x.mean([-2, -1])
    return F.layer_norm(pool, (x.shape[1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


@pytest.fixture
def shallow(monkeypatch):
    """Ask the tag path for one block (ViTs) or one block per stage (ConvNeXts)."""
    create = dinov3_family.create_timm

    def one_block(arch, img_size=None, **kw):
        kw |= {"depths": (1, 1, 1, 1)} if arch.startswith("convnext") else {"depth": 1}
        return create(arch, img_size, **kw)

    monkeypatch.setattr(dinov3_family, "create_timm", one_block)


@pytest.fixture
def small_7b(monkeypatch):
    """The 7B's builder entry at SMALL_7B's width, heads and depth, all else as it is."""
    spec = dinov3_family.ARCHS.names["dinov3_vit7b16"]
    dim, heads, depth = SMALL_7B
    small = dataclasses.replace(spec, embed_dim=dim, heads=heads, depth=depth)
    monkeypatch.setitem(dinov3_family.ARCHS.names, "dinov3_vit7b16", small)


def family_spec(tag: str):
    """The family's entry for the tag's variant (what its tag path builds)."""
    return dinov3_family.ARCHS.pick(TAGS[tag][1], "the tag", "test").spec


def family_model_on_meta(tag: str, biased: bool | None = None):
    spec = family_spec(tag)
    arch, kw = spec.timm_args(tag not in NO_QKV_BIAS if biased is None else biased)
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0, global_pool="token", **kw)


@pytest.mark.slow
def test_every_dinov3_tag_is_covered_with_its_builders_architecture():
    list_backbones()  # registers every family's tags
    assert {t for t, (family, _) in TAGS.items() if family == "dinov3"} == set(VITS) | set(
        CONVNEXTS
    )
    for tag in FIRST:  # timm's own registered architectures
        (_, _, dim, depth, heads, ratio, ffn) = VITS[tag]
        with torch.device("meta"):
            m = timm.create_model(TAGS[tag][1] + "_qkvb", pretrained=False, num_classes=0)
        blk = m.blocks[0]
        got = (m.embed_dim, len(m.blocks), blk.attn.num_heads, m.reg_token.shape[1])
        assert got == (dim, depth, heads, STORAGE), tag
        assert m.patch_embed.proj.kernel_size == (PATCH, PATCH), tag
        assert m.pos_embed is None and m.rope.temperature == BASE, tag  # RoPE only, base 100
        assert (m.norm.eps, blk.norm1.eps) == (1e-5, 1e-5), tag  # layernormbf16
        assert blk.gamma_1 is not None and blk.gamma_2 is not None, tag  # layer scale
        if ffn == "swiglu":
            assert blk.mlp.fc1_g.out_features == swiglu_hidden(dim, ratio), tag
        else:
            assert blk.mlp.fc1.out_features == int(dim * ratio), tag
        theirs = {k: v.shape for k, v in m.state_dict().items()}
        ours = {k: v.shape for k, v in family_model_on_meta(tag).state_dict().items()}
        assert ours == theirs, tag  # the family's arguments build timm's own model
    for tag, (_, _, dim, depth, heads, ratio, ffn) in VITS.items():  # what the family builds
        m = family_model_on_meta(tag)
        blk = m.blocks[0]
        got = (m.embed_dim, len(m.blocks), blk.attn.num_heads, m.reg_token.shape[1])
        assert got == (dim, depth, heads, STORAGE), tag
        assert m.patch_embed.proj.kernel_size == (PATCH, PATCH), tag
        assert m.pos_embed is None and m.rope.temperature == BASE, tag
        assert (m.norm.eps, blk.norm1.eps) == (1e-5, 1e-5), tag
        assert blk.gamma_1 is not None and blk.gamma_2 is not None, tag
        assert (blk.attn.q_bias is not None) == (tag not in NO_QKV_BIAS), tag
        spec = family_spec(tag)
        assert (spec.hub, spec.qkv_bias) == (VITS[tag][0], tag not in NO_QKV_BIAS), tag
        assert spec.untied is (True if tag in UNTIED else spec.untied), tag  # True: required
        assert tag in UNTIED or not spec.untied, tag
        if ffn == "mlp":
            assert blk.mlp.fc1.out_features == int(dim * ratio), tag
        else:
            assert blk.mlp.fc1_g.out_features == swiglu_hidden(dim, ratio, ALIGN[ffn]), tag
    for tag, (_, _, depths, dims) in CONVNEXTS.items():
        with torch.device("meta"):
            m = timm.create_model(TAGS[tag][1], pretrained=False, num_classes=0)
        assert tuple(len(s.blocks) for s in m.stages) == depths, tag
        assert tuple(s.blocks[0].conv_dw.in_channels for s in m.stages) == dims, tag


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(VITS))
def test_vit_tag_gives_the_official_builders_features(tag, tmp_path, request):
    dim = heads = None
    if tag in FULL_DEPTH:
        depth = VITS[tag][3]
    elif VITS[tag][0] == "dinov3_vit7b16":
        request.getfixturevalue("small_7b")
        dim, heads, depth = SMALL_7B
    else:
        depth = 1
        request.getfixturevalue("shallow")
    sd = vit_state_dict(tag, depth, seed=sorted(VITS).index(tag), dim=dim, heads=heads)
    path = tmp_path / file_name(tag)
    torch.save(sd, path)
    for size in (224, 160):
        bb = build_backbone(tag, BuildOptions(weights=path, image_size=size))
        assert len(bb.model.blocks) == depth
        x = torch.randn(
            2 if size < 224 else 1, 3, size, size, generator=torch.Generator().manual_seed(size)
        )
        with torch.no_grad():
            got, want = bb.embed(x), official_vit_feature(sd, x, tag, heads=heads)
        assert rel_diff(got, want) < 1e-5, f"{tag} at {size} px: {rel_diff(got, want):.3g}"
    if tag in UNTIED:  # the untied norm is checked to be there and not used
        assert bb.load_report["local_cls_norm"].startswith("in the file, not used")
        assert "local_cls_norm.weight" in bb.load_report["dropped"]


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(CONVNEXTS))
def test_convnext_tag_gives_the_official_builders_features(tag, tmp_path, request):
    depths = CONVNEXTS[tag][2] if tag in FULL_DEPTH else (1, 1, 1, 1)
    if tag not in FULL_DEPTH:
        request.getfixturevalue("shallow")
    sd = convnext_state_dict(tag, depths, seed=10 + sorted(CONVNEXTS).index(tag))
    path = tmp_path / file_name(tag)
    torch.save(sd, path)
    for size in (224, 160):
        bb = build_backbone(tag, BuildOptions(weights=path, image_size=size))
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            got, want = bb.embed(x), official_convnext_feature(sd, x)
        assert rel_diff(got, want) < 1e-5, f"{tag} at {size} px: {rel_diff(got, want):.3g}"


@pytest.mark.slow
def test_rope_periods_are_the_files(tmp_path, shallow):
    """The official model uses the periods its file holds (a persistent buffer, strict load):
    the exact schedule gives timm's recomputed periods; the released bfloat16 rounding, or
    any other periods, are used as they are, not silently replaced by the recomputation."""
    tag = "dinov3_vits16"
    exact = official_periods(384 // 6)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    for name, periods in (
        ("exact", exact),
        ("bfloat16", exact.to(torch.bfloat16)),
        ("bf16 values in float32", exact.to(torch.bfloat16).float()),
        ("other", exact * 1.5),
    ):
        sd = vit_state_dict(tag, 1, seed=3, periods=periods)
        torch.save(sd, tmp_path / file_name(tag))
        bb = build_backbone(tag, BuildOptions(weights=tmp_path / file_name(tag), image_size=96))
        torch.testing.assert_close(bb.model.rope.periods, periods.float(), rtol=0, atol=0)
        said = bb.load_report["rope_periods"]
        if name == "exact":  # timm's recomputed schedule is the official one
            torch.testing.assert_close(
                timm.create_model(TAGS[tag][1], num_classes=0).rope.periods, exact
            )
            assert "equal to the base-100 schedule" in said, said
        else:
            assert said.startswith("the file's (") and "relative" in said, said
        with torch.no_grad():
            got, want = bb.embed(x), official_vit_feature(sd, x, tag)
        assert rel_diff(got, want) < 1e-5, f"{name} periods: {rel_diff(got, want):.3g}"


def test_a_bias_mask_other_than_the_k_third_is_refused(tmp_path):
    sd = vit_state_dict("dinov3_vits16", 2, seed=4)
    sd["blocks.1.attn.qkv.bias_mask"] = torch.ones(3 * 384)  # the k bias would act
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="bias_mask"):
        build_backbone(f"ckpt:{tmp_path / 'odd.pth'}", BuildOptions(image_size=32))


def test_convnext_norms_copy_must_be_the_final_norm(tmp_path, shallow):
    sd = convnext_state_dict("dinov3_convnext_tiny", (1, 1, 1, 1), seed=6)
    sd["norms.3.weight"] = sd["norm.weight"] + 1  # the model would load this one last
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"norms\.3\.weight is not a copy of norm\.weight"):
        build_backbone(
            "dinov3_convnext_tiny", BuildOptions(weights=tmp_path / "odd.pth", image_size=32)
        )


@pytest.mark.slow
@pytest.mark.parametrize("tag", list(VITS))
def test_full_size_official_file_is_exactly_the_familys_architecture(tag):
    """The hub's full-size key set and shapes (the 7B's too, on the meta device) load strictly
    into what the tag builds; only the documented keys are left out."""
    official = {k: torch.empty(v, device="meta") for k, v in vit_shapes(tag, VITS[tag][3]).items()}
    sd, dropped = split_keys(official, *dinov3_family._VIT_DROP)
    sd, biased = dinov3_family._vit_to_timm(sd)
    assert biased == (tag not in NO_QKV_BIAS), tag
    leftover = {k.split(".")[-1] if k.startswith("blocks.") else k for k in dropped}
    want = {"mask_token", "rope_embed.periods"} | ({"bias_mask"} if biased else set())
    if tag in UNTIED:
        want |= {"local_cls_norm.weight", "local_cls_norm.bias"}
    assert leftover == want, tag
    model = family_model_on_meta(tag, biased)
    strict_load(model, sd)  # raises on any missing, unexpected or misshapen key
    assert model.rope.periods.shape == official["rope_embed.periods"].shape, tag


@pytest.mark.slow
def test_untied_and_biasless_builders_read_only_their_own_files(tmp_path, small_7b, shallow):
    """The hub loads strictly: an untied builder's file holds local_cls_norm, a tied one's
    none; the 7B's holds no q/k/v bias."""
    cases = []
    sd = vit_state_dict("dinov3_vit7b16", 1, seed=20, dim=SMALL_7B[0], heads=SMALL_7B[1])
    cases.append(("dinov3_vit7b16", {k: v for k, v in sd.items() if "local_cls" not in k}))
    cases.append(("dinov3_vit7b16_sat", sd | {"local_cls_norm.bias": torch.zeros(8)}))
    sat = vit_state_dict("dinov3_vitl16_sat", 1, seed=21)
    cases.append(("dinov3_vitl16_sat", {k: v for k, v in sat.items() if "local_cls" not in k}))
    plus = vit_state_dict("dinov3_vitl16p", 1, seed=22)
    cases.append(("dinov3_vitl16p", plus | {"local_cls_norm.weight": torch.ones(1024)}))
    for tag, bad in cases:
        torch.save(bad, tmp_path / file_name(tag))
        with pytest.raises(UserError, match="local_cls_norm"):
            build_backbone(tag, BuildOptions(weights=tmp_path / file_name(tag), image_size=32))
    dim = SMALL_7B[0]
    biased = sd | {"blocks.0.attn.qkv.bias": torch.zeros(3 * dim)}
    torch.save(biased, tmp_path / file_name("dinov3_vit7b16"))
    with pytest.raises(UserError, match=r"qkv_bias=False"):
        build_backbone(
            "dinov3_vit7b16",
            BuildOptions(weights=tmp_path / file_name("dinov3_vit7b16"), image_size=32),
        )


@pytest.mark.slow
def test_tags_urls_and_normalisation_are_the_hubs_and_readmes(tmp_path, shallow):
    list_backbones()
    for tag in [*VITS, *CONVNEXTS]:
        hub = (VITS.get(tag) or CONVNEXTS[tag])[0]
        url = f"https://dl.fbaipublicfiles.com/dinov3/{hub}/{file_name(tag)}"
        assert TAG_WEIGHTS[tag].url == url, tag
    sd = vit_state_dict("dinov3_vitl16_sat", 1, seed=23)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for name, tag in (
        (file_name("dinov3_vitl16_sat"), "dinov3_vitl16_sat"),
        ("renamed.pth", "dinov3_vitl16_sat"),  # the tag says SAT-493M, whatever the name
        (file_name("dinov3_vitl16"), "dinov3_vitl16"),
    ):
        torch.save(sd, tmp_path / name)
        bb = build_backbone(tag, BuildOptions(weights=tmp_path / name, image_size=32))
        pre = bb.preprocessing
        mean, std = (SAT_MEAN, SAT_STD) if tag in SAT else (IMAGENET_MEAN, IMAGENET_STD)
        assert (pre.mean, pre.std) == (mean, std), (name, tag)
        assert (pre.resize, pre.crop, pre.interpolation) == (37, 32, "bicubic"), (name, tag)
        assert ("normalisation" in bb.load_report) == (tag in SAT), (name, tag)
        with torch.no_grad():
            assert rel_diff(bb.embed(x), official_vit_feature(sd, x, "dinov3_vitl16_sat")) < 1e-5
    full = build_backbone("dinov3_vitl16_sat", BuildOptions(weights=tmp_path / "renamed.pth"))
    assert (full.preprocessing.resize, full.preprocessing.crop) == (256, 224)
    # through ckpt:PATH the official file name says which data set the weights are from
    via = build_backbone(
        f"ckpt:{tmp_path / file_name('dinov3_vitl16_sat')}", BuildOptions(image_size=32)
    )
    assert (via.preprocessing.mean, via.preprocessing.std) == (SAT_MEAN, SAT_STD)
    assert "_pretrain_sat493m" in via.load_report["normalisation"]
    plain = build_backbone(f"ckpt:{tmp_path / 'renamed.pth'}", BuildOptions(image_size=32))
    assert (plain.preprocessing.mean, plain.preprocessing.std) == (IMAGENET_MEAN, IMAGENET_STD)
    # a tag given a file named as the other data set's is refused, naming the right tag
    with pytest.raises(UserError, match="SAT493M weights.*dinov3_vitl16_sat"):
        build_backbone(
            "dinov3_vitl16",
            BuildOptions(weights=tmp_path / file_name("dinov3_vitl16_sat"), image_size=32),
        )
    with pytest.raises(UserError, match="LVD1689M weights.*dinov3_vitl16\\b"):
        build_backbone(
            "dinov3_vitl16_sat",
            BuildOptions(weights=tmp_path / file_name("dinov3_vitl16"), image_size=32),
        )


@pytest.mark.slow
def test_new_builders_through_ckpt_path_by_hub_name_and_by_shapes(tmp_path, small_7b, shallow):
    """--arch takes the hub's names; without it, the width and MLP pick the builder."""
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    plus = vit_state_dict("dinov3_vitl16p", 1, seed=24)
    torch.save(plus, tmp_path / "plus.pth")
    for arch in ("dinov3_vitl16plus", None):
        bb = build_backbone(f"ckpt:{tmp_path / 'plus.pth'}", BuildOptions(image_size=48, arch=arch))
        with torch.no_grad():
            assert rel_diff(bb.embed(x), official_vit_feature(plus, x, "dinov3_vitl16p")) < 1e-5
    dim, heads, _ = SMALL_7B
    big = vit_state_dict("dinov3_vit7b16_sat", 1, seed=25, dim=dim, heads=heads)  # shallow
    torch.save(big, tmp_path / file_name("dinov3_vit7b16_sat"))
    bb = build_backbone(
        f"ckpt:{tmp_path / file_name('dinov3_vit7b16_sat')}",
        BuildOptions(image_size=48, arch="dinov3_vit7b16"),
    )
    assert bb.load_report["architecture"]["from"] == "--arch: 'dinov3_vit7b16'"
    assert bb.preprocessing.mean == SAT_MEAN
    with torch.no_grad():
        want = official_vit_feature(big, x, "dinov3_vit7b16_sat", heads=heads)
        assert rel_diff(bb.embed(x), want) < 1e-5
