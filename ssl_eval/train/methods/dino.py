"""DINO (Caron et al. 2021): a student matches the centred, sharpened output distribution of
an EMA teacher. The teacher sees only the global crops, the student all crops (multi-crop);
the teacher temperature warms up, the centre follows the teacher's batch mean with a
momentum, the teacher's EMA rate rises from m0 to 1 on a cosine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OptimConfig
from ..dist import all_reduce_mean
from ..losses import dino_loss, ema_update, update_center
from .base import MethodSpec, SSLMethod, cosine_ramp, frozen_copy, mlp, register
from .swav import multicrop


@dataclass
class DINOConfig:
    out_dim: int = 4096
    hidden: int = 512
    bottleneck: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # after warmup
    warmup_teacher_temp: float = 0.04
    warmup_teacher_fraction: float = 0.3  # of training (the paper: 30 of 100 epochs)
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA m0; reaches 1 at the end


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2 normalisation, then a weight-normalised linear layer with unit
    row norms (DINO's weight_norm with the gain fixed to 1)."""

    def __init__(self, dim: int, cfg: DINOConfig):
        super().__init__()
        self.mlp = mlp(dim, cfg.hidden, cfg.bottleneck, 3)
        self.last = nn.Linear(cfg.bottleneck, cfg.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(x), dim=1), F.normalize(self.last.weight, dim=1))


class DINO(SSLMethod):
    def __init__(self, backbone, cfg: DINOConfig):
        super().__init__(backbone, cfg)
        self.head = DINOHead(backbone.embed_dim, cfg)
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self._teacher_mean: torch.Tensor | None = None

    def teacher_temp(self, progress: float) -> float:
        c = self.cfg
        if progress >= c.warmup_teacher_fraction:
            return c.teacher_temp
        return (
            c.warmup_teacher_temp
            + (c.teacher_temp - c.warmup_teacher_temp) * progress / c.warmup_teacher_fraction
        )

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        n = len(views[0])
        student = list(self.head(self.backbone(torch.cat(views[:2]))).split(n))
        if len(views) > 2:
            student += list(self.head(self.backbone(torch.cat(views[2:]))).split(n))
        with torch.no_grad():
            t = self.teacher_head(self.teacher_backbone(torch.cat(views[:2])))
        self._teacher_mean = t.mean(0, keepdim=True)
        return dino_loss(
            student,
            list(t.split(n)),
            self.center,
            self.cfg.student_temp,
            self.teacher_temp(progress),
        )

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(
            self.teacher_backbone, self.backbone, cosine_ramp(self.cfg.momentum, 1.0, progress)
        )
        ema_update(self.teacher_head, self.head, cosine_ramp(self.cfg.momentum, 1.0, progress))
        if self._teacher_mean is not None:
            batch_mean = all_reduce_mean(self._teacher_mean)
            self.center.copy_(update_center(self.center, batch_mean, self.cfg.center_momentum))


register(
    MethodSpec(
        "dino",
        DINO,
        DINOConfig,
        "vit_tiny_p4",
        multicrop,
        OptimConfig(name="adamw", base_lr=5e-4, weight_decay=0.04),
        "DINO: EMA teacher, centring and sharpening, multi-crop",
    )
)
