"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of the two views' batch-
standardised embeddings, over the global batch, driven to the identity (lambda weighs the
off-diagonal redundancy term).

Every process computes the loss of the global batch from the gathered embeddings; the gather
returns each row's gradient to its owner, so the averaged data-parallel gradient is the
single-process gradient. The original code all-reduces the correlation matrix outside autograd
instead, which leaves its gradient 1/(number of processes) of that (docs/trainer.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OptimConfig
from ..dist import gather_with_grad
from ..losses import barlow_twins
from .base import MethodSpec, SSLMethod, mlp, register, two_view_aug


@dataclass
class BarlowTwinsConfig:
    proj_hidden: int = 1024
    proj_dim: int = 1024
    lambd: float = 0.0051


class BarlowTwins(SSLMethod):
    def __init__(self, backbone, cfg: BarlowTwinsConfig):
        super().__init__(backbone, cfg)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim, 3)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        n = len(views[0])
        z = self.projector(self.backbone(torch.cat(views[:2])))
        z1, _ = gather_with_grad(z[:n])
        z2, _ = gather_with_grad(z[n:])
        return barlow_twins(z1, z2, self.cfg.lambd)


register(
    MethodSpec(
        "barlowtwins",
        BarlowTwins,
        BarlowTwinsConfig,
        "cifar_resnet18",
        two_view_aug,
        OptimConfig(name="adamw", base_lr=1e-3, weight_decay=1e-6),
        "Barlow Twins: cross-correlation to the identity",
    )
)
