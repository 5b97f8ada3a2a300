"""The two baselines every table needs (raw pixels, random initialisation) and any timm model."""

from __future__ import annotations

import sys

import torch
from torch import nn

from ...core.errors import UserError, one_line
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..architecture import describe
from ..base import Backbone, BackboneSpec, BuildOptions, WeightsInfo, state_dict_sha256
from ..checkpoints import read_state_dict, strict_load
from ..registry import BACKBONES
from ..weights import WeightsSource

# Keys a classification checkpoint may carry that a feature extractor does not use.
HEAD_KEYS = (r"^head\.", r"^fc\.", r"^classifier\.", r"^head_dist\.", r"^last_linear\.")


class Pixels(nn.Module):
    """The floor baseline: the preprocessed image itself, flattened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _pixels(opt: BuildOptions) -> Backbone:
    if opt.weights is not None:
        raise UserError("backbone 'pixels' has no weights; drop --weights")
    if opt.arch:
        raise UserError(f"--arch {opt.arch} applies to ckpt:PATH; 'pixels' has no architecture")
    pre = Preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if opt.image_size:
        pre = pre.with_size(opt.image_size)
    report = {
        "format": "none",
        "architecture": {"type": "pixels", "parameters": 0, "from": "pixels"},
    }
    return Backbone(
        "pixels",
        Pixels(),
        pre,
        opt.feature_kind or "model",
        WeightsInfo("none", "none"),
        report,
        "raw pixels",
    )


def _timm_create(arch: str, image_size: int | None, **kw) -> nn.Module:
    import timm

    if not timm.is_model(arch.split(".")[0]):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"timm has no model {arch!r}.{hint} See timm.list_models().")
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
    if image_size and hasattr(model, "patch_embed") and kw.get("img_size") != image_size:
        # ViTs fix their position-embedding grid at creation
        kw = {**kw, "img_size": image_size}
        model = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
    return model


def timm_preprocessing(model: nn.Module) -> Preprocessing:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    crop_pct = cfg.get("crop_pct") or 1.0
    interp = cfg.get("interpolation", "bilinear")
    return Preprocessing(
        resize=int(size / crop_pct) if crop_pct < 1.0 else size,
        crop=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
    )


def load_timm_weights(model: nn.Module, path, droppable=HEAD_KEYS) -> dict:
    """Read ``path`` safely, adapt it with timm's own filter for the architecture (key renames,
    position-embedding resampling), then load strictly."""
    sd, container = read_state_dict(path)
    fmt = container
    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        try:
            sd = filt(sd, model)
            fmt += "+timm_filter"
        except Exception as e:  # a foreign layout the filter does not know
            raise UserError(f"cannot adapt {path} to {type(model).__name__}: {one_line(e)}") from e
    return strict_load(model, sd, droppable=droppable, fmt=fmt)


def timm_backbone(
    tag: str,
    arch: str,
    opt: BuildOptions,
    source: WeightsSource | None,
    *,
    preprocessing: Preprocessing | None = None,
    feature_kind: str = "model",
    random_init: bool = False,
    description: str = "",
    **create_kw,
) -> Backbone:
    if opt.arch:
        raise UserError(f"--arch {opt.arch} applies to ckpt:PATH; {tag} names its architecture")
    if random_init:
        if opt.weights is not None:
            raise UserError(f"{tag} is randomly initialised; drop --weights or use timm:{arch}")
        torch.manual_seed(opt.seed)
    model = _timm_create(arch, opt.image_size, **create_kw)
    pre = preprocessing or timm_preprocessing(model)
    if opt.image_size:
        pre = pre.with_size(opt.image_size)
    if random_init:
        weights = WeightsInfo(f"random-init(seed={opt.seed})", state_dict_sha256(model))
        report = {"format": "random-init", "kept": len(model.state_dict())}
    else:
        from ...core.files import sha256_file

        path = source.resolve(opt.weights, opt.offline)
        report = load_timm_weights(model, path)
        weights = WeightsInfo("file", sha256_file(path), str(path))
    report["architecture"] = {**describe(model), "from": f"timm's {arch}"}
    return Backbone(tag, model, pre, opt.feature_kind or feature_kind, weights, report, description)


def timm_source(arch: str) -> WeightsSource:
    """Where timm's pretrained weights for ``arch`` (with optional .tag) may be found."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:
        cfg = None
    base = arch.replace("/", "_")
    names = (f"{base}.safetensors", f"{base}.pth", f"{base}.bin")
    if cfg is None:
        return WeightsSource(names)
    return WeightsSource(
        names, hf_repo=getattr(cfg, "hf_hub_id", None), url=getattr(cfg, "url", None) or None
    )


def _timm_spec(arch: str) -> BackboneSpec:
    return BackboneSpec(
        f"timm:{arch}",
        lambda opt: timm_backbone(
            f"timm:{arch}", arch, opt, timm_source(arch), description=f"timm {arch}"
        ),
        lambda: timm_source(arch).status(),
        f"timm model {arch} with its pretrained weights",
    )


def _trainer_arch_random(tag: str, arch: str, opt: BuildOptions) -> Backbone:
    """A seeded random initialisation of one of the trainer's architectures (the untrained
    reference for models ``ssl-eval train`` produced), preprocessed as the trainer's sidecar
    preprocesses them: resize and crop to the image size (default 32), ImageNet mean/std."""
    from ..archs import build_arch

    if opt.weights is not None or opt.arch:
        raise UserError(f"{tag} is randomly initialised; drop --weights/--arch")
    torch.manual_seed(opt.seed)
    model = build_arch(arch)
    size = opt.image_size or 32
    pre = Preprocessing(resize=size, crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    weights = WeightsInfo(f"random-init(seed={opt.seed})", state_dict_sha256(model))
    report = {
        "format": "random-init",
        "kept": len(model.state_dict()),
        "architecture": {**describe(model), "from": f"ssl-eval trainer architecture {arch}"},
    }
    return Backbone(tag, model, pre, opt.feature_kind or "model", weights, report, f"random {arch}")


def _random_spec(arch: str) -> BackboneSpec:
    from ..archs import ARCHS

    if arch in ARCHS:  # the trainer's own architectures come before timm's names
        build = lambda opt: _trainer_arch_random(f"random:{arch}", arch, opt)  # noqa: E731
    else:
        build = lambda opt: timm_backbone(  # noqa: E731
            f"random:{arch}", arch, opt, None, random_init=True, description=f"random {arch}"
        )
    return BackboneSpec(
        f"random:{arch}",
        build,
        lambda: "none needed (seeded random init)",
        f"{arch} with random weights (seeded)",
    )


BACKBONES.register(
    "pixels",
    BackboneSpec("pixels", _pixels, lambda: "none needed", "raw pixels, the floor baseline"),
)
BACKBONES.register_prefix(
    "random", _random_spec, "random:<trainer or timm arch>, seeded random init"
)
BACKBONES.register_prefix("timm", _timm_spec, "timm:<model[.tag]> with timm's pretrained weights")
