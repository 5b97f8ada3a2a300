"""CIFAR ResNet-20/32/44/56 (He et al. 2016, section 4.2), as trained by the public
akamaster/pytorch_resnet_cifar10 repository whose checkpoints sit in the shared weights folder.

Layout of those files: ``{"best_prec1": float, "state_dict": {...}}`` with every key prefixed
``module.`` (saved from DataParallel). Architecture: 3x3 conv, 16 channels, BN, ReLU; three
stages of n basic blocks (16, 32, 64 channels, stride 2 entering stages 2 and 3); the
shortcut that changes shape has no parameters ("option A": keep every second pixel, pad the
new channels with zeros, half before and half after the old ones); global average pool to a
64-d embedding; a 64 -> 10 ``linear`` classifier that the embedding leaves out.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable
from ..checkpoints import Checkpoint, strict_load, uninitialised
from ..weights import WeightsSource

CIFAR_EVAL = Preprocessing(resize=32, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_PREFIXES = ("state_dict.module.", "state_dict.", "module.", "", "model.")
_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
_FILES = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
}
# the repository's resnet.py names; tags give the depth
ARCHS = ArchTable(
    "cifar_resnet",
    {f"resnet{d}": d for d in (20, 32, 44, 56, 110, 1202)},
    aliases={str(d): f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)},
)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))  # zero channels on both sides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetOptionA(nn.Module):
    """He et al.'s ResNet-(6n+2) for 32x32 inputs with parameter-free option-A shortcuts (the
    akamaster checkpoints); forward returns the 64-d average-pooled embedding."""

    def __init__(self, depth: int):
        super().__init__()
        if (depth - 2) % 6:
            raise UserError(f"a CIFAR ResNet has depth 6n+2 (20, 32, 44, 56 ...), not {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [
                BasicBlock(cin if j == 0 else cout, cout, 2 if (i and j == 0) else 1)
                for j in range(n)
            ]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        self.num_features = 64

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, 64, H/4, W/4)."""
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def _prefix(ckpt: Checkpoint) -> str | None:
    for p in _PREFIXES:
        w = ckpt.flat.get(p + "conv1.weight")
        if (
            w is not None
            and w.ndim == 4
            and tuple(w.shape[1:]) == (3, 3, 3)
            and p + "layer3.0.conv1.weight" in ckpt.flat
            and not ckpt.any_prefix(p + "layer4.")
        ):
            return p
    return None


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    prefix = _prefix(ckpt)
    if prefix is None:
        raise UserError(f"{ckpt.path.name} holds no CIFAR ResNet (conv1, layer1-3, no layer4)")
    sd = ckpt.section(prefix)
    n = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layer1\.(\d+)\.", k)))
    pick = ARCHS.choose(ckpt.path.name, variant=variant, flag=opt.arch)
    depth = pick.spec if pick else 6 * n + 2
    model = uninitialised(lambda: CifarResNetOptionA(depth))
    report = strict_load(model, sd, droppable=(r"^linear\.",), fmt="cifar-resnet")
    return Loaded(
        model,
        finish_report(
            report, f"cifar resnet-{depth} ({prefix.rstrip('.') or 'flat'})", prefix=prefix
        ),
        CIFAR_EVAL,
        "model",
        f"CIFAR ResNet-{depth}, 64-d average pool",
        f"{pick.source}: {pick.name!r}" if pick else "the tensor shapes (blocks per stage)",
    )


register_family(
    Family(
        "cifar_resnet",
        lambda ckpt: _prefix(ckpt) is not None,
        _build,
        "CIFAR ResNet-20/32/44/56 with option-A shortcuts (akamaster layout)",
    )
)

for _depth, _file in _FILES.items():
    register_tag(
        f"cifar_resnet{_depth}",
        "cifar_resnet",
        str(_depth),
        WeightsSource((_file, f"resnet{_depth}.th"), url=_URL + _file),
        f"supervised CIFAR-10 ResNet-{_depth} (akamaster), 64-d embedding at 32x32",
    )
