"""solo-learn (da Costa et al. 2022) checkpoints: any of its methods, ResNet-18/50 or ViT backbones.

A run folder holds the PyTorch Lightning checkpoint (``<name>-<version>-ep=<n>.ckpt``:
``{"epoch", "global_step", "pytorch-lightning_version", "state_dict", "loops", "callbacks",
"optimizer_states", "lr_schedulers"}``) and, beside it, ``args.json``: the run's whole
configuration, which is where solo-learn itself (main_linear.py, main_knn.py) reads the
architecture from. The weights cannot tell it: the head count of a ViT depends on the method
(``vit_small`` has 12 heads under ``method: mocov3`` or ``mae``, 6 otherwise; ``vit_tiny`` 12 or
3), and a ResNet trained on CIFAR has a 3x3 stride-1 stem with padding 2 and no max-pool
(``data.dataset`` cifar10/cifar100). So args.json is required.

Kept: ``state_dict.backbone.*`` (``backbone.fc`` is an Identity, so there is no classifier to
drop). Dropped (reported): the projector, predictor, momentum copies and the online linear
``classifier``. Features: the backbone's output, as solo-learn's linear and k-NN evaluations
read it (the ResNet's average pool; the ViT's class token after the final norm).
Preprocessing: solo-learn's validation pipeline for ``data.dataset`` (classification_dataloader
prepare_transforms). solo-learn does not resize ViT position embeddings: a ViT is evaluated at
the size it was trained at (``backbone.kwargs.img_size``, 224 by default).
"""

from __future__ import annotations

import json
from pathlib import Path

import torchvision
from torch import nn

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family
from ..architecture import ArchTable
from ..checkpoints import Checkpoint, strict_load, uninitialised
from ..vit import PosEmbedResize, ViTArch, create_timm, load_vit, vit_shape

SIDECAR = "args.json"
_CIFAR = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
_STL = ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261))
EVAL = {  # prepare_transforms' T_val per data.dataset
    "cifar10": Preprocessing(resize=32, crop=32, mean=_CIFAR[0], std=_CIFAR[1]),
    "cifar100": Preprocessing(resize=32, crop=32, mean=_CIFAR[0], std=_CIFAR[1]),
    "stl10": Preprocessing(resize=96, crop=96, mean=_STL[0], std=_STL[1]),
    "imagenet": Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "imagenet100": Preprocessing(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
# solo/backbones/vit: the default ViTs are timm's; mocov3 and mae have their own (12 heads for
# tiny and small). (width, depth, default heads, mocov3/mae heads)
_VITS = {
    "vit_tiny": (192, 12, 3, 12),
    "vit_small": (384, 12, 6, 12),
    "vit_base": (768, 12, 12, 12),
    "vit_large": (1024, 24, 16, 16),
}
_OWN_VIT = ("mocov3", "mae")
ARCHS = ArchTable(
    "solo",
    {"resnet18": "resnet18", "resnet50": "resnet50", **{n: n for n in _VITS}},
    refused={
        n: "solo-learn's Swin, PoolFormer, ConvNeXt and WideResNet backbones are not supported"
        for n in (
            "swin_tiny",
            "swin_small",
            "swin_base",
            "swin_large",
            "poolformer_s12",
            "poolformer_s24",
            "poolformer_s36",
            "poolformer_m36",
            "poolformer_m48",
            "convnext_tiny",
            "convnext_small",
            "convnext_base",
            "convnext_large",
            "wide_resnet28w2",
            "wide_resnet28w8",
        )
    },
)
# backbone.kwargs that change nothing in evaluation (eval mode turns dropout off)
_HARMLESS = {"drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate"}


def _refuse_resize(tokens, old, new):
    raise UserError("solo-learn does not resize position embeddings")


_NO_RESIZE = PosEmbedResize("never (solo-learn evaluates at its training size)", _refuse_resize)


def _detect(ckpt: Checkpoint) -> bool:
    return "pytorch-lightning_version" in ckpt.top and ckpt.any_prefix("state_dict.backbone.")


def read_args(path: Path) -> dict:
    """The run's args.json beside the checkpoint."""
    side = path.parent / SIDECAR
    if not side.is_file():
        raise UserError(
            f"{path.name}: a solo-learn checkpoint keeps its architecture in {SIDECAR} beside it "
            f"(solo-learn's main_linear.py and main_knn.py read it there); put it back in {path.parent}"
        )
    try:
        args = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{side} is not readable JSON ({e})") from e
    if not isinstance(args, dict) or not isinstance(args.get("backbone"), dict):
        raise UserError(f"{side} has no 'backbone' section: not a solo-learn args.json")
    return args


def _resnet(name: str, cifar: bool) -> nn.Module:
    def build() -> nn.Module:
        model = getattr(torchvision.models, name)()
        model.fc = nn.Identity()  # as solo-learn's BaseMethod does
        if cifar:  # BaseMethod's CIFAR stem
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
            model.maxpool = nn.Identity()
        model.num_features = model.inplanes
        return model

    return uninitialised(build)


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    file = ckpt.path.name
    args = read_args(ckpt.path)
    backbone = args["backbone"]
    method, dataset = str(args.get("method")), (args.get("data") or {}).get("dataset")
    pick = ARCHS.choose(
        file,
        variant=variant,
        declared=(backbone.get("name"), f"{SIDECAR} backbone.name"),
        flag=opt.arch,
    )
    if pick is None:
        raise UserError(f"{file}: {SIDECAR} names no backbone.name")
    kwargs = dict(backbone.get("kwargs") or {})
    unknown = sorted(set(kwargs) - _HARMLESS - {"img_size", "patch_size"})
    if unknown:
        raise UserError(
            f"{file}: {SIDECAR} backbone.kwargs {unknown} change the architecture in ways "
            "ssl-eval does not rebuild"
        )
    sd = ckpt.section("state_dict.backbone.")
    others = [k for k in ckpt.flat if not k.startswith("state_dict.backbone.")]
    pre = EVAL.get(dataset, EVAL["imagenet"])
    if pick.name.startswith("resnet"):
        cifar = dataset in ("cifar10", "cifar100")
        model = _resnet(pick.name, cifar)
        report = strict_load(model, sd, fmt="solo")
        stem = "CIFAR stem: 3x3 stride 1 padding 2, no max-pool" if cifar else "ImageNet stem"
        what = f"solo-learn {method} {pick.name} ({model.num_features}-d average pool, {stem})"
        arch_from = f"{SIDECAR}: backbone.name {pick.name!r}, data.dataset {dataset!r} ({stem})"
    else:
        width, depth, heads, own_heads = _VITS[pick.name]
        own = method in _OWN_VIT
        img = int(kwargs.get("img_size", 224))
        if opt.image_size and opt.image_size != img:
            raise UserError(
                f"{file}: solo-learn does not resize a ViT's position embeddings; it was "
                f"trained at {img} pixels, so drop --image-size {opt.image_size}"
            )
        where = (
            f"solo-learn vit_{'mocov3' if method == 'mocov3' else 'mae'}.py {pick.name}"
            if own
            else f"solo-learn vit.py {pick.name} (timm's)"
        )
        spec = ViTArch(
            "vit_small_patch16_224",
            width,
            own_heads if own else heads,
            depth,
            int(kwargs.get("patch_size", 16)),
            where=where,
        )
        vit_shape(sd)  # a readable ViT, or a clear error
        model = create_timm(spec.timm, img, **spec.kwargs())
        report = load_vit(model, sd, "solo", _NO_RESIZE)
        what = f"solo-learn {method} {pick.name} ({width}-d class token)"
        arch_from = (
            f"{SIDECAR}: backbone.name {pick.name!r} with method {method!r} -> "
            f"{spec.heads} heads ({where})"
        )
    if dataset not in EVAL:
        report["note"] = (
            f"data.dataset {dataset!r} has no fixed solo-learn evaluation pipeline; "
            "using its ImageNet one (resize 256, crop 224)"
        )
    report = finish_report(
        report, f"solo-learn {method} (state_dict.backbone)", others, "state_dict.backbone."
    )
    return Loaded(model, report, pre, "model", what, arch_from)


register_family(
    Family(
        "solo",
        _detect,
        _build,
        "solo-learn Lightning checkpoints (state_dict.backbone.*) with their args.json beside them",
    )
)
