"""DINO (Caron et al. 2021): ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8 and ResNet-50.

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
"""

from __future__ import annotations

from dataclasses import replace

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable, Pick, agree, check_kind
from ..checkpoints import Checkpoint
from ..resnet import (
    PREFIXES,
    RESNET50,
    RESNET101,
    RESNET152,
    find_torchvision_resnet,
    is_torchvision_resnet,
    load_resnet,
)
from ..vit import ViTArch, bicubic_with_offset, create_timm, from_shape, load_vit, vit_shape
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
_TAG_VITS = {
    f"vit_{size}_patch{p}_224": replace(_VITS[f"vit_{size}"], patch=p)
    for size in ("small", "base")
    for p in (16, 8)
}
ARCHS = ArchTable(
    "dino",
    {**_VITS, "resnet50": RESNET50, "resnet101": RESNET101, "resnet152": RESNET152},
    aliases=_TAG_VITS,
    refused={
        n: "DINO's XCiT backbones are not supported"
        for n in (
            "xcit",
            "xcit_small_12_p16",
            "xcit_small_12_p8",
            "xcit_medium_24_p16",
            "xcit_medium_24_p8",
        )
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


def _detect(ckpt: Checkpoint) -> bool:
    prefix = _backbone_prefix(ckpt)
    if prefix is not None:  # a training checkpoint: a DINO ViT or ResNet, not DINOv2's
        return _is_dino_vit(ckpt, prefix) or is_torchvision_resnet(ckpt.section(prefix))
    return _is_dino_vit(ckpt, "")


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
        prefix = "" if _is_dino_vit(ckpt, "") else find_torchvision_resnet(ckpt, PREFIXES)
    if prefix is None:
        raise UserError(f"{ckpt.path.name} holds neither a DINO ViT nor a ResNet-50 backbone")
    file = ckpt.path.name
    sd = ckpt.section(prefix)
    others = [k for k in ckpt.flat if not k.startswith(prefix)]  # head, student, optimiser
    is_vit = "cls_token" in sd
    pick = _choose(ckpt, variant, opt)
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
        model = create_timm(spec.timm, opt.image_size or 224, **spec.kwargs())
        report = load_vit(model, sd, "dino", POS_EMBED)
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


register_family(
    Family(
        "dino",
        _detect,
        _build,
        "DINO: flat hub backbones, or training checkpoints (teacher/student, module.backbone.*)",
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
