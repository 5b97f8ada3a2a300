"""Resolve the training config: a TrainConfig from (in increasing precedence) the method's
defaults, a YAML file, explicit settings and ``key=value`` overrides, read by the shared
loader (ssl_eval.core.config). The CLI and the ablation both go through here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.config import apply_set, deep_update, from_mapping, read_yaml, refuse_non_finite
from ..core.errors import UserError
from .config import TrainConfig
from .methods import METHODS


def get_method(name: str):
    """The registered method, or a UserError listing the choices."""
    import difflib

    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"unknown training method {name!r}.{hint} Choose one of: {', '.join(METHODS.names())}"
        )
    return METHODS.get(name)


def default_config(method: str, image_size: int = 32) -> TrainConfig:
    """The method's own defaults: its augmentation, optimiser, method settings and, at 32x32,
    its small architecture (for bigger inputs pick ``--arch timm:<name>``)."""
    spec = get_method(method)
    vit = spec.default_arch.startswith("vit")
    big = "timm:vit_small_patch16_224" if vit else "timm:resnet18"
    return TrainConfig(
        method=method,
        arch=spec.default_arch if image_size <= 64 else big,
        arch_kwargs={"dynamic_img_size": True, "img_size": image_size}
        if vit and image_size > 64
        else {},
        image_size=image_size,
        aug=spec.aug(image_size),
        optim=dataclasses.replace(spec.optim),
        method_cfg=dataclasses.asdict(spec.config()),
    )


def read_config_file(path: Path) -> dict:
    """The settings mapping of a training config YAML file (an empty file is no settings)."""
    data = read_yaml(path, "training config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"training config {path} must be a mapping of settings")
    return data


def resolve_config(
    method: str,
    image_size: int = 32,
    config_file: Path | None = None,
    settings: dict | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """The config a training run uses; every layer is checked by the shared loader, so an
    unknown key or a value of the wrong type fails here, before any data is read."""
    d = default_config(method, image_size).to_dict()
    if config_file is not None:
        d = deep_update(d, read_config_file(config_file))
    d = deep_update(d, {k: v for k, v in (settings or {}).items() if v is not None})
    for o in overrides or []:
        d = apply_set(d, o)
    cfg = from_mapping(TrainConfig, d, "train config")
    refuse_non_finite(cfg, "train config")
    get_method(cfg.method).make_config(cfg.method_cfg)  # unknown method keys fail here, early
    return cfg


def dump_yaml(cfg: TrainConfig) -> str:
    import yaml

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)
