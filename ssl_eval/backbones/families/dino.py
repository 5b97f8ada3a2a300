"""DINO (Caron et al. 2021): ViT-S/16, ViT-S/8, ViT-B/16, ViT-B/8 and ResNet-50.

Hub releases (``dino_deitsmall16_pretrain.pth`` ...) are flat backbone state dicts: timm's ViT
key names without a classifier, or torchvision's ResNet-50 without ``fc``. Training
checkpoints (``checkpoint.pth``) are ``{"student", "teacher", "optimizer", "epoch", "args",
"dino_loss", ...}``; the student is wrapped in DistributedDataParallel (``module.backbone.*``),
the teacher only when it has BatchNorm (ResNets), and both carry the projection ``head.*``.
DINO evaluates the teacher, as its eval scripts' default ``--checkpoint_key teacher`` does,
so that is what is kept; the student, the head and the optimiser state are reported dropped.
(``args`` is an argparse Namespace, which the safe loader allows as plain data.)

Features: the class token after the final norm (DINO's k-NN evaluation; its linear probe
concatenates the last 4 blocks' class tokens for ViT-S, ``--feature-kind last:4`` is close),
the 2048-d average pool for the ResNet. Preprocessing (eval_knn.py, eval_linear.py): resize 256
bicubic, centre crop 224, ImageNet mean/std.
"""

from __future__ import annotations

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ...errors import UserError
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..checkpoints import Checkpoint
from ..resnet import PREFIXES, RESNET50, find_torchvision_resnet, is_torchvision_resnet, load_resnet
from ..vit import create_timm, load_vit, vit_kwargs, vit_shape
from ..weights import WeightsSource

DINO_EVAL = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
)
_TRAIN_ROOTS = ("teacher.backbone.", "teacher.module.backbone.",
                "student.module.backbone.", "student.backbone.")
_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"


def _backbone_prefix(ckpt: Checkpoint) -> str | None:
    """Training checkpoints: the teacher's (else the student's) backbone."""
    return next((r for r in _TRAIN_ROOTS if ckpt.any_prefix(r)), None)


def _is_dino_vit(ckpt: Checkpoint, prefix: str) -> bool:
    p = prefix
    return (ckpt.has(p + "cls_token", p + "pos_embed", p + "blocks.0.attn.qkv.weight")
            and p + "mask_token" not in ckpt.flat
            and not ckpt.any_prefix(p + "blocks.0.ls1.") and not ckpt.any_prefix(p + "blocks.0.0.")
            and not ckpt.any_prefix("decoder_"))


def _detect(ckpt: Checkpoint) -> bool:
    prefix = _backbone_prefix(ckpt)
    if prefix is not None:  # a training checkpoint: a DINO ViT or ResNet, not DINOv2's
        return _is_dino_vit(ckpt, prefix) or is_torchvision_resnet(ckpt.section(prefix))
    return _is_dino_vit(ckpt, "")


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    prefix = _backbone_prefix(ckpt)
    if prefix is None:
        prefix = "" if _is_dino_vit(ckpt, "") else find_torchvision_resnet(ckpt, PREFIXES)
    if prefix is None:
        raise UserError(f"{ckpt.path.name} holds neither a DINO ViT nor a ResNet-50 backbone")
    sd = ckpt.section(prefix)
    others = [k for k in ckpt.flat if not k.startswith(prefix)]  # head, student, optimiser
    is_vit = "cls_token" in sd
    if variant and is_vit != (variant != "resnet50"):
        held = "a ViT" if is_vit else "a ResNet"
        raise UserError(f"{ckpt.path.name} holds {held}, not the {variant} this tag expects")
    if is_vit:
        arch, kw = (variant, {}) if variant else ("vit_base_patch16_224", vit_kwargs(vit_shape(sd)))
        model = create_timm(arch, opt.image_size or 224, **kw)
        report = load_vit(model, sd, "dino")
        kind, what = "cls", f"DINO ViT ({model.embed_dim}-d class token)"
    else:
        model, report = load_resnet(sd, "dino", RESNET50 if variant else None)
        kind, what = "model", f"DINO ResNet ({model.num_features}-d average pool)"
    where = prefix.rstrip(".") or "flat"
    return Loaded(model, finish_report(report, f"dino ({where})", others, prefix),
                  DINO_EVAL, kind, what)


register_family(Family(
    "dino", _detect, _build,
    "DINO: flat hub backbones, or training checkpoints (teacher/student, module.backbone.*)",
))

for _tag, _variant, _file, _desc in (
    ("dino_vits16", "vit_small_patch16_224", "dino_deitsmall16_pretrain", "DINO ViT-S/16"),
    ("dino_vits8", "vit_small_patch8_224", "dino_deitsmall8_pretrain", "DINO ViT-S/8"),
    ("dino_vitb16", "vit_base_patch16_224", "dino_vitbase16_pretrain", "DINO ViT-B/16"),
    ("dino_vitb8", "vit_base_patch8_224", "dino_vitbase8_pretrain", "DINO ViT-B/8"),
    ("dino_resnet50", "resnet50", "dino_resnet50_pretrain", "DINO ResNet-50"),
):
    _hf = None if _variant == "resnet50" else f"timm/{_variant}.dino"
    register_tag(
        _tag, "dino", _variant,
        WeightsSource((f"{_file}.pth", f"{_variant}.dino.safetensors"), hf_repo=_hf,
                      url=_URL.format(_file)),
        _desc + (" (2048-d average pool)" if _variant == "resnet50" else " (class token)"),
    )
