"""Supervised ImageNet ResNet-50 from torchvision (weights V1 and V2), and the family of
torchvision-layout ResNet checkpoints in general.

V1 and V2 share the architecture and the state-dict layout (a flat dict with an ``fc``
classifier) but not the training recipe nor the evaluation preprocessing torchvision
publishes with them: V1 resize 256 / crop 224, V2 resize 232 / crop 224, both bilinear with
ImageNet mean/std. ``supervised_r50`` is V2, torchvision's current default (80.9% top-1);
``supervised_r50_v1`` is the classic 76.1% model most SSL papers compare against.
"""

from __future__ import annotations

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable
from ..checkpoints import Checkpoint
from ..resnet import RESNET50, RESNET101, RESNET152, find_torchvision_resnet, load_resnet
from ..weights import WeightsSource

V1_EVAL = Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
V2_EVAL = Preprocessing(resize=232, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_TV = "https://download.pytorch.org/models/"
ARCHS = ArchTable(
    "supervised", {"resnet50": RESNET50, "resnet101": RESNET101, "resnet152": RESNET152}
)


def _detect(ckpt: Checkpoint) -> bool:
    return find_torchvision_resnet(ckpt) is not None


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    prefix = find_torchvision_resnet(ckpt)
    if prefix is None:
        raise UserError(
            f"{ckpt.path.name} holds no torchvision-layout ResNet (conv1 ... layer4, fc)"
        )
    pick = ARCHS.choose(ckpt.path.name, variant=variant, flag=opt.arch)
    model, report = load_resnet(
        ckpt.section(prefix), "torchvision-resnet", pick.spec if pick else None
    )
    report = finish_report(
        report, f"torchvision resnet ({prefix.rstrip('.') or 'flat'})", prefix=prefix
    )
    if variant is None:  # read through ckpt:PATH: say what else looks like this
        report["note"] = (
            "SimCLR v1 (converted) and DINO ResNet-50 files share this layout; "
            "pass --family simclr or --family dino for their preprocessing"
        )
    return Loaded(
        model,
        report,
        V1_EVAL,
        "model",
        f"ResNet ({model.num_features}-d average pool), torchvision layout",
        f"{pick.source}: {pick.name!r}" if pick else "the tensor shapes (torchvision layout)",
    )


register_family(
    Family(
        "supervised",
        _detect,
        _build,
        "torchvision-layout ResNets (flat or under state_dict/model, optional module. prefix)",
    )
)

register_tag(
    "supervised_r50",
    "supervised",
    "resnet50",
    WeightsSource(
        ("resnet50-11ad3fa6.pth", "resnet50.tv2_in1k.safetensors"),
        hf_repo="timm/resnet50.tv2_in1k",
        url=_TV + "resnet50-11ad3fa6.pth",
    ),
    "supervised ResNet-50, torchvision IMAGENET1K_V2 (resize 232, crop 224)",
    V2_EVAL,
)
register_tag(
    "supervised_r50_v1",
    "supervised",
    "resnet50",
    WeightsSource(
        ("resnet50-0676ba61.pth", "resnet50.tv_in1k.safetensors"),
        hf_repo="timm/resnet50.tv_in1k",
        url=_TV + "resnet50-0676ba61.pth",
    ),
    "supervised ResNet-50, torchvision IMAGENET1K_V1 (resize 256, crop 224)",
    V1_EVAL,
)
