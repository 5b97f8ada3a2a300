"""What every SSL method provides, and the registry the trainer looks methods up in (no
if/elif on method names anywhere)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ...core.config import from_mapping
from ...core.errors import UserError
from ...core.registry import Registry
from ..config import AugConfig, OptimConfig


class SSLMethod(nn.Module):
    """A backbone plus the method's heads and targets. ``forward(views, progress)`` returns the
    loss of one step; ``after_step(progress)`` updates momentum targets, centres and the like.
    ``progress`` is the fraction of training done (samples seen / total samples), so every
    schedule counts data, not steps or processes."""

    def __init__(self, backbone: nn.Module, cfg: object):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.rng: torch.Generator | None = (
            None  # set by the loop each step, keyed by (seed, epoch, step)
        )

    def forward(self, views: list[torch.Tensor], progress: float) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after the optimiser step."""

    def before_step(self, progress: float) -> None:
        """Called after backward, before the optimiser step (e.g. to freeze prototypes)."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its module class, its config dataclass, and its defaults."""

    name: str
    cls: type[SSLMethod]
    config: type
    default_arch: str  # at 32x32
    aug: callable  # image_size -> AugConfig
    optim: OptimConfig
    description: str = ""
    feature_kind: str = "model"  # how the evaluator reads the trained backbone
    # True for the supervised reference: the loop then passes the batch's labels to forward
    # and the method's constructor receives ``num_classes``; no self-supervised method sees them
    uses_labels: bool = False

    def make_config(self, overrides: dict) -> object:
        names = {f.name for f in dataclasses.fields(self.config)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise UserError(f"{self.name}: unknown method setting(s) {bad}; known: {sorted(names)}")
        return from_mapping(self.config, overrides, f"{self.name} method_cfg")


METHODS: Registry[MethodSpec] = Registry("training method")


def register(spec: MethodSpec) -> MethodSpec:
    return METHODS.register(spec.name, spec, spec.description)


def mlp(
    dim_in: int, hidden: int, dim_out: int, layers: int = 2, last_bn: bool = False
) -> nn.Sequential:
    """Linear-BN-ReLU x (layers - 1), then Linear (+ BN without affine, as SimSiam/MoCo v3)."""
    mods: list[nn.Module] = []
    d = dim_in
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, dim_out, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*mods)


def cosine_ramp(start: float, end: float, progress: float) -> float:
    """start -> end along a half cosine over training (momentum schedules of BYOL/MoCo/DINO)."""
    p = min(max(progress, 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * p) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: a momentum target that only moves by EMA."""
    import copy

    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def two_view_aug(image_size: int, **first_overrides) -> AugConfig:
    from ..config import ViewAug

    return AugConfig(
        global_views=[ViewAug(size=image_size, **first_overrides), ViewAug(size=image_size)]
    )
