"""SimCLR v1 and v2 (Chen et al. 2020a, 2020b) ResNet-50s converted from the TensorFlow release.

v1, converted by tonylins/simclr-converter: ``{"state_dict": ...}`` holding a torchvision-
layout ResNet-50 whose widths (stem included) are multiplied by 1, 2 or 4
(``resnet50-1x.pth``, ``-2x``, ``-4x``), with the supervised linear head at ``fc`` (dropped).
Its layout is torchvision's, so ``ckpt:PATH`` reads it as ``supervised`` unless told
``--family simclr``.

v2, converted by Separius/SimCLRv2-Pytorch: ``{"resnet": ..., "head": ...}``; ``head`` is the
3-layer contrastive projector (dropped) and ``resnet`` is a ResNet written as nested
Sequentials: ``net.0`` the stem (``net.0.0`` conv, ``net.0.1.0`` BN), ``net.{1-4}`` the stages
with ``blocks.j.net.{0,2,4}`` the three convolutions, ``blocks.j.net.{1,3,5}.0`` their BNs and
``blocks.j.projection.{shortcut, bn.0}`` the downsampling shortcut; ``fc`` the supervised head
(dropped). Without selective kernels (``sk0``) it computes exactly torchvision's bottleneck
ResNet (stride on the 3x3 convolution), so it is renamed onto that; ``sk1`` files are refused.

Both were trained on [0, 1] pixels without mean/std normalisation (the converters' READMEs and
eval scripts say so): preprocessing is resize 256, centre crop 224, bilinear, mean 0, std 1.
Feature: the average pool (2048 x width).
"""

from __future__ import annotations

import re

import torch

from ...core.errors import UserError
from ...data.transforms import Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable
from ..checkpoints import Checkpoint
from ..resnet import RESNET50, RESNET50_2X, RESNET50_4X, find_torchvision_resnet, load_resnet
from ..weights import WeightsSource

SIMCLR_EVAL = Preprocessing(resize=256, crop=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
VARIANTS = {"r50x1": RESNET50, "r50x2": RESNET50_2X, "r50x4": RESNET50_4X}
# SimCLR's own names are resnet_depth and width_multiplier; its v2 files say r50_1x_sk0 ...
ARCHS = ArchTable("simclr", VARIANTS, aliases={f"r50_{w}x_sk0": f"r50x{w}" for w in (1, 2, 4)})
_V2_RULES = (
    (r"^net\.0\.0\.", "conv1."),
    (r"^net\.0\.1\.0\.", "bn1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.projection\.shortcut\.", r"layer\1.\2.downsample.0."),
    (r"^net\.(\d)\.blocks\.(\d+)\.projection\.bn\.0\.", r"layer\1.\2.downsample.1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.0\.", r"layer\1.\2.conv1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.1\.0\.", r"layer\1.\2.bn1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.2\.", r"layer\1.\2.conv2."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.3\.0\.", r"layer\1.\2.bn2."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.4\.", r"layer\1.\2.conv3."),
    (r"^net\.(\d)\.blocks\.(\d+)\.net\.5\.0\.", r"layer\1.\2.bn3."),
)
_HOW_V1 = (
    "Convert the TensorFlow checkpoint (gs://simclr-checkpoints/simclrv1) with "
    "github.com/tonylins/simclr-converter"
)
_HOW_V2 = (
    "Convert the TensorFlow checkpoint (gs://simclr-checkpoints/simclrv2/pretrained) with "
    "github.com/Separius/SimCLRv2-Pytorch (convert.py)"
)


def v2_to_torchvision(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SimCLRv2-Pytorch's ResNet names -> torchvision's."""
    if any(".mixing_conv." in k for k in sd) or "net.0.2.weight" in sd:
        raise UserError(
            "selective-kernel SimCLR v2 checkpoints (sk1) are not supported; "
            "use an sk0 file (e.g. r50_1x_sk0.pth)"
        )
    out = {}
    for k, v in sd.items():
        for pattern, repl in _V2_RULES:
            new = re.sub(pattern, repl, k)
            if new != k:
                k = new
                break
        out[k] = v
    return out


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    pick = ARCHS.choose(ckpt.path.name, variant=variant, flag=opt.arch)
    expect = pick.spec if pick else None
    if ckpt.any_prefix("resnet.net.0."):
        sd = v2_to_torchvision(ckpt.section("resnet."))
        others = [k for k in ckpt.flat if not k.startswith("resnet.")]
        prefix, fmt = "resnet.", "simclr v2 (resnet; head dropped)"
    else:
        found = find_torchvision_resnet(ckpt)
        if found is None:
            raise UserError(f"{ckpt.path.name} holds neither a SimCLR v1 nor a v2 ResNet")
        sd, others, prefix = ckpt.section(found), [], found
        fmt = f"simclr v1 (torchvision layout, {found.rstrip('.') or 'flat'})"
    model, report = load_resnet(sd, "simclr", expect)
    return Loaded(
        model,
        finish_report(report, fmt, others, prefix),
        SIMCLR_EVAL,
        "model",
        f"SimCLR ResNet-50 x{model.num_features // 2048} ({model.num_features}-d average pool)",
        f"{pick.source}: {pick.name!r}" if pick else "the tensor shapes (torchvision layout)",
    )


register_family(
    Family(
        "simclr",
        lambda ckpt: ckpt.any_prefix("resnet.net.0."),
        _build,
        "SimCLR v2 {'resnet', 'head'} files; v1 (torchvision layout) with --family simclr",
    )
)

for _tag, _variant, _file, _how, _desc in (
    ("simclr_r50", "r50x1", "resnet50-1x.pth", _HOW_V1, "SimCLR v1 ResNet-50 (1x)"),
    ("simclr_r50_2x", "r50x2", "resnet50-2x.pth", _HOW_V1, "SimCLR v1 ResNet-50 (2x)"),
    ("simclr_r50_4x", "r50x4", "resnet50-4x.pth", _HOW_V1, "SimCLR v1 ResNet-50 (4x)"),
    ("simclr2_r50", "r50x1", "r50_1x_sk0.pth", _HOW_V2, "SimCLR v2 ResNet-50 (1x, sk0)"),
    ("simclr2_r50_2x", "r50x2", "r50_2x_sk0.pth", _HOW_V2, "SimCLR v2 ResNet-50 (2x, sk0)"),
):
    register_tag(
        _tag,
        "simclr",
        _variant,
        WeightsSource((_file,), how=_how),
        _desc + ", un-normalised inputs",
    )
