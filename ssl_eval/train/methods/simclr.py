"""SimCLR (Chen et al. 2020): two views, an MLP projector, NT-Xent over the global batch's
2N-2 negatives with a temperature."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AugConfig, OptimConfig, ViewAug
from ..dist import gather_with_grad
from ..losses import nt_xent
from .base import MethodSpec, SSLMethod, mlp, register


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    proj_hidden: int = 512
    proj_dim: int = 128


class SimCLR(SSLMethod):
    def __init__(self, backbone, cfg: SimCLRConfig):
        super().__init__(backbone, cfg)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        n = len(views[0])
        z = self.projector(self.backbone(torch.cat(views[:2])))
        z1, z2 = z[:n], z[n:]
        all1, off = gather_with_grad(z1)
        all2, _ = gather_with_grad(z2)
        return nt_xent(z1, z2, self.cfg.temperature, all1, all2, off)


def _aug(size: int) -> AugConfig:
    # the CIFAR recipe: no blur at 32x32 (SimCLR appendix B.9)
    return AugConfig(global_views=[ViewAug(size=size, crop_scale=(0.08, 1.0)) for _ in range(2)])


register(
    MethodSpec(
        "simclr",
        SimCLR,
        SimCLRConfig,
        "cifar_resnet18",
        _aug,
        OptimConfig(name="adamw", base_lr=1e-3, weight_decay=1e-6, warmup_epochs=1.0),
        "SimCLR: NT-Xent over in-batch negatives",
    )
)
