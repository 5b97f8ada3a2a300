"""MoCo v3 (Chen, Xie & He 2021): a query encoder (backbone, projector, predictor) and a
momentum key encoder (backbone, projector) updated by EMA with m rising from m0 to 1 on a
cosine; symmetric InfoNCE against the global batch's keys (no queue)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import OptimConfig
from ..dist import gather
from ..losses import ema_update, moco_infonce
from .base import MethodSpec, SSLMethod, cosine_ramp, frozen_copy, mlp, register, two_view_aug


@dataclass
class MoCoV3Config:
    temperature: float = 0.2
    proj_hidden: int = 1024
    proj_dim: int = 128
    pred_hidden: int = 1024
    momentum: float = 0.99  # m0; reaches 1 at the end of training


class MoCoV3(SSLMethod):
    def __init__(self, backbone, cfg: MoCoV3Config):
        super().__init__(backbone, cfg)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim, 3, last_bn=True)
        self.predictor = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, 2, last_bn=True)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        n = len(views[0])
        x = torch.cat(views[:2])
        q = self.predictor(self.projector(self.backbone(x)))
        with torch.no_grad():
            k = self.key_projector(self.key_backbone(x))
        k1, off = gather(k[:n])  # the global batch's keys: constants, as in MoCo v3
        k2, _ = gather(k[n:])
        t = self.cfg.temperature
        return moco_infonce(q[:n], k2, t, off) + moco_infonce(q[n:], k1, t, off)

    def after_step(self, progress: float) -> None:
        m = cosine_ramp(self.cfg.momentum, 1.0, progress)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)


register(
    MethodSpec(
        "mocov3",
        MoCoV3,
        MoCoV3Config,
        "cifar_resnet18",
        two_view_aug,
        OptimConfig(name="adamw", base_lr=1e-3, weight_decay=1e-6),
        "MoCo v3: momentum key encoder, predictor, symmetric InfoNCE",
    )
)
