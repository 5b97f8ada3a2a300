"""Bottleneck ResNets in torchvision's state-dict layout, at any width.

torchvision's ResNet-50, the SimCLR v1/v2 conversions (1x, 2x, 4x), MoCo v3's and DINO's
ResNet-50 all share this layout: ``conv1``, ``bn1``, ``layer{1-4}.{i}.{conv,bn}{1-3}`` with
``downsample.{0,1}`` on the first block of a stage, and a ``fc`` head. The wide SimCLR models
multiply every width (stem and stages) by 2 or 4, which torchvision's own ``wide_resnet50_2``
does not, hence this small class. The embedding is the global average pool.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from ..core.errors import UserError
from .checkpoints import Checkpoint, strict_load, uninitialised

HEAD = (r"^fc\.",)
# Where torchvision-named keys sit in the containers official files use.
PREFIXES = ("", "state_dict.", "state_dict.module.", "module.", "model.", "model.module.")


class ResNet(nn.Module):
    """torchvision's bottleneck ResNet without its classifier, widths scaled by ``width``."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 1):
        super().__init__()
        self.inplanes = 64 * width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            self.add_module(f"layer{i + 1}", self._stage(planes * width, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = self.inplanes

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        down = nn.Sequential(
            nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out),
        )
        stage = [Bottleneck(self.inplanes, planes, stride, down)]
        stage += [Bottleneck(out, planes) for _ in range(blocks - 1)]
        self.inplanes = out
        return nn.Sequential(*stage)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, C, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


def is_torchvision_resnet(sd: dict[str, torch.Tensor]) -> bool:
    """Bottleneck ResNet keys with the 7x7 ImageNet stem."""
    conv1 = sd.get("conv1.weight")
    return (
        conv1 is not None
        and conv1.ndim == 4
        and conv1.shape[-1] == 7
        and "layer4.0.conv3.weight" in sd
        and "layer1.0.downsample.0.weight" in sd
    )


def find_torchvision_resnet(ckpt: Checkpoint, prefixes=PREFIXES) -> str | None:
    """The container prefix under which a torchvision-layout ResNet sits, if any."""
    for p in prefixes:
        if ckpt.has(p + "layer4.0.conv3.weight", p + "conv1.weight"):
            conv1 = ckpt.flat[p + "conv1.weight"]
            if conv1.ndim == 4 and conv1.shape[-1] == 7:
                return p
    return None


def resnet_shape(sd: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], int]:
    """(blocks per stage, width multiplier) read from the keys and the stem's width."""
    if not is_torchvision_resnet(sd):
        raise UserError("the checkpoint holds no torchvision-layout bottleneck ResNet")
    layers = []
    for stage in range(1, 5):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        layers.append(max(idx) + 1)
    width, rem = divmod(sd["conv1.weight"].shape[0], 64)
    if rem or width < 1:
        raise UserError(f"stem width {sd['conv1.weight'].shape[0]} is not a multiple of 64")
    return tuple(layers), width


def load_resnet(
    sd: dict[str, torch.Tensor], fmt: str, expect: tuple[tuple[int, ...], int] | None = None
) -> tuple[ResNet, dict]:
    """Build the ResNet the keys describe (or ``expect``: layers, width) and load strictly;
    only the ``fc`` classifier may be left over."""
    layers, width = expect or resnet_shape(sd)
    model = uninitialised(lambda: ResNet(layers, width))
    return model, strict_load(model, sd, droppable=HEAD, fmt=fmt)


RESNET50 = ((3, 4, 6, 3), 1)
RESNET101 = ((3, 4, 23, 3), 1)
RESNET152 = ((3, 8, 36, 3), 1)
RESNET50_2X = ((3, 4, 6, 3), 2)
RESNET50_4X = ((3, 4, 6, 3), 4)
