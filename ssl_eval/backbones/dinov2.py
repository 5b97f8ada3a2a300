"""DINOv2 ViTs through timm, evaluated the way DINOv2 evaluates: resize 256 (bicubic), centre
crop 224, ImageNet mean/std; the 518-pixel position embeddings resampled to 224."""

from __future__ import annotations

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .base import BackboneSpec, BuildOptions
from .builtin import timm_backbone
from .registry import BACKBONES
from .weights import WeightsSource

DINOV2_EVAL = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
)
_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_URL = "https://dl.fbaipublicfiles.com/dinov2/{n}/{n}{r}_pretrain.pth"


def _spec(size: str, registers: bool) -> BackboneSpec:
    tag = f"dinov2_vit{size}14" + ("_reg" if registers else "")
    arch = f"vit_{_SIZES[size]}_patch14_{'reg4_' if registers else ''}dinov2.lvd142m"
    official = _URL.format(n=f"dinov2_vit{size}14", r="_reg4" if registers else "")
    source = WeightsSource(
        filenames=(official.rsplit("/", 1)[1], f"{arch}.safetensors"),
        hf_repo=f"timm/{arch}",
        url=official,
    )

    def build(opt: BuildOptions):
        return timm_backbone(
            tag, arch, opt, source,
            preprocessing=DINOV2_EVAL, feature_kind="cls", img_size=224,
            description=f"DINOv2 ViT-{size.upper()}/14{' with registers' if registers else ''}",
        )

    return BackboneSpec(tag, build, source.status, f"DINOv2 ViT-{size.upper()}/14" + (" +reg" if registers else ""))


for _s in _SIZES:
    for _r in (False, True):
        _sp = _spec(_s, _r)
        BACKBONES.register(_sp.name, _sp)
BACKBONES.register("dinov2", BACKBONES.get("dinov2_vits14"), "alias of dinov2_vits14")
