"""Architectures the bundled trainer builds, by name, so the evaluator can rebuild a trained
backbone from its sidecar without importing the trainer (data flows one way: train/ imports
backbones/, never the reverse).

Every constructor returns an ``nn.Module`` whose ``forward`` gives the pooled embedding
(N, D) and that carries ``embed_dim``. Vision transformers also expose ``forward_tokens``
(used by MAE) through timm's ``VisionTransformer`` parts.

  * ``cifar_resnet18``: ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool), as in
    the SimCLR paper's CIFAR experiments; 512-d.
  * ``cifar_resnet_small`` / ``cifar_resnet_tiny``: the same layout, fewer blocks and channels,
    for CPU budgets and tests.
  * ``vit_tiny_p4`` / ``vit_micro_p4``: ViTs with 4-pixel patches for 32x32 inputs.
  * ``timm:<name>``: any timm model (no pretrained weights), for bigger inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core.errors import UserError
from ..core.registry import Registry

ArchBuilder = Callable[..., nn.Module]
ARCHS: Registry[ArchBuilder] = Registry("architecture")


class _Block(nn.Module):
    """ResNet basic block (two 3x3 convs) with a 1x1 projection shortcut when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarStemResNet(nn.Module):
    """The trainer's ResNet with the CIFAR stem: a 3x3 stride-1 conv and no max-pool, so a 32x32
    image keeps its resolution in the first stage (the ImageNet stem would shrink it to 8x8 at
    once); 1x1 projection shortcuts. Not the akamaster option-A ResNet of families/cifar.py."""

    def __init__(
        self, blocks: tuple[int, ...] = (2, 2, 2, 2), widths: tuple[int, ...] = (64, 128, 256, 512)
    ):
        super().__init__()
        if len(blocks) != len(widths):
            raise UserError("cifar_resnet: blocks and widths need the same length")
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.embed_dim = cin

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))


def _vit(
    embed_dim: int, depth: int, num_heads: int, img_size: int = 32, patch_size: int = 4, **kw: Any
) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=0,
        global_pool="token",
        **{"dynamic_img_size": True, **kw},
    )
    model.embed_dim = embed_dim
    return model


def _timm(name: str) -> ArchBuilder:
    def build(**kw: Any) -> nn.Module:
        import timm

        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
        except RuntimeError as e:
            raise UserError(f"timm has no model {name!r} ({e}); see timm.list_models()") from e
        model.embed_dim = model.num_features
        return model

    return build


ARCHS.register(
    "cifar_resnet18",
    lambda **kw: CifarStemResNet(**kw),
    "ResNet-18, CIFAR stem, 512-d (11M params)",
)
ARCHS.register(
    "cifar_resnet_small",
    lambda **kw: CifarStemResNet(**{"blocks": (1, 1, 1, 1), "widths": (32, 64, 128, 256), **kw}),
    "ResNet-10 at half width, CIFAR stem, 256-d (1.2M params): the CPU ablation's backbone",
)
ARCHS.register(
    "cifar_resnet_tiny",
    lambda **kw: CifarStemResNet(**{"blocks": (1, 1, 1), "widths": (8, 16, 32), **kw}),
    "three stages of one block, 8-32 channels, 32-d: tests only",
)
ARCHS.register(
    "vit_tiny_p4",
    lambda **kw: _vit(**{"embed_dim": 192, "depth": 9, "num_heads": 3, **kw}),
    "ViT-Tiny width (192), depth 9, 4-pixel patches, 32x32 input",
)
ARCHS.register(
    "vit_micro_p4",
    lambda **kw: _vit(**{"embed_dim": 64, "depth": 2, "num_heads": 2, **kw}),
    "ViT, width 64, depth 2, 4-pixel patches: tests only",
)
ARCHS.register_prefix("timm", _timm, "timm:<model name>, randomly initialised")


def build_arch(name: str, kwargs: dict | None = None) -> nn.Module:
    """Build architecture ``name`` (randomly initialised) with constructor ``kwargs``."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (kwargs or {}).items()}
    try:
        return ARCHS.get(name)(**kwargs)
    except TypeError as e:
        raise UserError(f"architecture {name!r} does not take {sorted(kwargs)}: {e}") from e


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")
