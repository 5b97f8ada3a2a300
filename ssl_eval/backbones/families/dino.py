"""DINO (Caron et al. 2021): ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8, ResNet-50 and the XCiTs
(S12/16, S12/8, M24/16, M24/8).

Hub releases (``dino_deitsmall16_pretrain.pth`` ...) are flat backbone state dicts: timm's ViT
key names without a classifier, or torchvision's ResNet-50 without ``fc``. Training
checkpoints (``checkpoint.pth``) are ``{"student", "teacher", "optimizer", "epoch", "args",
"dino_loss", ...}``; the student is wrapped in DistributedDataParallel (``module.backbone.*``),
the teacher only when it has BatchNorm (ResNets), and both carry the projection ``head.*``.
DINO evaluates the teacher, as its eval scripts' default ``--checkpoint_key teacher`` does,
so that is what is kept; the student, the head and the optimiser state are reported dropped.
(``args`` is an argparse Namespace, which the safe loader allows as plain data; its ``arch`` and
``patch_size`` are the architecture built, and the file must match them. A hub file declares
nothing: its shapes, and the heads of DINO's ViT of that width.) Position embeddings are resized
as DINO's ``interpolate_pos_encoding`` does: bicubic, scale factor (new + 0.1) / old.

Features: the class token after the final norm (DINO's k-NN evaluation; its linear probe
concatenates the last 4 blocks' class tokens for ViT-S, ``--feature-kind last:4`` is close),
the 2048-d average pool for the ResNet. Preprocessing (eval_knn.py, eval_linear.py): resize 256
bicubic, centre crop 224, ImageNet mean/std.

XCiTs (hubconf.py ``dino_xcit_*``, main_dino.py ``--arch xcit_small_12_p16`` ...) are
facebookresearch/xcit's ``xcit.py`` models built with ``num_classes=0``; the hub files are their
flat state dicts (``pos_embeder.*``, ``cls_attn_blocks.N.attn.qkv``), training checkpoints keep
them under ``teacher.module.backbone.`` (XCiT has BatchNorm, so DINO wraps its teacher in DDP).
They are built as timm's ``Xcit`` (the same arithmetic, tested against the official forward in
``tests/test_variants_dino_xcit.py``) after renaming ``pos_embeder`` and splitting the
class-attention ``qkv`` into timm's ``q``/``k``/``v``. Their feature is the model's output, the
class token after the final norm: both eval scripts call ``model(inp)`` for a network whose
name lacks "vit", so no ``n_last_blocks`` and no patch average; the XCiT's class token joins
only in its two class-attention blocks, so the last-blocks kinds are refused. Preprocessing as
for the ViTs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable, Pick, agree, check_kind
from ..checkpoints import Checkpoint, strict_load, uninitialised
from ..resnet import (
    PREFIXES,
    RESNET50,
    RESNET101,
    RESNET152,
    find_torchvision_resnet,
    is_torchvision_resnet,
    load_resnet,
)
from ..vit import (
    ViTArch,
    bicubic_with_offset,
    block_indices,
    create_timm,
    follow_input_size,
    from_shape,
    load_vit,
    vit_shape,
)
from ..weights import WeightsSource

DINO_EVAL = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
)
_TRAIN_ROOTS = (
    "teacher.backbone.",
    "teacher.module.backbone.",
    "student.module.backbone.",
    "student.backbone.",
)
_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
# vision_transformer.py: 12 blocks, patch size an argument (main_dino.py --patch_size);
# main_dino.py's deit_* come from DeiT's hub (timm's DeiTs, patch 16); torchvision ResNets.
_VITS = {
    "vit_tiny": ViTArch(
        "vit_tiny_patch16_224", 192, 3, 12, where="dino vision_transformer.py vit_tiny"
    ),
    "vit_small": ViTArch(
        "vit_small_patch16_224", 384, 6, 12, where="dino vision_transformer.py vit_small"
    ),
    "vit_base": ViTArch(
        "vit_base_patch16_224", 768, 12, 12, where="dino vision_transformer.py vit_base"
    ),
    "deit_tiny": ViTArch(
        "vit_tiny_patch16_224", 192, 3, 12, 16, where="DeiT deit_tiny_patch16_224"
    ),
    "deit_small": ViTArch(
        "vit_small_patch16_224", 384, 6, 12, 16, where="DeiT deit_small_patch16_224"
    ),
}


@dataclass(frozen=True)
class XCiTArch:
    """An XCiT as facebookresearch/xcit's xcit.py registers it (main_dino.py takes any name of
    that hub as --arch): a patch embedding of 3x3 stride-2 convolutions with BatchNorm and GELU
    (four for patch 16, three for 8), the Fourier position encoding, ``depth`` XCA blocks (each
    cross-covariance attention, local patch interaction and MLP, layer-scaled), two
    class-attention blocks, LayerNorm eps 1e-6, MLP ratio 4, qkv bias. ``tokens_norm``: the
    class-attention blocks' ``norm2`` normalises every token, not only the class token."""

    width: int
    depth: int
    heads: int
    patch: int
    tokens_norm: bool
    where: str = field(default="", compare=False)


# xcit.py's registered models: size -> (width, heads, tokens_norm, depths), each at patch 16 and 8
_XCIT_SIZES = {
    "nano": (128, 4, False, (12,)),
    "tiny": (192, 4, True, (12, 24)),
    "small": (384, 8, True, (12, 24)),
    "medium": (512, 8, True, (24,)),
    "large": (768, 16, True, (24,)),
}
XCITS = {
    f"xcit_{size}_{depth}_p{patch}": XCiTArch(
        width, depth, heads, patch, norm, where=f"xcit.py xcit_{size}_{depth}_p{patch}"
    )
    for size, (width, heads, norm, depths) in _XCIT_SIZES.items()
    for depth in depths
    for patch in (16, 8)
}
_TAG_VITS = {
    f"vit_{size}_patch{p}_224": replace(_VITS[f"vit_{size}"], patch=p)
    for size in ("small", "base")
    for p in (16, 8)
}
ARCHS = ArchTable(
    "dino",
    {**_VITS, "resnet50": RESNET50, "resnet101": RESNET101, "resnet152": RESNET152, **XCITS},
    aliases=_TAG_VITS,
    refused={
        "xcit": "main_dino.py lists 'xcit' among its --arch choices but builds no model of that "
        "name (it exits 'Unknow architecture'); name the XCiT, e.g. xcit_small_12_p16"
    },
)
_BY_WIDTH = {spec.width: spec for name, spec in _VITS.items() if name.startswith("vit_")}
POS_EMBED = bicubic_with_offset(0.1, "DINO vision_transformer.py interpolate_pos_encoding")


def _backbone_prefix(ckpt: Checkpoint) -> str | None:
    """Training checkpoints: the teacher's (else the student's) backbone."""
    return next((r for r in _TRAIN_ROOTS if ckpt.any_prefix(r)), None)


def _is_dino_vit(ckpt: Checkpoint, prefix: str) -> bool:
    p = prefix
    return (
        ckpt.has(p + "cls_token", p + "pos_embed", p + "blocks.0.attn.qkv.weight")
        and p + "mask_token" not in ckpt.flat
        and not ckpt.any_prefix(p + "blocks.0.ls1.")
        and not ckpt.any_prefix(p + "blocks.0.0.")
        and not ckpt.any_prefix("decoder_")
    )


def _is_xcit(ckpt: Checkpoint, prefix: str) -> bool:
    """xcit.py's own key names (timm's copy renames ``pos_embeder`` and splits ``qkv``)."""
    p = prefix
    return ckpt.has(
        p + "cls_token",
        p + "pos_embeder.token_projection.weight",
        p + "blocks.0.attn.temperature",
        p + "cls_attn_blocks.0.attn.qkv.weight",
    )


def _detect(ckpt: Checkpoint) -> bool:
    prefix = _backbone_prefix(ckpt)
    if prefix is not None:  # a training checkpoint: a DINO ViT, XCiT or ResNet, not DINOv2's
        return (
            _is_dino_vit(ckpt, prefix)
            or _is_xcit(ckpt, prefix)
            or is_torchvision_resnet(ckpt.section(prefix))
        )
    return _is_dino_vit(ckpt, "") or _is_xcit(ckpt, "")


def _choose(ckpt: Checkpoint, variant: str | None, opt) -> Pick | None:
    """The tag, the file's args (arch and patch_size, in training checkpoints) and --arch."""
    file, picks = ckpt.path.name, []
    if variant:
        picks.append(ARCHS.pick(variant, "the tag", file))
    args = ckpt.meta.get("args")
    if isinstance(args, dict) and isinstance(args.get("arch"), str):
        p = ARCHS.pick(args["arch"], "the file's args.arch", file)
        patch = args.get("patch_size")
        if isinstance(p.spec, ViTArch) and p.spec.patch is None and isinstance(patch, int):
            p = Pick(replace(p.spec, patch=patch), f"{p.name}, patch {patch}", "the file's args")
        picks.append(p)
    if opt.arch:
        picks.append(ARCHS.pick(opt.arch, "--arch", file))
    return agree(file, picks)


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    prefix = _backbone_prefix(ckpt)
    if prefix is None:
        flat = _is_dino_vit(ckpt, "") or _is_xcit(ckpt, "")
        prefix = "" if flat else find_torchvision_resnet(ckpt, PREFIXES)
    if prefix is None:
        raise UserError(
            f"{ckpt.path.name} holds neither a DINO ViT, an XCiT (xcit.py's key names) nor a "
            "ResNet-50 backbone"
        )
    file = ckpt.path.name
    sd = ckpt.section(prefix)
    others = [k for k in ckpt.flat if not k.startswith(prefix)]  # head, student, optimiser
    pick = _choose(ckpt, variant, opt)
    if _is_xcit(ckpt, prefix):
        return _build_xcit(sd, file, pick, variant, prefix, others)
    is_vit = "cls_token" in sd
    if pick is not None and isinstance(pick.spec, XCiTArch):
        held = "a ViT" if is_vit else "a ResNet"
        raise UserError(f"{file} holds {held}, but {pick.source} says {pick.name!r} (an XCiT)")
    check_kind(pick, is_vit, ViTArch, file, variant)
    if is_vit:
        shape = vit_shape(sd)
        if pick is None:  # a hub file: the shapes, and the heads of DINO's ViT that wide
            known = _BY_WIDTH.get(shape.embed_dim)
            if known is None:
                raise UserError(
                    f"{file}: no DINO ViT is {shape.embed_dim} wide (vision_transformer.py: vit_tiny "
                    "192, vit_small 384, vit_base 768); if it is timm's copy of an MAE ViT, pass "
                    "--family mae"
                )
            spec = from_shape(shape, known.heads, known.where, known.timm)
            arch_from = (
                f"the tensor shapes, and the {known.heads} heads of DINO's only "
                f"{shape.embed_dim}-wide ViT ({known.where})"
            )
        else:
            spec = pick.spec.filled(shape)  # a patch size not declared is the file's
            arch_from = f"{pick.source}: {pick.name!r} ({pick.spec.where})"
        model = create_timm(
            spec.timm, opt.image_size or 224, dynamic_img_size=True, **spec.kwargs()
        )
        report = load_vit(model, sd, "dino", POS_EMBED)
        # any input size, the table resized per forward as the hub's models do
        follow_input_size(model, sd["pos_embed"], POS_EMBED, report)
        kind, what = "cls", f"DINO ViT ({model.embed_dim}-d class token)"
    else:
        model, report = load_resnet(sd, "dino", pick.spec if pick else None)
        kind, what = "model", f"DINO ResNet ({model.num_features}-d average pool)"
        arch_from = (
            f"{pick.source}: {pick.name!r}" if pick else "the tensor shapes (torchvision layout)"
        )
    where = prefix.rstrip(".") or "flat"
    return Loaded(
        model,
        finish_report(report, f"dino ({where})", others, prefix),
        DINO_EVAL,
        kind,
        what,
        arch_from,
    )


# ---------------------------------------------------------------- XCiT


def xcit_dims(sd: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """(width, depth, heads, patch) from xcit.py's keys: the heads are the XCA temperatures',
    the patch size 2 ** the patch embedding's stride-2 convolutions."""
    convs = {m[1] for k in sd if (m := re.match(r"patch_embed\.proj\.(\d+)\.0\.weight$", k))}
    return (
        int(sd["cls_token"].shape[-1]),
        len(block_indices(sd)),
        int(sd["blocks.0.attn.temperature"].shape[0]),
        2 ** len(convs),
    )


def xcit_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """xcit.py's names to timm's ``Xcit``: ``pos_embeder.`` is ``pos_embed.``, and each
    class-attention ``qkv`` (output rows q, then k, then v) is three linears."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("pos_embeder."):
            out["pos_embed." + k.removeprefix("pos_embeder.")] = v
        elif m := re.match(r"(cls_attn_blocks\.\d+\.attn\.)qkv\.(weight|bias)$", k):
            for name, part in zip("qkv", v.chunk(3, dim=0), strict=True):
                out[f"{m[1]}{name}.{m[2]}"] = part
        else:
            out[k] = v
    return out


def _xcit_refusal(kind: str) -> UserError:
    return UserError(
        f"feature kind '{kind}' reads a class token at each of the last blocks, but an XCiT's "
        "class token joins only in its two class-attention blocks after the XCA blocks; DINO "
        "evaluates its XCiTs on the model's output (feature kind cls)"
    )


@functools.cache
def _xcit_class() -> type[nn.Module]:
    from timm.models.xcit import Xcit

    class DinoXCiT(Xcit):
        """timm's Xcit; refuses the last-blocks kinds and describes itself."""

        def block_count(self) -> int:
            raise _xcit_refusal("last:N / layers:N")

        def last_blocks(self, x: torch.Tensor, n: int) -> list:
            raise _xcit_refusal(f"layers:{n}")

        def describe_architecture(self) -> dict:
            blk, ca = self.blocks[0], self.cls_attn_blocks[0]
            return {
                "type": "xcit",
                "class": type(self).__name__,
                "embed_dim": int(self.embed_dim),
                "depth": len(self.blocks),
                "class_attention_blocks": len(self.cls_attn_blocks),
                "num_heads": int(blk.attn.num_heads),
                "patch_size": int(self.patch_embed.patch_size),
                "mlp_hidden": int(blk.mlp.fc1.out_features),
                "tokens_norm": bool(ca.tokens_norm),
                "position": "fourier",
                "class_token": True,
            }

    return DinoXCiT


def create_xcit(spec: XCiTArch) -> nn.Module:
    """xcit.py's model for ``spec`` with ``num_classes=0``, as timm's Xcit (its img_size only
    sets an unused patch count: the position encoding is computed for each input's grid)."""
    cls = _xcit_class()
    return uninitialised(
        lambda: cls(
            img_size=224,
            patch_size=spec.patch,
            num_classes=0,
            embed_dim=spec.width,
            depth=spec.depth,
            num_heads=spec.heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            cls_attn_layers=2,
            eta=1.0,  # the layer-scale gammas' initial value; every one is loaded
            tokens_norm=spec.tokens_norm,
        )
    )


def _build_xcit(
    sd: dict[str, torch.Tensor],
    file: str,
    pick: Pick | None,
    variant: str | None,
    prefix: str,
    others: list[str],
) -> Loaded:
    if pick is not None and not isinstance(pick.spec, XCiTArch):
        if pick.source == "the tag":
            raise UserError(f"{file} holds an XCiT, not the {variant} this tag expects")
        raise UserError(f"{file} holds an XCiT, but {pick.source} says {pick.name!r}")
    width, depth, heads, patch = dims = xcit_dims(sd)
    if pick is None:  # the shapes show every dimension but tokens_norm, which xcit.py fixes
        named = [(n, a) for n, a in XCITS.items() if (a.width, a.depth, a.heads, a.patch) == dims]
        if not named:
            raise UserError(
                f"{file}: no XCiT of xcit.py is {width} wide with {depth} blocks, {heads} heads "
                f"and patch {patch}; its XCiTs are: {', '.join(XCITS)}"
            )
        ((name, spec),) = named
        arch_from = (
            f"the tensor shapes ({width} wide, {depth} blocks, {heads} heads, patch {patch}): "
            f"{name!r} ({spec.where})"
        )
    else:
        spec = pick.spec
        arch_from = f"{pick.source}: {pick.name!r} ({spec.where})"
    model = create_xcit(spec)
    report = strict_load(model, xcit_to_timm(sd), fmt="dino")
    report["names"] = "xcit.py's, as timm's Xcit: pos_embeder -> pos_embed, qkv -> q, k, v"
    where = prefix.rstrip(".") or "flat"
    return Loaded(
        model,
        finish_report(report, f"dino ({where})", others, prefix),
        DINO_EVAL,
        "cls",
        f"DINO XCiT ({spec.width}-d class token)",
        arch_from,
    )


register_family(
    Family(
        "dino",
        _detect,
        _build,
        "DINO: flat hub backbones (ViTs, XCiTs, ResNet-50), or training checkpoints "
        "(teacher/student, module.backbone.*)",
    )
)

for _tag, _variant, _file, _desc in (
    ("dino_vits16", "vit_small_patch16_224", "dino_deitsmall16_pretrain", "DINO ViT-S/16"),
    ("dino_vits8", "vit_small_patch8_224", "dino_deitsmall8_pretrain", "DINO ViT-S/8"),
    ("dino_vitb16", "vit_base_patch16_224", "dino_vitbase16_pretrain", "DINO ViT-B/16"),
    ("dino_vitb8", "vit_base_patch8_224", "dino_vitbase8_pretrain", "DINO ViT-B/8"),
    ("dino_resnet50", "resnet50", "dino_resnet50_pretrain", "DINO ResNet-50"),
):
    _hf = None if _variant == "resnet50" else f"timm/{_variant}.dino"
    register_tag(
        _tag,
        "dino",
        _variant,
        WeightsSource(
            (f"{_file}.pth", f"{_variant}.dino.safetensors"), hf_repo=_hf, url=_URL.format(_file)
        ),
        _desc + (" (2048-d average pool)" if _variant == "resnet50" else " (class token)"),
    )

for _variant, _desc in (  # the tags are hubconf.py's names
    ("xcit_small_12_p16", "DINO XCiT-S12/16"),
    ("xcit_small_12_p8", "DINO XCiT-S12/8"),
    ("xcit_medium_24_p16", "DINO XCiT-M24/16"),
    ("xcit_medium_24_p8", "DINO XCiT-M24/8"),
):
    _file = f"dino_{_variant}_pretrain"
    register_tag(
        f"dino_{_variant}",
        "dino",
        _variant,
        WeightsSource((f"{_file}.pth",), url=_URL.format(_file)),
        _desc + " (class token)",
    )
