"""Hugging Face vision models through transformers (the optional extra ``ssleval-bench[hf]``).

``hf:ORG/NAME`` (a hub repo, read from the local Hugging Face cache; downloaded only when
online) or ``hf:/local/dir`` (a ``save_pretrained`` folder): ``AutoModel`` with the config's
class (the vision tower alone for a two-tower config such as SigLIP's), no repository code
(``trust_remote_code=False``) and no hub kernels (``use_kernels=False``), float32. Loading is
strict: transformers' own loading report must show no missing and no mis-shaped tensor, and
only known heads (MAE's decoder, a classifier, a two-tower model's text side) may be left over;
the report is kept, with the sha256 of the weight files.

Preprocessing is the image processor's configuration (``preprocessor_config.json``) as
ssl-eval's ``Preprocessing``: ``shortest_edge`` + ``crop_size`` is resize + centre crop
exactly; a ``height``/``width`` resize squashes to a square, which ssl-eval approximates by
resize + centre crop (identical on square images; recorded in the load report).

The feature is the one each model's paper evaluates (``FEATURE``), recorded with its reason:
the class token after the final norm for DINOv2/DINOv3 and MAE, the mean patch token for
I-JEPA (no class token), the attention-pooled output (``pooler_output``) for SigLIP; other
models give ``pooler_output`` when they have one, else the mean patch token. ``model`` is
``pooler_output``; ``cls`` and ``avgpool`` read ``last_hidden_state`` (registers skipped).
``layers:N`` reads ``output_hidden_states`` through the model's own final norm (a model without
a class token refuses it).

Why one file of ~410 lines of code: it is one source, read one way (where the files are, what the
processor says, what the tower gives, what loading left over), and its tables of model types
(``FEATURE``, ``NO_CLASS_TOKEN``, ``FINAL_NORM``, ``DROPPABLE``) are read by every part.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ...core.errors import UserError, one_line
from ...core.files import sha256_file, sha256_json
from ...core.network import hf_endpoint, offline_reason, unreachable
from ...data.transforms import Preprocessing
from ..base import Backbone, BackboneSpec, BuildOptions, WeightsInfo
from ..checkpoints import summarise_keys
from ..registry import BACKBONES

EXTRA = 'pip install "ssleval-bench[hf]"'
# model_type -> (feature kind, why): how each model's paper evaluates frozen features
FEATURE: dict[str, tuple[str, str]] = {
    "dinov2": (
        "cls",
        "DINOv2 evaluates k-NN and linear probes on the class token after the final norm",
    ),
    "dinov2_with_registers": (
        "cls",
        "DINOv2 (registers) evaluates the class token after the final norm",
    ),
    "dinov3_vit": (
        "cls",
        "DINOv3 evaluates k-NN and linear probes on the class token after the final norm",
    ),
    "vit_mae": (
        "cls",
        "MAE's linear probe reads the class token (main_linprobe.py, global_pool off)",
    ),
    "ijepa": (
        "avgpool",
        "I-JEPA has no class token; its probes read the average-pooled last-layer patch tokens",
    ),
    "siglip_vision_model": (
        "model",
        "SigLIP's image embedding is its attention-pooled (MAP) output",
    ),
    "siglip2_vision_model": (
        "model",
        "SigLIP 2's image embedding is its attention-pooled (MAP) output",
    ),
}
# what the multi-layer kinds say of a model without a class token
NO_CLASS_TOKEN = {
    "ijepa": "I-JEPA has none (its probes read the mean patch token): use avgpool",
    "siglip_vision_model": (
        "SigLIP has none (its embedding is the attention-pooled output): use model or avgpool"
    ),
    "siglip2_vision_model": (
        "SigLIP 2 has none (its embedding is the attention-pooled output): use model or avgpool"
    ),
}
# where a transformers vision model keeps the norm after its last block (Dinov2Model,
# ViTMAEModel, IJepaModel, ViTModel: layernorm; DINOv3ViTModel: norm)
FINAL_NORM = ("layernorm", "norm")
# keys a checkpoint may hold beyond the feature extractor: heads, decoders, the other tower
DROPPABLE = (
    r"^decoder\.",
    r"^classifier\.",
    r"^head\.",
    r"^heads\.",
    r"^text_model\.",
    r"^text_projection\.",
    r"^visual_projection\.",
    r"^logit_scale$",
    r"^logit_bias$",
)
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbering, as processors store it


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            f"hf: backbones need the optional package transformers ({one_line(e)}); "
            f"install it with {EXTRA}"
        ) from e
    return transformers


# ---------------------------------------------------------------- where the folder is


def _cached_snapshot(repo: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None


def resolve_folder(rest: str, opt: BuildOptions) -> tuple[Path, str]:
    """The local folder of ``hf:REST`` and where it came from."""
    if rest.startswith(("/", ".", "~")) or Path(rest).expanduser().is_dir():
        folder = Path(rest).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"hf:{rest}: {folder} has no config.json (a save_pretrained folder)")
        return folder, str(folder)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", rest):
        raise UserError(f"hf:{rest}: expected hf:ORG/NAME (a hub repo) or hf:/path/to/folder")
    hint = f"fetch it with `hf download {rest}`"
    cached = _cached_snapshot(rest)
    if cached is not None:
        return cached, f"the Hugging Face cache ({cached})"
    if offline_reason(opt.offline) is not None:
        raise UserError(
            f"hf:{rest} is not in the local Hugging Face cache and ssl-eval is offline; {hint}"
        )
    why = unreachable(hf_endpoint())  # one ~2 s probe, not the hub client's retries
    if why:
        raise UserError(f"hf:{rest} is not in the local Hugging Face cache and {why}; {hint}")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(rest, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
        if not any(path.glob("*.safetensors")):  # an older repo: PyTorch pickles only
            path = Path(snapshot_download(rest, allow_patterns=["pytorch_model*.bin"]))
    except Exception as e:  # network errors come in many types
        raise UserError(f"hf:{rest}: download failed ({type(e).__name__}); {hint}") from e
    return path, f"downloaded from the hub ({path})"


def weights_sha256(folder: Path) -> tuple[str, list[str]]:
    for pattern in _WEIGHT_FILES:
        files = sorted(folder.glob(pattern))
        if files:
            if len(files) == 1:
                return sha256_file(files[0]), [files[0].name]
            return sha256_json({f.name: sha256_file(f) for f in files}), [f.name for f in files]
    raise UserError(f"{folder} holds no weights (*.safetensors or pytorch_model*.bin)")


# ---------------------------------------------------------------- preprocessing


def _get(d, key):
    return d.get(key) if isinstance(d, dict) else getattr(d, key, None)


def _resample(value) -> tuple[str, str | None]:
    v = getattr(value, "value", value)
    if isinstance(v, str) and v in ("nearest", "bilinear", "bicubic"):
        return v, None
    if isinstance(v, int) and v in _RESAMPLE:
        return _RESAMPLE[v], None
    return "bicubic", f"the processor's resample {value!r} read as bicubic"


def processor_preprocessing(proc) -> tuple[Preprocessing, list[str]]:
    """An image processor's settings as ssl-eval's Preprocessing, and what could not be kept."""
    notes = []
    size = proc.size if getattr(proc, "do_resize", True) else None
    shortest, h, w = (_get(size, k) for k in ("shortest_edge", "height", "width"))
    if size is None:
        resize = None
    elif shortest:
        resize = int(shortest)
    elif h and w and h == w:
        resize = int(h)
        notes.append(
            f"the processor resizes to {h}x{w} ignoring the aspect ratio; ssl-eval resizes the "
            "shorter side and centre-crops: identical on square images only"
        )
    else:
        raise UserError(
            f"image processor size {dict(size) if size else size}: ssl-eval needs a square size or shortest_edge"
        )
    crop = None
    if getattr(proc, "do_center_crop", False):
        ch, cw = _get(proc.crop_size, "height"), _get(proc.crop_size, "width")
        if ch != cw:
            raise UserError(f"image processor crop {ch}x{cw} is not square")
        crop = int(ch)
    elif resize is not None:
        crop = resize
        if shortest:
            notes.append(
                "the processor keeps the aspect ratio without a crop; ssl-eval centre-crops"
            )
    if (
        getattr(proc, "do_rescale", True) is False
        or abs(getattr(proc, "rescale_factor", 1 / 255) - 1 / 255) > 1e-9
    ):
        raise UserError(
            "image processor does not rescale pixels by 1/255; ssl-eval cannot mirror it"
        )
    if getattr(proc, "do_normalize", True):
        mean = tuple(float(m) for m in proc.image_mean)
        std = tuple(float(s) for s in proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    interp, note = _resample(getattr(proc, "resample", 3))
    if note:
        notes.append(note)
    return Preprocessing(resize=resize, crop=crop, mean=mean, std=std, interpolation=interp), notes


# ---------------------------------------------------------------- the model and its features


class HFImageTower(nn.Module):
    """A transformers vision model as an ssl-eval module: ``forward`` is ``pooler_output``,
    ``forward_features`` is ``last_hidden_state`` with ``num_prefix_tokens`` (class token and
    registers) in front, so the shared ``cls`` and ``avgpool`` kinds read it."""

    def __init__(self, model: nn.Module, num_prefix_tokens: int, kwargs: dict):
        super().__init__()
        self.hf = model
        self.num_prefix_tokens = num_prefix_tokens
        self.kwargs = kwargs  # e.g. interpolate_pos_encoding at another resolution
        self.mae = model.config.model_type == "vit_mae"

    def _run(self, x: torch.Tensor, **extra):
        kw = dict(self.kwargs, **extra)
        if self.mae:  # MAE's model masks a random 75% of patches; keep all, in order
            n = (x.shape[-2] // self.hf.config.patch_size) * (
                x.shape[-1] // self.hf.config.patch_size
            )
            kw["noise"] = torch.arange(n, device=x.device, dtype=torch.float32).expand(
                x.shape[0], n
            )
        return self.hf(pixel_values=x, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = getattr(self._run(x), "pooler_output", None)
        if pooled is None:
            raise UserError(
                f"{type(self.hf).__name__} has no pooled output: use --feature-kind avgpool"
                + (" or cls" if self.num_prefix_tokens else "")
            )
        return pooled

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x).last_hidden_state

    # the last blocks (backbones/tokens.LastBlocks): layers:N and last:N

    def block_count(self) -> int:
        if self.num_prefix_tokens < 1:
            kind = self.hf.config.model_type
            raise UserError(
                "the multi-layer feature kinds (layers:N, last:N) read each block's class token; "
                + NO_CLASS_TOKEN.get(kind, f"{kind} has none: use model or avgpool")
            )
        return int(self.hf.config.num_hidden_layers)

    def _final_norm(self) -> nn.Module:
        for name in FINAL_NORM:
            norm = getattr(self.hf, name, None)
            if isinstance(norm, nn.Module):
                return norm
        raise UserError(
            f"{type(self.hf).__name__} has none of {list(FINAL_NORM)} (its final norm): "
            "layers:N cannot read its blocks as its own output does; use cls or avgpool"
        )

    def last_blocks(self, x: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``output_hidden_states``: every block's output before the final norm; the model's
        own final norm applied to the last ``n``, then split into prefix and patch tokens."""
        norm = self._final_norm()
        out = self._run(x, output_hidden_states=True)
        hidden = out.hidden_states
        if hidden is None or len(hidden) < n:
            raise UserError(
                f"{type(self.hf).__name__} gave {0 if hidden is None else len(hidden)} hidden "
                f"states for {n} blocks (transformers {_version()}); use cls or avgpool"
            )
        blocks = [norm(h) for h in hidden[-n:]]
        # the last block through the norm is the model's own output: the hidden states are the
        # blocks' outputs before the final norm, and the norm is the one the model applies
        if not torch.allclose(blocks[-1], out.last_hidden_state, rtol=1e-3, atol=1e-3):
            raise UserError(
                f"{type(self.hf).__name__}'s last hidden state through its final norm is not its "
                f"last_hidden_state (transformers {_version()}): layers:N cannot read its blocks; "
                "use cls or avgpool"
            )
        p = self.num_prefix_tokens
        return [(h[:, p:], h[:, :p]) for h in blocks]


def _version() -> str:
    import transformers

    return transformers.__version__


def _prefix_tokens(model: nn.Module) -> int:
    emb = getattr(model, "embeddings", None) or getattr(
        getattr(model, "vision_model", None), "embeddings", None
    )
    cls = 1 if emb is not None and hasattr(emb, "cls_token") else 0
    return cls + int(getattr(model.config, "num_register_tokens", 0) or 0)


@contextmanager
def _quiet(transformers):
    """transformers prints its loading table and a progress bar: the load report says it."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        transformers.utils.logging.enable_progress_bar()


def _load(transformers, folder: Path, name: str):
    from transformers import AutoConfig, AutoModel

    kw = {"trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(folder, **kw)
    except Exception as e:
        raise UserError(f"{name}: cannot read its config ({one_line(e)})") from e
    vision = getattr(config, "vision_config", None)
    cls, config_used = None, config
    if vision is not None and hasattr(vision, "model_type"):  # two towers: the image one
        from transformers.models.auto.modeling_auto import MODEL_MAPPING

        cls, config_used = MODEL_MAPPING[type(vision)], vision
    if config_used.model_type == "vit_mae":
        config_used.mask_ratio = 0.0
    try:
        loader = cls or AutoModel
        model, info = loader.from_pretrained(
            folder,
            config=config_used,
            output_loading_info=True,
            dtype=torch.float32,
            use_kernels=False,
            **kw,
        )
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{name}: transformers cannot load it ({one_line(e)})") from e
    return model, info, config_used


def _strict(info: dict, name: str, feature_kind: str) -> dict:
    """transformers' loading report, judged as ssl-eval's strict load judges a state dict."""
    drop = [re.compile(p) for p in DROPPABLE]
    unexpected = sorted(info.get("unexpected_keys") or ())
    dropped = [k for k in unexpected if any(p.match(k) for p in drop)]
    unknown = [k for k in unexpected if k not in dropped]
    missing = sorted(info.get("missing_keys") or ())
    # an unused pooler (ViT classification files carry none) may stay at its initial values
    pooler = [k for k in missing if k.startswith("pooler.")] if feature_kind != "model" else []
    missing = [k for k in missing if k not in pooler]
    shape = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    errors = list(info.get("error_msgs") or ())
    if missing or unknown or shape or errors:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unknown:
            parts.append(f"{len(unknown)} unexpected (e.g. {unknown[:5]})")
        if shape:
            parts.append(f"{len(shape)} with the wrong shape (e.g. {shape[:3]})")
        if errors:
            parts.append(one_line(errors[0]))
        raise UserError(f"{name}: weights do not match the model: " + "; ".join(parts))
    report = {
        "format": "transformers save_pretrained",
        "dropped": summarise_keys(dropped),
        "dropped_count": len(dropped),
        "missing": [],
        "unexpected": [],
    }
    if pooler:
        report["defaulted"] = [
            f"pooler.* ({len(pooler)} keys, absent; the feature does not read it)"
        ]
    return report


def build_hf(name: str, rest: str, opt: BuildOptions) -> Backbone:
    transformers = require_transformers()
    if opt.arch or opt.family:
        raise UserError(f"--arch/--family apply to ckpt:PATH; {name} is read by transformers")
    if opt.weights is not None:
        raise UserError(f"{name} names its folder; drop --weights (use hf:/path/to/folder)")
    folder, came_from = resolve_folder(rest, opt)
    sha, files = weights_sha256(folder)
    with _quiet(transformers):
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
        except Exception as e:
            raise UserError(
                f"{name}: no usable image processor config in {folder} ({one_line(e)}); "
                "its preprocessor_config.json decides the preprocessing"
            ) from e
        model, info, config = _load(transformers, folder, name)
    kind, why = FEATURE.get(config.model_type, (None, ""))
    if kind is None:
        has_pooler = getattr(model, "pooler", None) is not None or config.model_type.startswith(
            "siglip"
        )
        kind = "model" if has_pooler else "avgpool"
        why = f"{config.model_type} is not in ssl-eval's table: " + (
            "its pooled output" if has_pooler else "the mean patch token (no pooled output)"
        )
    feature_kind = opt.feature_kind or kind
    report = _strict(info, name, feature_kind)
    prefix = _prefix_tokens(model)
    if feature_kind in ("cls", "cls+avgpool") and prefix == 0:
        raise UserError(f"{name}: {config.model_type} has no class token; use avgpool or model")
    pre, notes = processor_preprocessing(proc)
    kwargs = {}
    native = getattr(config, "image_size", None)
    if opt.image_size:
        pre = pre.with_size(opt.image_size)
        if native and opt.image_size != native:
            import inspect

            if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
                kwargs["interpolate_pos_encoding"] = True
                notes.append(
                    "position embeddings interpolated by the model (interpolate_pos_encoding)"
                )
    if notes:
        report["preprocessing_notes"] = notes
    tower = HFImageTower(model, prefix, kwargs)
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    report = {
        "family": "hf",
        "file": ", ".join(files),
        **report,
        "architecture": {
            "type": "transformers",
            "class": type(model).__name__,
            "model_type": config.model_type,
            "config_sha256": sha256_json(cfg),
            "hidden_size": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None),
            "prefix_tokens": prefix,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "library": f"transformers {transformers.__version__}",
            "from": f"config.json of {came_from}",
        },
        "feature_kind_from": why if not opt.feature_kind else "--feature-kind",
        "processor": type(proc).__name__,
    }
    return Backbone(
        name,
        tower,
        pre,
        feature_kind,
        WeightsInfo("file", sha, str(folder)),
        report,
        f"transformers {type(model).__name__}",
    )


def _spec(rest: str) -> BackboneSpec:
    name = f"hf:{rest}"

    def status() -> str:
        if rest.startswith(("/", ".", "~")):
            folder = Path(rest).expanduser()
            return (
                f"present ({folder})"
                if (folder / "config.json").is_file()
                else f"missing ({folder})"
            )
        try:
            return "present (Hugging Face cache)" if _cached_snapshot(rest) else "downloadable"
        except ImportError:
            return f"needs {EXTRA}"

    return BackboneSpec(
        name, lambda opt: build_hf(name, rest, opt), status, f"transformers model {rest}"
    )


BACKBONES.register_prefix(
    "hf",
    _spec,
    "hf:ORG/NAME (Hugging Face hub, local cache first) or hf:/dir (save_pretrained): DINOv2/v3, "
    'MAE, I-JEPA, SigLIP ... through transformers, needs "ssleval-bench[hf]"',
)
