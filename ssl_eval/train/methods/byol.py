"""BYOL (Grill et al. 2020): an online network (backbone, projector, predictor) regresses the
projection of an EMA target network (tau from ~0.99 to 1 on a cosine) with a normalised MSE,
symmetrised over the two views; no gradient reaches the target."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AugConfig, OptimConfig, ViewAug
from ..losses import ema_update, normalized_mse
from .base import MethodSpec, SSLMethod, cosine_ramp, frozen_copy, mlp, register


@dataclass
class BYOLConfig:
    proj_hidden: int = 1024
    proj_dim: int = 128
    pred_hidden: int = 1024
    tau: float = 0.99  # base EMA rate; reaches 1 at the end of training


class BYOL(SSLMethod):
    def __init__(self, backbone, cfg: BYOLConfig):
        super().__init__(backbone, cfg)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        n = len(views[0])
        x = torch.cat(views[:2])
        p = self.predictor(self.projector(self.backbone(x)))
        with torch.no_grad():
            z = self.target_projector(self.target_backbone(x))
        return normalized_mse(p[:n], z[n:]) + normalized_mse(p[n:], z[:n])

    def after_step(self, progress: float) -> None:
        tau = cosine_ramp(self.cfg.tau, 1.0, progress)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)


def _aug(size: int) -> AugConfig:
    """BYOL's asymmetric views (blur always / rarely, solarise never / sometimes); blur only
    above 64 pixels, where it does not wipe out the image."""
    big = size > 64
    return AugConfig(
        global_views=[
            ViewAug(size=size, crop_scale=(0.08, 1.0), blur_p=1.0 if big else 0.0),
            ViewAug(size=size, crop_scale=(0.08, 1.0), blur_p=0.1 if big else 0.0, solarize_p=0.2),
        ]
    )


register(
    MethodSpec(
        "byol",
        BYOL,
        BYOLConfig,
        "cifar_resnet18",
        _aug,
        OptimConfig(name="adamw", base_lr=1e-3, weight_decay=1e-6),
        "BYOL: EMA target, predictor, normalised MSE",
    )
)
