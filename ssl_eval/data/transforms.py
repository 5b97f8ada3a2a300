"""Evaluation preprocessing: resize (shorter side), centre crop, scale to [0, 1], normalise.

The geometric part runs per image on uint8 tensors (in DataLoader workers); the float
conversion and normalisation run once per batch. The same code serves every backbone, so two
backbones with equal ``Preprocessing`` see identical pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ..core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a backbone. ``None`` sizes keep the native resolution."""

    resize: int | None = None  # shorter side, before the crop
    crop: int | None = None  # centre crop (square)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            size = getattr(self, name)
            if size is not None and (isinstance(size, bool) or size < 1):
                raise UserError(f"preprocessing {name} must be a positive size, not {size!r}")
        if not all(math.isfinite(x) for x in self.mean) or not all(
            math.isfinite(x) and x > 0 for x in self.std
        ):
            raise UserError(
                f"preprocessing mean {self.mean} / std {self.std}: finite, std positive"
            )
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERP:
            raise UserError(
                f"unknown interpolation {self.interpolation!r}; use one of {sorted(_INTERP)}"
            )

    def with_size(self, size: int) -> Preprocessing:
        """The same preprocessing at another resolution (resize/crop ratio kept)."""
        if self.resize and self.crop:
            return replace(self, resize=round(size * self.resize / self.crop), crop=size)
        return replace(self, resize=size, crop=size)

    def to_dict(self) -> dict:
        """Plain JSON data (lists for mean and std); ``from_dict`` reads it back."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The inverse of ``to_dict``. ``mean`` and ``std`` are required (a silent ImageNet
        default would feed a backbone the wrong pixels); ``resize``, ``crop`` and
        ``interpolation`` default as in the class. Unknown keys are refused: a setting this
        version cannot apply must not be dropped silently."""
        from ..core.config import from_mapping

        if not isinstance(d, dict):
            raise UserError(f"preprocessing must be a mapping, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(map(str, d)) - known)
        if unknown:
            raise UserError(f"unknown preprocessing setting(s) {unknown}; known: {sorted(known)}")
        missing = [k for k in ("mean", "std") if k not in d]
        if missing:
            raise UserError(f"preprocessing lacks {missing}")
        return from_mapping(cls, d, "preprocessing")  # types and lengths checked

    def geometric(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 CHW -> uint8 CHW, resized and cropped."""
        if self.resize is not None and min(img.shape[-2:]) != self.resize:
            img = F.resize(
                img, [self.resize], interpolation=_INTERP[self.interpolation], antialias=True
            )
        if self.crop is not None and tuple(img.shape[-2:]) != (self.crop, self.crop):
            img = F.center_crop(img, [self.crop, self.crop])
        return img

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> float32 NCHW normalised."""
        x = batch.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)
