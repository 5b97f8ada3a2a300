"""SimSiam (Chen & He 2021): BYOL without the EMA. One shared encoder; the predictor's output
of one view regresses the stop-gradient projection of the other (negative cosine)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OptimConfig
from ..losses import negative_cosine
from .base import MethodSpec, SSLMethod, mlp, register, two_view_aug


@dataclass
class SimSiamConfig:
    proj_hidden: int = 1024
    proj_dim: int = 512
    pred_hidden: int = 128  # bottleneck, a quarter of proj_dim as in the paper


class SimSiam(SSLMethod):
    def __init__(self, backbone, cfg: SimSiamConfig):
        super().__init__(backbone, cfg)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim, 3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        n = len(views[0])
        z = self.projector(self.backbone(torch.cat(views[:2])))
        p = self.predictor(z)
        return 0.5 * (negative_cosine(p[:n], z[n:]) + negative_cosine(p[n:], z[:n]))


register(
    MethodSpec(
        "simsiam",
        SimSiam,
        SimSiamConfig,
        "cifar_resnet18",
        two_view_aug,
        OptimConfig(name="adamw", base_lr=1e-3, weight_decay=1e-6),
        "SimSiam: shared encoder, predictor, stop-gradient",
    )
)
