"""CLIP and SigLIP image towers through open_clip (the optional extra ``ssleval-bench[clip]``).

``openclip:ARCH/TAG`` (``openclip:ViT-B-16/openai``) takes open_clip's built-in config for
ARCH and its pretrained config for TAG (preprocessing, QuickGELU); ``openclip:ARCH`` needs
``--weights``; ``openclip:hf-hub:ORG/NAME`` and ``openclip:/local/dir`` read a folder in the
layout open_clip publishes on the Hugging Face hub (``open_clip_config.json`` with
``model_cfg`` and ``preprocess_cfg``, beside ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``). Named tags: ``clip_vitb16``, ``clip_vitl14`` (OpenAI) and
``siglip2_vitb16`` (SigLIP 2, WebLI).

Only the image tower is built (open_clip's own ``_build_vision_tower``, as ``CLIP`` builds
it) and loaded strictly from the ``visual.*`` keys; the text tower and the logit scale/bias
are the only keys allowed to be left over, and the load report lists them. Features: ``model``
is ``encode_image`` (the projected image embedding, unnormalised); ``cls`` is the pooled token
before the projection (the class token after ``ln_post`` for CLIP ViTs; for SigLIP, whose
towers have no projection, the attention-pooled output, equal to ``model``); ``avgpool`` the
mean patch token; ``layers:N`` the resblocks through ``ln_post`` (open_clip's own
``forward_intermediates``; a timm trunk's). The weights are read by ssl-eval (safetensors or weights-only torch.load),
never by open_clip's loader.

Preprocessing is open_clip's, as ssl-eval's ``Preprocessing``: ``resize_mode`` ``shortest``
(CLIP) is resize-shorter-side + centre crop, exactly; ``squash`` (SigLIP) resizes to a square
ignoring the aspect ratio, which ssl-eval approximates by resize + centre crop: identical on
square images, and recorded in the load report.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...core.errors import UserError, one_line
from ...core.files import sha256_file
from ...core.network import hf_endpoint, offline_reason, unreachable
from ...data.transforms import Preprocessing
from ..adapters import finish_report
from ..base import Backbone, BackboneSpec, BuildOptions, WeightsInfo
from ..checkpoints import read_state_dict, strict_load, strip_prefix
from ..registry import BACKBONES
from ..tokens import LastBlocks, block_reader
from ..weights import WeightsSource

EXTRA = 'pip install "ssleval-bench[clip]"'
CONFIG = "open_clip_config.json"
# open_clip's own preference among the files of a published folder (factory._find_checkpoint_in_dir)
FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
# everything of a CLIP / SigLIP / CoCa checkpoint that is not the image tower
TEXT_KEYS = (
    r"^text\.",
    r"^transformer\.",
    r"^token_embedding\.",
    r"^positional_embedding$",
    r"^ln_final\.",
    r"^text_projection",
    r"^text_decoder\.",
    r"^logit_scale$",
    r"^logit_bias$",
    r"^attn_mask$",
)
_INTERP = ("bilinear", "bicubic", "nearest")
# named tags: (ARCH, TAG, description)
NAMED = {
    "clip_vitb16": ("ViT-B-16", "openai", "OpenAI CLIP ViT-B/16 image tower (open_clip)"),
    "clip_vitl14": ("ViT-L-14", "openai", "OpenAI CLIP ViT-L/14 image tower (open_clip)"),
    "siglip2_vitb16": ("ViT-B-16-SigLIP2", "webli", "SigLIP 2 ViT-B/16 image tower (open_clip)"),
}


def require_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise UserError(
            f"openclip: backbones need the optional package open_clip ({one_line(e)}); "
            f"install it with {EXTRA}"
        ) from e
    return open_clip


def _download_hint(repo: str, filename: str = "") -> str:
    return f"fetch it with `hf download {repo}{' ' + filename if filename else ''}`"


# ---------------------------------------------------------------- the tower and its features


class OpenClipImageTower(nn.Module):
    """open_clip's image tower: ``forward`` is ``encode_image``; ``forward_features`` gives the
    pooled token before the projection followed by the patch tokens, so the shared feature
    kinds read ``cls`` = pre-projection token and ``avgpool`` = mean patch token."""

    num_prefix_tokens = 1

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        if hasattr(v, "trunk"):  # a timm trunk (SigLIP, ConvNeXt CLIPs): pooled = trunk's head
            feats = v.trunk.forward_features(x)
            pooled = v.trunk.forward_head(feats)
            if feats.ndim == 4:
                tokens = feats.flatten(2).transpose(1, 2)
            else:
                tokens = feats[:, getattr(v.trunk, "num_prefix_tokens", 0) :]
        elif hasattr(v, "_pool") and hasattr(v, "_embeds") and not v.final_ln_after_pool:
            pooled, tokens = v._pool(v.transformer(v._embeds(x)))
        else:
            pooled = tokens = None
        if pooled is None or pooled.ndim != 2 or tokens.ndim != 3:
            raise UserError(
                f"this open_clip tower ({type(v).__name__}) gives only its embedding: "
                "use --feature-kind model"
            )
        return torch.cat([pooled[:, None], tokens], dim=1)

    # the last blocks (backbones/tokens.LastBlocks): layers:N and last:N

    def _trunk(self) -> LastBlocks:
        reader = block_reader(self.visual.trunk)
        if reader is None:
            raise UserError(
                "the multi-layer feature kinds (layers:N, last:N) read each block's class token; "
                f"this open_clip tower's timm trunk ({type(self.visual.trunk).__name__}) has "
                "none (SigLIP pools its patch tokens by attention): use model, cls or avgpool"
            )
        return reader

    def block_count(self) -> int:
        v = self.visual
        if hasattr(v, "trunk"):
            return self._trunk().block_count()
        if not hasattr(v, "forward_intermediates") or getattr(v, "attn_pool", None) is not None:
            raise UserError(
                f"this open_clip tower ({type(v).__name__}) has no blocks the multi-layer "
                "feature kinds (layers:N, last:N) can read (its ln_post follows an attentional "
                "pooler): use model, cls or avgpool"
            )
        return len(v.transformer.resblocks)

    def last_blocks(self, x: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A CLIP ViT: open_clip's own ``forward_intermediates`` with ``ln_post`` on every
        block (class token first); a timm trunk: the trunk's ``forward_intermediates``."""
        v = self.visual
        if hasattr(v, "trunk"):
            return self._trunk().last_blocks(x, n)
        out = v.forward_intermediates(
            x,
            indices=n,
            normalize_intermediates=True,
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        return list(zip(out["image_intermediates"], out["image_intermediates_prefix"], strict=True))


# ---------------------------------------------------------------- configs


def _preprocessing(pp: dict, size: int) -> tuple[Preprocessing, list[str]]:
    """open_clip's PreprocessCfg as ssl-eval's Preprocessing, and what could not be kept."""
    notes = []
    interp = pp.get("interpolation", "bicubic")
    if interp not in _INTERP:
        notes.append(f"open_clip interpolation {interp!r} read as bicubic")
        interp = "bicubic"
    mode = pp.get("resize_mode", "shortest")
    if mode != "shortest":
        notes.append(
            f"open_clip resize_mode {mode!r}: ssl-eval resizes the shorter side to {size} and "
            "centre-crops, identical to open_clip on square images only"
        )
    pre = Preprocessing(
        resize=size,
        crop=size,
        mean=tuple(float(m) for m in pp["mean"]),
        std=tuple(float(s) for s in pp["std"]),
        interpolation=interp,
    )
    return pre, notes


def _square(size, what: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UserError(
                f"{what}: image size {tuple(size)} is not square; ssl-eval crops squares"
            )
        size = size[0]
    return int(size)


def tag_config(arch: str, tag: str | None) -> tuple[dict, dict, str]:
    """open_clip's built-in model config for ``arch``, the preprocessing of ``tag`` (open_clip's
    defaults without one) and the Hugging Face repo holding the tag's weights ('' if none)."""
    open_clip = require_open_clip()
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    name = arch.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"open_clip has no model {arch!r}.{hint} See open_clip.list_models().")
    pp = merge_preprocess_dict(PreprocessCfg(), {})
    repo = ""
    if tag:
        pcfg = open_clip.get_pretrained_cfg(name, tag)
        if not pcfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise UserError(f"open_clip has no pretrained tag {tag!r} for {name}; its tags: {tags}")
        pp = merge_preprocess_dict(pp, pcfg)
        if pcfg.get("quick_gelu"):  # the activation the weights were trained with
            cfg["quick_gelu"] = True
        repo = (pcfg.get("hf_hub") or "").strip("/")
    pp["size"] = cfg["vision_cfg"].get("image_size", pp["size"])
    return cfg, pp, repo


def _hub_file(repo: str, filename: str, opt: BuildOptions) -> Path:
    """A file of a hub repo from the local Hugging Face cache, downloaded only when online."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename)
    if isinstance(hit, str) and Path(hit).is_file():
        return Path(hit)
    if offline_reason(opt.offline) is not None:
        raise UserError(
            f"openclip:hf-hub:{repo}: {filename} is not in the Hugging Face cache and ssl-eval "
            f"is offline; {_download_hint(repo)}"
        )
    why = unreachable(hf_endpoint())  # one ~2 s probe, not the hub client's retries
    if why:
        raise UserError(
            f"openclip:hf-hub:{repo}: {filename} is not in the Hugging Face cache and {why}; "
            f"{_download_hint(repo)}"
        )
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # network errors come in many types
        raise UserError(
            f"openclip:hf-hub:{repo}: cannot download {filename} ({type(e).__name__}); "
            f"{_download_hint(repo)}"
        ) from e


def _read_folder_config(path: Path, where: str) -> tuple[dict, dict]:
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{where}: cannot read {path.name} ({one_line(e)})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_cfg"), dict):
        raise UserError(f"{where}: {path.name} has no 'model_cfg' (open_clip's published layout)")
    model_cfg = cfg["model_cfg"]
    pp = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg") or {})
    pp["size"] = model_cfg.get("vision_cfg", {}).get("image_size", pp["size"])
    return model_cfg, pp


# ---------------------------------------------------------------- build


def _load_tower(visual: nn.Module, path: Path, size_changed: bool) -> dict:
    """Strictly load the ``visual.*`` keys of ``path`` (or a tower-only file) into ``visual``;
    every other key must belong to the text tower or the logit scale/bias."""
    import re

    from open_clip.model import resize_pos_embed

    sd, container = read_state_dict(path)
    sd = strip_prefix(sd, ("module.",))
    if any(k.startswith("visual.") for k in sd):
        tower = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        others = sorted(k for k in sd if not k.startswith("visual."))
    else:  # a file holding the image tower alone
        tower, others = sd, []
    text = [re.compile(p) for p in TEXT_KEYS]
    unknown = [k for k in others if not any(p.match(k) for p in text)]
    if unknown:
        raise UserError(
            f"{path.name}: {len(unknown)} keys belong to neither open_clip's image tower nor "
            f"its text tower (e.g. {unknown[:5]}); is this an open_clip checkpoint?"
        )
    fmt = f"open_clip ({container}{', image tower only' if not others else ''})"
    if size_changed and "positional_embedding" in tower and hasattr(visual, "grid_size"):
        shim = nn.Module()
        shim.visual = visual
        moved = {"visual.positional_embedding": tower["positional_embedding"]}
        resize_pos_embed(moved, shim)  # open_clip's own resampling (bicubic, antialiased)
        tower["positional_embedding"] = moved["visual.positional_embedding"]
        fmt += ", position embedding resampled by open_clip's resize_pos_embed"
    report = strict_load(visual, tower, fmt=fmt)
    return finish_report(report, fmt, others)


def build_openclip(
    name: str, model_cfg: dict, pp: dict, weights: Path, opt: BuildOptions, config_from: str
) -> Backbone:
    open_clip = require_open_clip()
    from open_clip.model import _build_vision_tower

    if opt.arch or opt.family:
        raise UserError(f"--arch/--family apply to ckpt:PATH; {name} names its architecture")
    vision_cfg = dict(model_cfg["vision_cfg"])
    native = _square(vision_cfg.get("image_size", pp["size"]), name)
    size = opt.image_size or native
    timm_tower = "timm_model_name" in vision_cfg
    if not timm_tower:
        vision_cfg["image_size"] = size  # open_clip's ViT fixes its position grid at creation
    vision_cfg["timm_model_pretrained"] = False
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    torch.manual_seed(0)  # every tensor is overwritten by the strict load below
    visual = _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu, None)
    report = _load_tower(visual, weights, size != native)
    if size != native and timm_tower:
        visual.set_input_size(size)  # what open_clip does for force_image_size
        report["format"] += ", input size set by timm's set_input_size"
    pre, notes = _preprocessing(pp, native)
    if opt.image_size:
        pre = pre.with_size(opt.image_size)
    if notes:
        report["preprocessing_notes"] = notes
    model = OpenClipImageTower(visual)
    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "family": "openclip",
        "file": weights.name,
        **report,
        "architecture": {
            "type": "open_clip image tower",
            "class": type(visual).__name__,
            "vision_cfg": model_cfg["vision_cfg"],
            "embed_dim": model_cfg["embed_dim"],
            "quick_gelu": quick_gelu,
            "parameters": int(n_params),
            "library": f"open_clip {open_clip.__version__}",
            "from": config_from,
        },
        "feature_kind_from": "the image embedding (encode_image), as CLIP and SigLIP evaluate",
    }
    return Backbone(
        name,
        model,
        pre,
        opt.feature_kind or "model",
        WeightsInfo("file", sha256_file(weights), str(weights)),
        report,
        f"open_clip {type(visual).__name__} image tower",
    )


def _weights_source(arch: str, tag: str, repo: str) -> WeightsSource:
    stem = f"{arch.replace('/', '-')}.{tag}"
    return WeightsSource(
        filenames=(f"{stem}.safetensors", f"{stem}.bin"),
        hf_repo=repo or None,
        hf_filenames=FILES[:1] + FILES[2:3],
        how=f"The Hugging Face CLI fetches it: `hf download {repo} {FILES[0]}`" if repo else "",
    )


def _arch_tag(name: str, rest: str, opt: BuildOptions) -> Backbone:
    arch, _, tag = rest.rpartition("/")
    open_clip = require_open_clip()
    if not arch or open_clip.get_model_config(rest.replace("/", "-")) is not None:
        arch, tag = rest, ""  # openclip:ARCH (or ViT-B/16 spelled with its slash)
    model_cfg, pp, repo = tag_config(arch, tag or None)
    if tag:
        path = _weights_source(arch, tag, repo).resolve(opt.weights, opt.offline)
    elif opt.weights is None:
        tags = open_clip.list_pretrained_tags_by_model(arch.replace("/", "-"))
        raise UserError(f"{name} names no weights: add a tag (one of {tags}) or --weights FILE")
    else:
        path = Path(opt.weights).expanduser()
        if not path.is_file():
            raise UserError(f"--weights {path}: no such file")
    how = f"open_clip's built-in config {arch.replace('/', '-')}"
    return build_openclip(name, model_cfg, pp, path, opt, how + (f" and tag {tag}" if tag else ""))


def _folder(name: str, folder: Path, opt: BuildOptions) -> Backbone:
    require_open_clip()
    if not folder.is_dir():
        raise UserError(f"{name}: no such folder {folder}")
    config = folder / CONFIG
    if not config.is_file():
        raise UserError(f"{name}: {folder} has no {CONFIG} (open_clip's published layout)")
    model_cfg, pp = _read_folder_config(config, name)
    if opt.weights is not None:
        path = Path(opt.weights).expanduser()
        if not path.is_file():
            raise UserError(f"--weights {path}: no such file")
    else:
        path = next((folder / f for f in FILES if (folder / f).is_file()), None)
        if path is None:
            raise UserError(f"{name}: {folder} holds none of {list(FILES)}")
    return build_openclip(name, model_cfg, pp, path, opt, f"{CONFIG} in {folder}")


def _hub(name: str, repo: str, opt: BuildOptions) -> Backbone:
    require_open_clip()
    if repo.count("/") != 1:
        raise UserError(f"{name}: expected openclip:hf-hub:ORG/NAME")
    model_cfg, pp = _read_folder_config(_hub_file(repo, CONFIG, opt), name)
    if opt.weights is not None:
        path = WeightsSource(()).resolve(opt.weights, True)
    else:
        src = WeightsSource((), hf_repo=repo, hf_filenames=FILES[:1] + FILES[2:3])
        path = src.find_local()
        if path is None:
            path = _hub_file(repo, FILES[0], opt)
    return build_openclip(name, model_cfg, pp, path, opt, f"{CONFIG} of hf-hub:{repo}")


def _is_path(rest: str) -> bool:
    return rest.startswith(("/", ".", "~")) or Path(rest).expanduser().is_dir()


def _spec(rest: str) -> BackboneSpec:
    name = f"openclip:{rest}"
    if rest.startswith("hf-hub:"):
        repo = rest[len("hf-hub:") :]
        return BackboneSpec(
            name,
            lambda opt: _hub(name, repo, opt),
            lambda: WeightsSource((), hf_repo=repo, hf_filenames=FILES[:1]).status(),
            f"open_clip model {repo} from the Hugging Face hub",
        )
    if _is_path(rest):
        folder = Path(rest).expanduser()
        return BackboneSpec(
            name,
            lambda opt: _folder(name, folder, opt),
            lambda: f"present ({folder})" if (folder / CONFIG).is_file() else f"missing ({folder})",
            f"open_clip model in {folder}",
        )
    return BackboneSpec(
        name,
        lambda opt: _arch_tag(name, rest, opt),
        lambda: "resolved when built (tag weights: HF cache or --weights)",
        f"open_clip {rest}",
    )


def _named(tag_name: str, arch: str, tag: str, description: str) -> None:
    def build(opt: BuildOptions) -> Backbone:
        bb = _arch_tag(tag_name, f"{arch}/{tag}", opt)
        bb.load_report["tag"] = f"openclip:{arch}/{tag}"
        return bb

    repo = f"timm/{arch}" if "SigLIP" in arch else ""

    def status() -> str:
        try:
            _, _, found = tag_config(arch, tag)
        except UserError:  # open_clip not installed: say so without failing the listing
            return f"needs {EXTRA}"
        return _weights_source(arch, tag, found or repo).status()

    BACKBONES.register(tag_name, BackboneSpec(tag_name, build, status, description))


for _tag, (_arch, _t, _desc) in NAMED.items():
    _named(_tag, _arch, _t, _desc)

BACKBONES.register_prefix(
    "openclip",
    _spec,
    "openclip:ARCH/TAG (open_clip's name and pretrained tag), openclip:hf-hub:ORG/NAME or "
    "openclip:/dir (open_clip's published layout): a CLIP/SigLIP image tower, needs "
    '"ssleval-bench[clip]"',
)
