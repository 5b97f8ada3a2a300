"""SwAV (Caron et al. 2020): embeddings are scored against learnable L2-normalised prototypes;
Sinkhorn-Knopp turns each global view's scores over the global batch into equal-partition
codes; every view predicts the codes of the other global views (swapped prediction).
Multi-crop: two global views plus ``aug.local_views`` small crops. No queue: at small batch
sizes prefer more local crops or a longer prototype freeze."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AugConfig, OptimConfig, ViewAug
from ..dist import gather
from ..losses import sinkhorn, swapped_prediction
from .base import MethodSpec, SSLMethod, mlp, register


@dataclass
class SwAVConfig:
    proj_hidden: int = 1024
    proj_dim: int = 128
    prototypes: int = 100
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iters: int = 3
    freeze_prototypes: float = (
        0.05  # fraction of training with frozen prototypes (stabilises the start)
    )


class SwAV(SSLMethod):
    def __init__(self, backbone, cfg: SwAVConfig):
        super().__init__(backbone, cfg)
        self.projector = mlp(backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim)
        self.prototypes = nn.Linear(cfg.proj_dim, cfg.prototypes, bias=False)
        self._normalise_prototypes()

    @torch.no_grad()
    def _normalise_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.projector(self.backbone(x)), dim=1))

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        n = len(views[0])
        scores = list(self._scores(torch.cat(views[:2])).split(n))
        if len(views) > 2:  # local crops share a size: one forward
            scores += list(self._scores(torch.cat(views[2:])).split(n))
        codes = []
        for s in scores[:2]:
            all_s, off = gather(s)  # codes are targets: no gradient
            codes.append(sinkhorn(all_s, self.cfg.epsilon, self.cfg.sinkhorn_iters)[off : off + n])
        return swapped_prediction(scores, codes, self.cfg.temperature)

    def before_step(self, progress: float) -> None:
        if progress < self.cfg.freeze_prototypes:
            self.prototypes.weight.grad = None

    def after_step(self, progress: float) -> None:
        self._normalise_prototypes()


def multicrop(size: int) -> AugConfig:
    """Two global views (scale 0.14-1) and four local views at half size (scale 0.05-0.14)."""
    return AugConfig(
        global_views=[ViewAug(size=size, crop_scale=(0.14, 1.0)) for _ in range(2)],
        local_views=4,
        local=ViewAug(size=max(size // 2, 8), crop_scale=(0.05, 0.14)),
    )


register(
    MethodSpec(
        "swav",
        SwAV,
        SwAVConfig,
        "cifar_resnet18",
        multicrop,
        OptimConfig(name="adamw", base_lr=1e-3, weight_decay=1e-6),
        "SwAV: Sinkhorn codes against prototypes, swapped prediction, multi-crop",
    )
)
