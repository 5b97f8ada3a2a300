"""The supervised reference: the same architecture, data, augmentation family and budget as
the self-supervised methods, trained with the labels (cross-entropy through a linear head,
label smoothing). It answers "how far is each SSL method from using the labels?" under
identical conditions; the head is dropped, only the backbone is exported."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import AugConfig, OptimConfig, ViewAug
from .base import MethodSpec, SSLMethod, register


@dataclass
class SupervisedConfig:
    label_smoothing: float = 0.1


class Supervised(SSLMethod):
    def __init__(self, backbone, cfg: SupervisedConfig, num_classes: int):
        super().__init__(backbone, cfg)
        self.head = nn.Linear(backbone.embed_dim, num_classes)

    def forward(self, views: list[torch.Tensor], progress: float, labels=None) -> torch.Tensor:
        if labels is None:
            raise RuntimeError("the supervised method needs the batch's labels")
        logits = self.head(self.backbone(views[0]))
        return nn.functional.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)


def _aug(size: int) -> AugConfig:
    # the standard supervised CIFAR augmentation: crop and flip, no colour distortion
    return AugConfig(
        global_views=[
            ViewAug(size=size, crop_scale=(0.35, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.5)
        ]
    )


register(
    MethodSpec(
        "supervised",
        Supervised,
        SupervisedConfig,
        "cifar_resnet18",
        _aug,
        OptimConfig(name="adamw", base_lr=2e-3, weight_decay=5e-4, warmup_epochs=1.0),
        "supervised reference: cross-entropy on the labels, same architecture and budget",
        uses_labels=True,
    )
)
