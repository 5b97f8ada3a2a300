"""MoCo v3 (Chen, Xie and He 2021): ResNet-50, ViT-S/16 and ViT-B/16.

Official files (``r-50-1000ep.pth.tar``, ``vit-s-300ep.pth.tar``, ``vit-b-300ep.pth.tar``)
are training checkpoints: ``{"epoch", "arch", "state_dict", "optimizer", "scaler"}`` where the
state dict holds ``module.base_encoder.*`` (kept), ``module.momentum_encoder.*`` and
``module.predictor.*`` (dropped). The base encoder's projector replaced the classifier: it
sits at ``fc`` on the ResNet and at ``head`` on the ViTs and is dropped too; MoCo's own linear
evaluation (main_lincls.py) does exactly this. ``arch`` (main_moco.py's ``--arch``:
``vit_small``, ``vit_base``, ``resnet50`` ...) is the architecture built; the file must match
it. convert_to_deit.py, the README's route to fine-tuning, writes ``{"model": encoder}``
without the projector: MAE's and DeiT's layout, so ``ckpt:`` refuses a ViT-S there (12 heads
here, 6 in DeiT) unless ``--family mocov3`` or the tag says it is MoCo's.

The ViTs are timm VisionTransformers with a fixed 2-D sin-cos position embedding, saved as
``pos_embed``; their ViT-S has 12 heads, not 6. At another input size the table is rebuilt
for the new grid (vits.py builds it from the grid), after checking the file's is that table.
Features: the class token after the final norm (ViT), the 2048-d average pool (ResNet).
Evaluation preprocessing (main_lincls.py): resize 256, centre crop 224, bilinear, ImageNet
mean/std.
"""

from __future__ import annotations

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable, check_kind
from ..checkpoints import Checkpoint
from ..resnet import RESNET50, RESNET101, RESNET152, load_resnet
from ..vit import MOCOV3_SINCOS, ViTArch, create_timm, from_shape, load_vit, split_keys, vit_shape
from ..weights import WeightsSource

MOCO_EVAL = Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
# vits.py: both ViTs are 12 blocks of 12 heads with patch 16 (the ViT-S too); the ConvStem
# ones (vit_conv_*: 11 blocks after a convolutional stem) are not built here. main_moco.py
# takes any torchvision ResNet for --arch; these are the bottleneck ones.
_VITS = {
    "vit_small": ViTArch(
        "vit_small_patch16_224", 384, 12, 12, 16, where="moco-v3 vits.py vit_small"
    ),
    "vit_base": ViTArch("vit_base_patch16_224", 768, 12, 12, 16, where="moco-v3 vits.py vit_base"),
}
ARCHS = ArchTable(
    "mocov3",
    {**_VITS, "resnet50": RESNET50, "resnet101": RESNET101, "resnet152": RESNET152},
    aliases={"vit_small_patch16_224": "vit_small", "vit_base_patch16_224": "vit_base"},
    refused={
        n: "MoCo v3's ConvStem ViTs are not supported" for n in ("vit_conv_small", "vit_conv_base")
    },
)
VIT_VARIANTS = {alias: {"num_heads": _VITS[name].heads} for alias, name in ARCHS.aliases.items()}
_BY_WIDTH = {spec.width: name for name, spec in _VITS.items()}
HEADS_BY_WIDTH = {spec.width: spec.heads for spec in _VITS.values()}  # for MAE's look-alike check
# (container, encoder prefix, what wrote it): the official layouts first, then re-saved ones.
# convert_to_deit.py (the README's way to fine-tune) writes {"model": encoder without head};
# MAE's releases look the same, so only --family mocov3 (or the tag) reads that one as MoCo.
_ROOTS = (
    ("state_dict.", "state_dict.module.base_encoder.", "main_moco.py"),
    ("", "module.base_encoder.", "main_moco.py, re-saved"),
    ("state_dict.", "state_dict.base_encoder.", "main_moco.py, re-saved"),
)
_DEIT = ("model.", "model.", "convert_to_deit.py")
_URL = "https://dl.fbaipublicfiles.com/moco-v3/{0}/{0}.pth.tar"


def _root(ckpt: Checkpoint, building: bool = False) -> tuple[str, str, str] | None:
    found = next((r for r in _ROOTS if ckpt.any_prefix(r[1])), None)
    if found is None and building and ckpt.has("model.cls_token", "model.patch_embed.proj.weight"):
        return _DEIT
    return found


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    found = _root(ckpt, building=True)
    if found is None:
        raise UserError(
            f"{ckpt.path.name} has no module.base_encoder.* keys (nor convert_to_deit.py's "
            "model.*): not a MoCo v3 file"
        )
    container, root, writer = found
    enc = ckpt.section(root)
    # the momentum encoder and the predictor: everything in the state dict but the encoder
    others = [k for k in ckpt.flat if k.startswith(container) and not k.startswith(root)]
    is_vit = "cls_token" in enc
    file = ckpt.path.name
    pick = ARCHS.choose(
        file,
        variant=variant,
        declared=(ckpt.meta.get("arch"), "the file's 'arch' entry"),
        flag=opt.arch,
    )
    check_kind(pick, is_vit, ViTArch, file, variant)
    if is_vit:
        enc, projector = split_keys(enc, r"^head\.")
        if pick is None:  # nothing declared: the shapes, and the heads of MoCo's ViT that wide
            shape = vit_shape(enc)
            if shape.embed_dim not in _BY_WIDTH:
                raise UserError(
                    f"{file}: no MoCo v3 ViT is {shape.embed_dim} wide (vits.py: "
                    "vit_small 384, vit_base 768)"
                )
            known = _VITS[_BY_WIDTH[shape.embed_dim]]
            spec = from_shape(shape, known.heads, known.where, known.timm)
            arch_from = (
                f"the tensor shapes, and the {known.heads} heads of MoCo v3's only "
                f"{shape.embed_dim}-wide ViT ({known.where})"
            )
        else:
            spec = pick.spec
            arch_from = f"{pick.source}: {pick.name!r} ({spec.where})"
        model = create_timm(spec.timm, opt.image_size or 224, **spec.kwargs())
        report = load_vit(model, enc, "mocov3", MOCOV3_SINCOS)
        kind, what = "cls", f"MoCo v3 ViT ({model.embed_dim}-d class token)"
    else:
        model, report = load_resnet(enc, "mocov3", pick.spec if pick else None)
        projector, kind, what = [], "model", f"MoCo v3 ResNet ({model.num_features}-d average pool)"
        arch_from = (
            f"{pick.source}: {pick.name!r}" if pick else "the tensor shapes (torchvision layout)"
        )
    report = finish_report(
        report,
        f"mocov3 ({writer}: {root.rstrip('.')})",
        others + [root + k for k in projector],
        root,
    )
    return Loaded(model, report, MOCO_EVAL, kind, what, arch_from)


register_family(
    Family(
        "mocov3",
        lambda ckpt: _root(ckpt) is not None,
        _build,
        "MoCo v3 training checkpoints (state_dict / module.base_encoder.*), ResNet or ViT; "
        "convert_to_deit.py output with --family mocov3",
    )
)

for _tag, _variant, _file, _desc in (
    ("mocov3_r50", "resnet50", "r-50-1000ep", "MoCo v3 ResNet-50, 1000 epochs"),
    (
        "mocov3_vits16",
        "vit_small_patch16_224",
        "vit-s-300ep",
        "MoCo v3 ViT-S/16 (12 heads), 300 epochs",
    ),
    ("mocov3_vitb16", "vit_base_patch16_224", "vit-b-300ep", "MoCo v3 ViT-B/16, 300 epochs"),
):
    _others = ("r-50-300ep.pth.tar", "r-50-100ep.pth.tar") if _tag == "mocov3_r50" else ()
    register_tag(
        _tag,
        "mocov3",
        _variant,
        WeightsSource((f"{_file}.pth.tar", *_others), url=_URL.format(_file)),
        _desc,
    )
