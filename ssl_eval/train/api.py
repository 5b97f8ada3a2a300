"""Assemble a TrainConfig from (in increasing precedence) the method's defaults, a YAML file,
explicit settings and ``key=value`` overrides; the CLI and the ablation both go through here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import TrainConfig, apply_override, config_from_dict, deep_update, load_yaml
from .methods import METHODS


def get_method(name: str):
    """The registered method, or a UserError listing the choices."""
    import difflib

    from ..errors import UserError

    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS.names(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown training method {name!r}.{hint} Choose one of: {', '.join(METHODS.names())}")
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
        arch_kwargs={"dynamic_img_size": True, "img_size": image_size} if vit and image_size > 64 else {},
        image_size=image_size,
        aug=spec.aug(image_size),
        optim=dataclasses.replace(spec.optim),
        method_cfg=dataclasses.asdict(spec.config()),
    )


def resolve_config(
    method: str, image_size: int = 32, config_file: Path | None = None,
    settings: dict | None = None, overrides: list[str] | None = None,
) -> TrainConfig:
    d = default_config(method, image_size).to_dict()
    if config_file is not None:
        d = deep_update(d, load_yaml(config_file))
    d = deep_update(d, {k: v for k, v in (settings or {}).items() if v is not None})
    for o in overrides or []:
        d = apply_override(d, o)
    cfg = config_from_dict(d)
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
