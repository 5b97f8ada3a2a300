"""MoCo v3 (Chen, Xie and He 2021): ResNet-50, ViT-S/16 and ViT-B/16.

Official files (``r-50-1000ep.pth.tar``, ``vit-s-300ep.pth.tar``, ``vit-b-300ep.pth.tar``)
are training checkpoints: ``{"epoch", "arch", "state_dict", "optimizer", "scaler"}`` where the
state dict holds ``module.base_encoder.*`` (kept), ``module.momentum_encoder.*`` and
``module.predictor.*`` (dropped). The base encoder's projector replaced the classifier: it
sits at ``fc`` on the ResNet and at ``head`` on the ViTs and is dropped too; MoCo's own linear
evaluation (main_lincls.py) does exactly this.

The ViTs are timm VisionTransformers with a fixed 2-D sin-cos position embedding that is
saved as ``pos_embed``, so it loads like any other; their ViT-S has 12 heads, not 6. Features:
the class token after the final norm (ViT), the 2048-d average pool (ResNet). Evaluation
preprocessing (main_lincls.py): resize 256, centre crop 224, bilinear, ImageNet mean/std.
"""

from __future__ import annotations

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ...errors import UserError
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..checkpoints import Checkpoint
from ..resnet import RESNET50, load_resnet
from ..vit import HEADS, create_timm, load_vit, split_keys, vit_kwargs, vit_shape
from ..weights import WeightsSource

MOCO_EVAL = Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
MOCO_HEADS = {**HEADS, 384: 12}
# (container, encoder prefix): the official layout first, then re-saved variants
_ROOTS = (("state_dict.", "state_dict.module.base_encoder."), ("", "module.base_encoder."),
          ("state_dict.", "state_dict.base_encoder."))
_URL = "https://dl.fbaipublicfiles.com/moco-v3/{0}/{0}.pth.tar"
VIT_VARIANTS = {"vit_small_patch16_224": {"num_heads": 12}, "vit_base_patch16_224": {}}


def _root(ckpt: Checkpoint) -> tuple[str, str] | None:
    return next((r for r in _ROOTS if ckpt.any_prefix(r[1])), None)


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    found = _root(ckpt)
    if found is None:
        raise UserError(f"{ckpt.path.name} has no module.base_encoder.* keys: not a MoCo v3 file")
    container, root = found
    enc = ckpt.section(root)
    # the momentum encoder and the predictor: everything in the state dict but the encoder
    others = [k for k in ckpt.flat if k.startswith(container) and not k.startswith(root)]
    is_vit = "cls_token" in enc
    if variant and is_vit != (variant in VIT_VARIANTS):
        held = "a ViT" if is_vit else "a ResNet"
        raise UserError(f"{ckpt.path.name} holds {held}, not the {variant} this tag expects")
    if is_vit:
        enc, projector = split_keys(enc, r"^head\.")
        if variant is None:
            arch, kw = "vit_base_patch16_224", vit_kwargs(vit_shape(enc), MOCO_HEADS)
        else:
            arch, kw = variant, VIT_VARIANTS[variant]
        model = create_timm(arch, opt.image_size or 224, **kw)
        report = load_vit(model, enc, "mocov3")
        kind, what = "cls", f"MoCo v3 ViT ({model.embed_dim}-d class token)"
    else:
        model, report = load_resnet(enc, "mocov3", RESNET50 if variant else None)
        projector, kind, what = [], "model", f"MoCo v3 ResNet ({model.num_features}-d average pool)"
    report = finish_report(
        report, f"mocov3 ({root.rstrip('.')})", others + [root + k for k in projector], root
    )
    return Loaded(model, report, MOCO_EVAL, kind, what)


register_family(Family(
    "mocov3", lambda ckpt: _root(ckpt) is not None, _build,
    "MoCo v3 training checkpoints (state_dict / module.base_encoder.*), ResNet or ViT",
))

for _tag, _variant, _file, _desc in (
    ("mocov3_r50", "resnet50", "r-50-1000ep", "MoCo v3 ResNet-50, 1000 epochs"),
    ("mocov3_vits16", "vit_small_patch16_224", "vit-s-300ep", "MoCo v3 ViT-S/16 (12 heads), 300 epochs"),
    ("mocov3_vitb16", "vit_base_patch16_224", "vit-b-300ep", "MoCo v3 ViT-B/16, 300 epochs"),
):
    _others = ("r-50-300ep.pth.tar", "r-50-100ep.pth.tar") if _tag == "mocov3_r50" else ()
    register_tag(
        _tag, "mocov3", _variant,
        WeightsSource((f"{_file}.pth.tar", *_others), url=_URL.format(_file)),
        _desc,
    )
