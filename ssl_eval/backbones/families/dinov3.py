"""DINOv3 (Simeoni et al. 2025): ViT-S/16, S+/16, B/16, L/16, H+/16 and ConvNeXt T/S/B/L,
through timm's implementations (``vit_*_patch16_dinov3``, ``convnext_*``).

Official ViT files (``dinov3_vits16_pretrain_lvd1689m-08c60483.pth`` ...) are flat:
``cls_token``, ``storage_tokens`` (4 registers), ``mask_token`` (pre-training only),
``rope_embed.periods`` (the RoPE periods, a persistent buffer the official model reads from the
file: the released files hold the base-100 schedule rounded to bfloat16, so they are put into
timm's RoPE, which would otherwise recompute the exact schedule), ``blocks.N.{norm1, attn.qkv,
attn.qkv.bias_mask, attn.proj, ls1.gamma, norm2, mlp.{fc1,fc2} or mlp.{w1,w2,w3}, ls2.gamma}``
and ``norm``. The q/k/v bias is one vector whose k third ``bias_mask`` zeroes, which is timm's
``*_qkvb`` models (q and v biases, no k bias); a file whose mask is anything else is refused.
Files without biases load into the plain models.
SwiGLU (S+, H+): ``w1`` gate, ``w2`` value, ``w3`` out = timm's ``fc1_g``, ``fc1_x``, ``fc2``.
Official ConvNeXt files: ``downsample_layers.{0..3}``, ``stages.i.j.{dwconv, norm, pwconv1,
pwconv2, gamma}`` and a final ``norm`` applied to the average pool (timm's ``head.norm``);
``norms.3`` is the same module as ``norm`` in DINOv3's ConvNeXt, so its state dict (and the
file) holds that norm twice: the copy must equal ``norm`` and is dropped.
timm's Hugging Face copies (timm names) load as they are.

Evaluation as DINOv3's classification eval: resize 256 bicubic, centre crop 224, ImageNet
mean/std. Feature: the class token after the final norm (ViTs), the normed average pool
(ConvNeXts, DINOv3's own "class token" for them).
"""

from __future__ import annotations

import re

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
_VIT_DROP = (r"^mask_token$", r".*\.bias_mask$", r"^rope_embed\.", r"^local_cls_norm\.")
_PERIODS = "rope_embed.periods"
# (width, SwiGLU?) -> timm arch, for files read through ckpt:PATH
_VITS = {
    (384, False): "vit_small_patch16_dinov3",
    (384, True): "vit_small_plus_patch16_dinov3",
    (768, False): "vit_base_patch16_dinov3",
    (1024, False): "vit_large_patch16_dinov3",
    (1280, True): "vit_huge_plus_patch16_dinov3",
}
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
# (tag, timm architecture, the hub's name, file hash, what)
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
    (
        "dinov3_vith16p",
        "vit_huge_plus_patch16_dinov3",
        "dinov3_vith16plus",
        "7c1da9a5",
        "ViT-H+/16",
    ),
    ("dinov3_convnext_tiny", "convnext_tiny", "dinov3_convnext_tiny", "21b726bb", "ConvNeXt-T"),
    ("dinov3_convnext_small", "convnext_small", "dinov3_convnext_small", "296db49d", "ConvNeXt-S"),
    ("dinov3_convnext_base", "convnext_base", "dinov3_convnext_base", "801f2ba9", "ConvNeXt-B"),
    ("dinov3_convnext_large", "convnext_large", "dinov3_convnext_large", "61fa432d", "ConvNeXt-L"),
)
# --arch takes the hub's names (hub/backbones.py dinov3_vits16 ...); tags give timm's
ARCHS = ArchTable(
    "dinov3",
    {official: arch for _, arch, official, _, _ in _RELEASES},
    aliases={arch: official for _, arch, official, _, _ in _RELEASES},
)
_BASE = "https://dl.fbaipublicfiles.com/dinov3/{0}/{0}_pretrain_lvd1689m-{1}.pth"
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


def _build_vit(ckpt: Checkpoint, variant: str | None, opt) -> tuple:
    _check_bias_masks(ckpt)
    sd, dropped = split_keys(dict(ckpt.flat), *_VIT_DROP)
    sd, biased = _vit_to_timm(sd)
    kw: dict = {}
    if variant is None:
        shape = vit_shape(
            sd, "mlp.fc1_g.weight" if "blocks.0.mlp.fc1_g.weight" in sd else "mlp.fc1.weight"
        )
        swiglu = "blocks.0.mlp.fc1_g.weight" in sd
        if (shape.embed_dim, swiglu) not in _VITS:
            raise UserError(f"no DINOv3 ViT is {shape.embed_dim} wide with swiglu={swiglu}")
        variant, kw = _VITS[(shape.embed_dim, swiglu)], {"depth": shape.depth}
    arch = variant + ("_qkvb" if biased else "")
    model = create_timm(arch, opt.image_size or 224, global_pool="token", **kw)
    report = strict_load(model, sd, fmt="dinov3")
    report["rope_periods"] = _use_file_periods(model, ckpt)
    if report["rope_periods"].startswith("the file's"):
        dropped = [k for k in dropped if k != _PERIODS]  # used, not dropped
    if biased and any(k.endswith("attn.qkv.bias") for k in ckpt.flat):
        report["note"] = (
            "the k third of each attn.qkv.bias is zeroed by bias_mask in DINOv3: not loaded"
        )
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


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    pick = ARCHS.choose(ckpt.path.name, variant=variant, flag=opt.arch)
    variant = pick.spec if pick else None
    arch_from = (
        f"{pick.source}: {pick.name!r}"
        if pick
        else "the tensor shapes, and DINOv3's only architecture of that width and MLP (ViT) "
        "or stem width and depth (ConvNeXt)"
    )
    convnext = variant.startswith("convnext") if variant else _is_convnext(ckpt)
    if convnext:
        model, report, dropped, kind, what = _build_convnext(ckpt, variant, opt)
    elif _is_vit(ckpt) or variant:
        model, report, dropped, kind, what = _build_vit(ckpt, variant, opt)
    else:
        raise UserError(f"{ckpt.path.name} holds neither a DINOv3 ViT nor a DINOv3 ConvNeXt")
    return Loaded(
        model, finish_report(report, report["format"], dropped), DINOV3_EVAL, kind, what, arch_from
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
    _url = _BASE.format(_official, _hash)
    _vit = _arch.startswith("vit")
    _timm = f"{_arch}_qkvb.lvd1689m" if _vit else f"{_arch}.dinov3_lvd1689m"
    register_tag(
        _tag,
        "dinov3",
        _arch,
        WeightsSource(
            (_url.rsplit("/", 1)[1], f"{_timm}.safetensors"),
            hf_repo=f"timm/{_timm}",
            extra_hf_repos=(f"timm/{_arch}.lvd1689m",) if _vit else (),
            url=_url,
            how=_HOW,
        ),
        f"DINOv3 {_desc}, LVD-1689M" + (" (class token)" if _vit else " (normed average pool)"),
    )
