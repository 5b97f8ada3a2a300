"""DINOv3 (Simeoni et al. 2025): ViT-S/16, S+/16, B/16, L/16, L+/16, H+/16, 7B/16 and ConvNeXt
T/S/B/L on LVD-1689M, ViT-L/16 and 7B/16 on SAT-493M, through timm's implementations
(``vit_*_patch16_dinov3``, ``convnext_*``; the L+/16, which timm does not register, as timm's
``Eva`` with the hub's arguments).

Official ViT files (``dinov3_vits16_pretrain_lvd1689m-08c60483.pth`` ...) are flat:
``cls_token``, ``storage_tokens`` (4 registers), ``mask_token`` (pre-training only),
``rope_embed.periods`` (the RoPE periods, a persistent buffer the official model reads from the
file: the released files hold the base-100 schedule rounded to bfloat16, so they are put into
timm's RoPE, which would otherwise recompute the exact schedule), ``blocks.N.{norm1, attn.qkv,
attn.qkv.bias_mask, attn.proj, ls1.gamma, norm2, mlp.{fc1,fc2} or mlp.{w1,w2,w3}, ls2.gamma}``
and ``norm``. The q/k/v bias is one vector whose k third ``bias_mask`` zeroes, which is timm's
``*_qkvb`` models (q and v biases, no k bias); a file whose mask is anything else is refused.
Files without biases load into the plain models.
SwiGLU (S+, L+, H+, 7B): ``w1`` gate, ``w2`` value, ``w3`` out = timm's ``fc1_g``, ``fc1_x``, ``fc2``.
Official ConvNeXt files: ``downsample_layers.{0..3}``, ``stages.i.j.{dwconv, norm, pwconv1,
pwconv2, gamma}`` and a final ``norm`` applied to the average pool (timm's ``head.norm``);
``norms.3`` is the same module as ``norm`` in DINOv3's ConvNeXt, so its state dict (and the
file) holds that norm twice: the copy must equal ``norm`` and is dropped.
timm's Hugging Face copies (timm names) load as they are.

The hub's builders (``hub/backbones.py``) are the architecture table below (``_HUB``): width,
depth, heads, ``ffn_ratio``, ``ffn_layer`` (``swiglu`` rounds the SwiGLU hidden width
``int(2/3 int(width * ffn_ratio))`` up to a multiple of 8, ``swiglu64`` to 64), ``qkv_bias``
(False for the 7B: no ``attn.qkv.bias`` nor ``bias_mask`` in its files) and
``untie_global_and_local_cls_norm`` (the 7B, and ViT-L/16 with SAT-493M weights): those files
also hold ``local_cls_norm.{weight,bias}``, a norm the official model applies to the local
crops' class and storage tokens in training only; at evaluation ``norm`` normalises every token
as in the other models, so it is checked to be there (the hub loads strictly) and not used.

Evaluation as DINOv3's classification eval: resize 256 bicubic, centre crop 224, ImageNet
mean/std. The SAT-493M weights: the same geometry, with the mean/std of the README's transform
for them ("For models using the SAT-493M weights": mean (0.430, 0.411, 0.296), std (0.213,
0.156, 0.143)); the repository's code states no other SAT-493M normalisation. Through
ckpt:PATH a file named as the hub names them (``_pretrain_sat493m``) is read as SAT-493M, and
the load report says so; a tag given a file named as the other data set's weights is refused.
Feature: the class token after the final norm (ViTs), the normed average pool (ConvNeXts,
DINOv3's own "class token" for them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable
from ..checkpoints import Checkpoint, strict_load
from ..vit import create_timm, split_keys, vit_shape
from ..weights import WeightsSource

DINOV3_EVAL = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
)
# README.md, "For models using the SAT-493M weights": its transform's mean and std
SAT_MEAN, SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)
DINOV3_SAT_EVAL = Preprocessing(
    resize=256, crop=224, mean=SAT_MEAN, std=SAT_STD, interpolation="bicubic"
)
_VIT_DROP = (r"^mask_token$", r".*\.bias_mask$", r"^rope_embed\.", r"^local_cls_norm\.")
_PERIODS = "rope_embed.periods"
_LOCAL_NORM = ("local_cls_norm.bias", "local_cls_norm.weight")
_SWIGLU_ALIGN = {"swiglu": 8, "swiglu64": 64}  # models/vision_transformer.py ffn_layer_dict


@dataclass(frozen=True)
class DinoV3ViT:
    """One of the hub's ViT builders, with the arguments that shape it, and the timm
    architecture it is built as (``_qkvb`` added for files with q/k/v biases). ``untied``:
    ``untie_global_and_local_cls_norm``, whose official file holds ``local_cls_norm`` (True:
    required; False: refused); ``None``: either, for ``dinov3_vitl16`` (the hub unties it for
    the SAT-493M file only) and the builders registered before the untied ones, whose reading
    of a file with one (dropped) is kept as it was."""

    hub: str
    timm: str
    embed_dim: int
    depth: int
    heads: int
    ffn_ratio: float
    ffn: str = "mlp"  # mlp, swiglu (hidden rounded up to 8) or swiglu64 (to 64)
    qkv_bias: bool = True
    untied: bool | None = None

    @property
    def mlp_hidden(self) -> int:
        """SelfAttentionBlock's ``int(dim * ffn_ratio)``, through SwiGLUFFN's rounding."""
        hidden = int(self.embed_dim * self.ffn_ratio)
        if self.ffn == "mlp":
            return hidden
        d = int(hidden * 2 / 3)
        return d + (-d % _SWIGLU_ALIGN[self.ffn])

    def timm_args(self, biased: bool) -> tuple[str, dict]:
        """(timm architecture, its arguments) for this builder; ``biased``: q/v biases."""
        if biased and not self.qkv_bias:
            raise UserError(f"{self.hub} has no q/k/v bias (qkv_bias=False)")
        kw = {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.heads}
        if self.ffn == "mlp":
            kw |= {"swiglu_mlp": False, "mlp_ratio": self.ffn_ratio}
        else:  # timm's SwiGLU: int(dim * mlp_ratio) rounded up to swiglu_align_to
            align = _SWIGLU_ALIGN[self.ffn]
            kw |= {"swiglu_mlp": True, "swiglu_align_to": align}
            kw["mlp_ratio"] = self.mlp_hidden / self.embed_dim
        return self.timm + ("_qkvb" if biased else ""), kw


# hub/backbones.py: the ViT builders' arguments (all: patch 16, 4 storage tokens, layer scale
# 1e-5, layernormbf16, mask_k_bias, RoPE base 100 "separate")
_HUB = {
    v.hub: v
    for v in (
        DinoV3ViT("dinov3_vits16", "vit_small_patch16_dinov3", 384, 12, 6, 4.0),
        DinoV3ViT("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", 384, 12, 6, 6.0, "swiglu"),
        DinoV3ViT("dinov3_vitb16", "vit_base_patch16_dinov3", 768, 12, 12, 4.0),
        DinoV3ViT("dinov3_vitl16", "vit_large_patch16_dinov3", 1024, 24, 16, 4.0),
        DinoV3ViT(
            "dinov3_vitl16plus",
            "vit_large_patch16_dinov3",  # timm has no L+; its L with the hub's SwiGLU
            1024,
            24,
            16,
            6.0,
            "swiglu",
            untied=False,
        ),
        DinoV3ViT("dinov3_vith16plus", "vit_huge_plus_patch16_dinov3", 1280, 32, 20, 6.0, "swiglu"),
        DinoV3ViT(
            "dinov3_vit7b16",
            "vit_7b_patch16_dinov3",
            4096,
            40,
            32,
            3.0,
            "swiglu64",
            qkv_bias=False,
            untied=True,
        ),
    )
}
# dinov3_vitl16 with Weights.SAT493M (or a file named -eadcf0ff): untie_global_and_local_cls_norm
_VITL16_SAT = DinoV3ViT("dinov3_vitl16", "vit_large_patch16_dinov3", 1024, 24, 16, 4.0, untied=True)
# (width, SwiGLU?) -> the hub's builder, for files read through ckpt:PATH
_VITS = {(v.embed_dim, v.ffn != "mlp"): v.hub for v in _HUB.values()}
# (stem width, stage-3 depth) -> timm ConvNeXt
_CONVNEXTS = {
    (96, 9): "convnext_tiny",
    (96, 27): "convnext_small",
    (128, 27): "convnext_base",
    (192, 27): "convnext_large",
}
_RENAMES = (
    (r"^storage_tokens$", "reg_token"),
    (r"\.ls1\.gamma$", ".gamma_1"),
    (r"\.ls2\.gamma$", ".gamma_2"),
    (r"\.mlp\.w1\.", ".mlp.fc1_g."),
    (r"\.mlp\.w2\.", ".mlp.fc1_x."),
    (r"\.mlp\.w3\.", ".mlp.fc2."),
)
_CNX_RENAMES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv(\d)\.", r".mlp.fc\1."),
    (r"^norm\.", "head.norm."),
)
# (tag, the tag's variant: timm's architecture (.weights where not LVD-1689M) or, where timm has
# none, the hub's name; the hub's name, file hash, what)
_RELEASES = (
    ("dinov3_vits16", "vit_small_patch16_dinov3", "dinov3_vits16", "08c60483", "ViT-S/16"),
    (
        "dinov3_vitsp16",
        "vit_small_plus_patch16_dinov3",
        "dinov3_vits16plus",
        "4057cbaa",
        "ViT-S+/16",
    ),
    ("dinov3_vitb16", "vit_base_patch16_dinov3", "dinov3_vitb16", "73cec8be", "ViT-B/16"),
    ("dinov3_vitl16", "vit_large_patch16_dinov3", "dinov3_vitl16", "8aa4cbdd", "ViT-L/16"),
    ("dinov3_vitl16p", "dinov3_vitl16plus", "dinov3_vitl16plus", "46503df0", "ViT-L+/16"),
    (
        "dinov3_vith16p",
        "vit_huge_plus_patch16_dinov3",
        "dinov3_vith16plus",
        "7c1da9a5",
        "ViT-H+/16",
    ),
    ("dinov3_vit7b16", "vit_7b_patch16_dinov3", "dinov3_vit7b16", "a955f4ea", "ViT-7B/16"),
    (
        "dinov3_vitl16_sat",
        "vit_large_patch16_dinov3.sat493m",
        "dinov3_vitl16",
        "eadcf0ff",
        "ViT-L/16 distilled",
    ),
    (
        "dinov3_vit7b16_sat",
        "vit_7b_patch16_dinov3.sat493m",
        "dinov3_vit7b16",
        "a6675841",
        "ViT-7B/16",
    ),
    ("dinov3_convnext_tiny", "convnext_tiny", "dinov3_convnext_tiny", "21b726bb", "ConvNeXt-T"),
    ("dinov3_convnext_small", "convnext_small", "dinov3_convnext_small", "296db49d", "ConvNeXt-S"),
    ("dinov3_convnext_base", "convnext_base", "dinov3_convnext_base", "801f2ba9", "ConvNeXt-B"),
    ("dinov3_convnext_large", "convnext_large", "dinov3_convnext_large", "61fa432d", "ConvNeXt-L"),
)
_SAT = ".sat493m"  # the SAT-493M tags' variants end so (timm's pretrained tag)
# --arch takes the hub's names (hub/backbones.py dinov3_vits16 ...); tags give timm's
ARCHS = ArchTable(
    "dinov3",
    {official: _HUB.get(official, arch) for _, arch, official, _, _ in _RELEASES},
    aliases={
        arch: _VITL16_SAT if arch == "vit_large_patch16_dinov3" + _SAT else official
        for _, arch, official, _, _ in _RELEASES
        if arch != official
    },
)
# hub/backbones.py _make_dinov3_vit_model_url: <hub>/<hub>_pretrain_<weights>-<hash>.pth
_BASE = "https://dl.fbaipublicfiles.com/dinov3/{0}/{0}_pretrain_{2}-{1}.pth"
_WEIGHTS_IN_NAME = re.compile(r"_pretrain_(lvd1689m|sat493m)(?=[-_.]|$)")
_HOW = (
    "Meta hands out DINOv3 weights after a request form (github.com/facebookresearch/dinov3); "
    "timm's Hugging Face copy works too"
)


def _is_vit(ckpt: Checkpoint) -> bool:
    return "storage_tokens" in ckpt.flat or (
        ckpt.has("reg_token", "blocks.0.gamma_1") and "pos_embed" not in ckpt.flat
    )


def _is_convnext(ckpt: Checkpoint) -> bool:
    official = ckpt.has("downsample_layers.0.0.weight", "stages.0.0.gamma")
    return official and "head.weight" not in ckpt.flat  # FB's supervised ConvNeXts have a head


def _rename(sd: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _vit_to_timm(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """Official names -> timm Eva names; split q/k/v biases. Returns (dict, has biases)."""
    out = _rename(sd, _RENAMES)
    for k in [k for k in out if k.endswith(".attn.qkv.bias")]:
        q, _k_masked, v = out.pop(k).chunk(3)
        out[k.replace("qkv.bias", "q_bias")], out[k.replace("qkv.bias", "v_bias")] = q, v
    return out, any(k.endswith(".attn.q_bias") for k in out)


def _check_bias_masks(ckpt: Checkpoint) -> None:
    """LinearKMaskedBias multiplies the q/k/v bias by the file's ``bias_mask``; timm's
    ``*_qkvb`` models hold q and v biases only, which is that mask when it zeroes the k third
    and keeps the rest."""
    for k, mask in ckpt.flat.items():
        if not k.endswith(".attn.qkv.bias_mask"):
            continue
        want = torch.ones(mask.shape[0])
        third = mask.shape[0] // 3
        want[third : 2 * third] = 0
        if not torch.equal(mask.float().cpu(), want):
            raise UserError(
                f"{ckpt.path.name}: {k} is not DINOv3's mask (ones, the k third zero); a file "
                "whose k bias acts cannot be read as timm's q/v-bias DINOv3"
            )


def _use_file_periods(model, ckpt: Checkpoint) -> str:
    """Put the file's RoPE periods into timm's RoPE (which recomputes the base-100 schedule at
    construction): the official model reads them from the file. Says what was done."""
    rope = getattr(model, "rope", None)
    periods = ckpt.flat.get(_PERIODS)
    if rope is None or not hasattr(rope, "periods"):
        return "no RoPE in the model"
    if periods is None:
        return "recomputed by timm (base-100 schedule): the file holds no rope_embed.periods"
    own = rope.periods
    file = periods.detach().to(dtype=torch.float32, device=own.device)
    if file.shape != own.shape or not bool(torch.isfinite(file).all() and (file > 0).all()):
        raise UserError(
            f"{ckpt.path.name}: rope_embed.periods of shape {tuple(file.shape)} is not "
            f"{tuple(own.shape)} positive finite periods (head width / 4)"
        )
    gap = ((file - own).abs() / own).max().item()
    with torch.no_grad():
        own.copy_(file)
    if gap == 0:
        return "the file's (equal to the base-100 schedule)"
    return (
        f"the file's ({str(periods.dtype).removeprefix('torch.')}; at most {gap:.2g} relative "
        "from the base-100 schedule timm computes)"
    )


def _check_local_cls_norm(ckpt: Checkpoint, spec: DinoV3ViT) -> str | None:
    """An official file of an untied builder holds ``local_cls_norm`` (the hub loads strictly),
    one of a tied builder none; timm's copies drop it. Says what the file's one is, if any."""
    held = sorted(k for k in ckpt.flat if k.startswith("local_cls_norm."))
    official = "storage_tokens" in ckpt.flat
    if spec.untied is False and held:
        raise UserError(
            f"{ckpt.path.name}: {spec.hub} has no local_cls_norm (its builder does not untie "
            f"the local crops' class-token norm), but the file holds {held}"
        )
    if spec.untied and official:
        width = ckpt.flat["cls_token"].shape[-1] if "cls_token" in ckpt.flat else None
        shapes = {k: tuple(ckpt.flat[k].shape) for k in held}
        if held != list(_LOCAL_NORM) or any(v != (width,) for v in shapes.values()):
            raise UserError(
                f"{ckpt.path.name}: {spec.hub}'s official file holds local_cls_norm.weight and "
                f".bias of shape ({width},) (untie_global_and_local_cls_norm), this one "
                f"{shapes or 'none'}; this is not that builder's file"
            )
    if not held:
        return None
    return (
        "in the file, not used: DINOv3 applies local_cls_norm to the local crops' class and "
        "storage tokens in training only; at evaluation norm normalises every token"
    )


def _build_vit(ckpt: Checkpoint, spec: DinoV3ViT | None, opt) -> tuple:
    _check_bias_masks(ckpt)
    sd, dropped = split_keys(dict(ckpt.flat), *_VIT_DROP)
    sd, biased = _vit_to_timm(sd)
    kw: dict = {}
    if spec is None:
        shape = vit_shape(
            sd, "mlp.fc1_g.weight" if "blocks.0.mlp.fc1_g.weight" in sd else "mlp.fc1.weight"
        )
        swiglu = "blocks.0.mlp.fc1_g.weight" in sd
        if (shape.embed_dim, swiglu) not in _VITS:
            raise UserError(f"no DINOv3 ViT is {shape.embed_dim} wide with swiglu={swiglu}")
        spec, kw = _HUB[_VITS[(shape.embed_dim, swiglu)]], {"depth": shape.depth}
    if not spec.qkv_bias:
        bias = sorted(k for k in ckpt.flat if re.search(r"\.attn\.(qkv\.bias|q_bias|v_bias)", k))
        if bias:
            raise UserError(
                f"{ckpt.path.name}: {spec.hub} has no q/k/v bias (qkv_bias=False), but the "
                f"file holds {bias[:3]}; this is not that builder's file"
            )
    local = _check_local_cls_norm(ckpt, spec)
    arch, args = spec.timm_args(biased)
    model = create_timm(arch, opt.image_size or 224, global_pool="token", **(args | kw))
    report = strict_load(model, sd, fmt="dinov3")
    report["rope_periods"] = _use_file_periods(model, ckpt)
    if report["rope_periods"].startswith("the file's"):
        dropped = [k for k in dropped if k != _PERIODS]  # used, not dropped
    if biased and any(k.endswith("attn.qkv.bias") for k in ckpt.flat):
        report["note"] = (
            "the k third of each attn.qkv.bias is zeroed by bias_mask in DINOv3: not loaded"
        )
    if local:
        report["local_cls_norm"] = local
    return model, report, dropped, "cls", f"DINOv3 ViT ({model.embed_dim}-d class token)"


def _drop_norm_copy(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict without ``norms.3.*``, DINOv3's ConvNeXt's second name for ``norm``
    (its ``norms`` list holds three identities and ``norm`` itself); refused if it differs."""
    sd, copies = split_keys(dict(ckpt.flat), r"^norms\.\d+\.")
    for k in copies:
        final = "norm." + k.split(".", 2)[2]
        if not (k.startswith("norms.3.") and final in sd and torch.equal(sd[final], ckpt.flat[k])):
            raise UserError(
                f"{ckpt.path.name}: {k} is not a copy of {final} (DINOv3's ConvNeXt saves its "
                "final norm under both names); this is not an official DINOv3 ConvNeXt file"
            )
    return sd, copies


def _build_convnext(ckpt: Checkpoint, variant: str | None, opt) -> tuple:
    sd, copies = _drop_norm_copy(ckpt)
    sd = _rename(sd, _CNX_RENAMES)
    if variant is None:
        key = (
            sd["stem.0.weight"].shape[0],
            len({k.split(".")[3] for k in sd if k.startswith("stages.2.blocks.")}),
        )
        if key not in _CONVNEXTS:
            raise UserError(
                f"no DINOv3 ConvNeXt has stem width {key[0]} and {key[1]} stage-3 blocks"
            )
        variant = _CONVNEXTS[key]
    model = create_timm(variant)
    report = strict_load(model, sd, fmt="dinov3-convnext")
    return (
        model,
        report,
        copies,
        "model",
        f"DINOv3 ConvNeXt ({model.num_features}-d normed average pool)",
    )


def _weights(ckpt: Checkpoint, variant: str | None) -> tuple[str, str]:
    """(the pre-training data, why): a tag's own; for ckpt:PATH the official file name's
    ``_pretrain_<weights>`` (the hub's builders read the file name too), else LVD-1689M. A
    tag given a file whose official name says the other data set is refused."""
    named = _WEIGHTS_IN_NAME.search(ckpt.path.name)
    in_name = named.group(1) if named else None
    if variant is None:
        if in_name:
            return in_name, f"the file name's _pretrain_{in_name}"
        return "lvd1689m", "no _pretrain_sat493m in the file name"
    own = "sat493m" if variant.endswith(_SAT) else "lvd1689m"
    if in_name and in_name != own:
        hub = next(o for _, a, o, _, _ in _RELEASES if a == variant)
        sat = in_name == "sat493m"
        tags = [t for t, a, o, _, _ in _RELEASES if o == hub and a.endswith(_SAT) == sat]
        raise UserError(
            f"{ckpt.path.name} is named as DINOv3's {in_name.upper()} weights, but this tag is "
            f"for the {own.upper()} ones; read it through "
            + (f"{' or '.join(tags)}" if tags else f"ckpt:{ckpt.path}")
        )
    return own, "the tag"


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    pick = ARCHS.choose(ckpt.path.name, variant=variant, flag=opt.arch)
    spec = pick.spec if pick else None
    arch_from = (
        f"{pick.source}: {pick.name!r}"
        if pick
        else "the tensor shapes, and DINOv3's only architecture of that width and MLP (ViT) "
        "or stem width and depth (ConvNeXt)"
    )
    convnext = isinstance(spec, str) if spec is not None else _is_convnext(ckpt)
    if convnext:
        model, report, dropped, kind, what = _build_convnext(ckpt, spec, opt)
    elif _is_vit(ckpt) or spec is not None:
        model, report, dropped, kind, what = _build_vit(ckpt, spec, opt)
    else:
        raise UserError(f"{ckpt.path.name} holds neither a DINOv3 ViT nor a DINOv3 ConvNeXt")
    pre = DINOV3_EVAL
    weights, why = _weights(ckpt, variant)
    if weights == "sat493m":
        pre = DINOV3_SAT_EVAL
        report["normalisation"] = (
            f"SAT-493M ({why}): the README's mean {SAT_MEAN} and std {SAT_STD} for them"
        )
    return Loaded(
        model, finish_report(report, report["format"], dropped), pre, kind, what, arch_from
    )


register_family(
    Family(
        "dinov3",
        lambda ckpt: _is_vit(ckpt) or _is_convnext(ckpt),
        _build,
        "DINOv3 ViTs (storage_tokens, RoPE) and ConvNeXts (downsample_layers, no head)",
    )
)

for _tag, _arch, _official, _hash, _desc in _RELEASES:
    _sat = _arch.endswith(_SAT)
    _url = _BASE.format(_official, _hash, "sat493m" if _sat else "lvd1689m")
    _vit = _arch.startswith("vit") or _official in _HUB
    _base = _arch.removesuffix(_SAT)
    _pretrained = "sat493m" if _sat else "lvd1689m"
    if _arch == _official:  # no timm architecture, no timm copy
        _names, _hf, _extra = (_url.rsplit("/", 1)[1],), None, ()
    else:
        _qkvb = _HUB[_official].qkv_bias if _vit else False
        _timm = (
            f"{_base}{'_qkvb' if _qkvb else ''}.{_pretrained}"
            if _vit
            else f"{_base}.dinov3_lvd1689m"
        )
        _names = (_url.rsplit("/", 1)[1], f"{_timm}.safetensors")
        _hf = f"timm/{_timm}"
        _extra = (f"timm/{_base}.{_pretrained}",) if _vit and _qkvb else ()
    register_tag(
        _tag,
        "dinov3",
        _arch,
        WeightsSource(_names, hf_repo=_hf, extra_hf_repos=_extra, url=_url, how=_HOW),
        f"DINOv3 {_desc}, {'SAT-493M' if _sat else 'LVD-1689M'}"
        + (" (class token" if _vit else " (normed average pool")
        + ("; the README's SAT-493M mean/std)" if _sat else ")"),
    )
