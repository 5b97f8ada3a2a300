"""A Backbone: a model in eval mode, its preprocessing, how features are read from it, and
where its weights came from."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.errors import UserError
from ..core.registry import Registry
from ..data.transforms import Preprocessing
from .tokens import (
    PatchGrid,
    block_reader,
    forward_tokens,
    has_tokens,
    num_prefix_tokens,
    patch_grid,
)

# ---------------------------------------------------------------- feature kinds


def _patch_mean(model: nn.Module, out: torch.Tensor) -> torch.Tensor:
    if out.ndim == 4:  # CNN: N C H W
        return out.mean(dim=(2, 3))
    return out[:, num_prefix_tokens(model) :].mean(dim=1)


def _cls(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = forward_tokens(model, x)
    if out.ndim != 3:
        raise UserError("feature kind 'cls' needs a transformer with a class token; use 'avgpool'")
    return out[:, 0]


def _avgpool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _patch_mean(model, forward_tokens(model, x))


def _cls_avgpool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = forward_tokens(model, x)
    if out.ndim != 3:
        raise UserError("feature kind 'cls+avgpool' needs a transformer; use 'avgpool'")
    return torch.cat([out[:, 0], _patch_mean(model, out)], dim=1)


def _normed_last_blocks(model: nn.Module, x: torch.Tensor, n: int, kind: str) -> list:
    """[(patch tokens, prefix tokens)] of the last ``n`` blocks, oldest first, each through
    the final norm: the model's :class:`~.tokens.LastBlocks` (timm's ``forward_intermediates``,
    or a Hugging Face or open_clip tower's own). Refused in one line for a model without
    blocks, without a class token, or with fewer than ``n`` blocks."""
    reader = block_reader(model)
    if reader is None:
        # the kinds this model gives: a CNN's map has no class token, a plain module no tokens
        kinds = "model, cls, avgpool or cls+avgpool"
        if not has_tokens(model):
            kinds = "model"
        elif forward_tokens(model, x[:1]).ndim == 4:
            kinds = "model or avgpool"
        raise UserError(
            f"feature kind '{kind}' reads the class token and mean patch token of a ViT's last "
            "blocks (a timm ViT, or a Hugging Face or open_clip tower with a class token); a "
            f"{type(model).__name__} has no such blocks: use a single-layer card (linear, knn) "
            f"with feature kind {kinds}"
        )
    depth = reader.block_count()  # a tower without a class token refuses here
    if n > depth:
        raise UserError(
            f"feature kind '{kind}' asks for the last {n} blocks, but this "
            f"{type(model).__name__} has {depth}; ask for at most {depth} "
            "(a card's n_last_blocks, or --feature-kind layers:N)"
        )
    return reader.last_blocks(x, n)


def _last_blocks(n: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Class tokens of the last ``n`` blocks (normed) and the mean patch token of the last
    block, concatenated: DINOv2's linear-evaluation features."""

    def read(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        inter = _normed_last_blocks(model, x, n, f"last:{n}")
        cls = [prefix[:, 0] for _, prefix in inter]
        return torch.cat(cls + [inter[-1][0].mean(dim=1)], dim=1)

    return read


def _per_block(n: int) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """For each of the last ``n`` blocks, oldest first: its class token and the mean of its
    patch tokens (registers left out), both after the final norm, as DINOv2's and DINOv3's
    ``get_intermediate_layers(n, return_class_token=True)`` give them: a row of 2 x n x D
    values, ``[cls, patch mean]`` per block (``features/layers.py`` names the columns)."""

    def read(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for patches, prefix in _normed_last_blocks(model, x, n, f"layers:{n}"):
            parts += [prefix[:, 0], patches.mean(dim=1)]
        return torch.cat(parts, dim=1)

    return read


def _model_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.flatten(1)


FEATURE_KINDS: Registry[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = Registry(
    "feature kind"
)
FEATURE_KINDS.register("model", _model_output, "the model's own output (its pooled embedding)")
FEATURE_KINDS.register("cls", _cls, "class token after the final norm")
FEATURE_KINDS.register("avgpool", _avgpool, "mean of patch tokens / spatial positions")
FEATURE_KINDS.register("cls+avgpool", _cls_avgpool, "class token and mean patch token")


def _last_factory(n: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    if not n.isdigit() or int(n) < 1:
        raise UserError(f"feature kind 'last:{n}' needs a positive block count, e.g. 'last:4'")
    return _last_blocks(int(n))


FEATURE_KINDS.register_prefix(
    "last", _last_factory, "last:N: class tokens of the last N blocks + mean patch token"
)


def _layers_factory(n: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    if not n.isdigit() or int(n) < 1:
        raise UserError(f"feature kind 'layers:{n}' needs a positive block count, e.g. 'layers:4'")
    return _per_block(int(n))


FEATURE_KINDS.register_prefix(
    "layers",
    _layers_factory,
    "layers:N: class token and mean patch token of each of the last N blocks (normed)",
)


# ---------------------------------------------------------------- backbone


@dataclass
class WeightsInfo:
    """Provenance of the parameters: a file (with its sha256) or a seeded initialisation."""

    source: str  # "file", "random-init", "none", "plugin"
    sha256: str
    path: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "path": self.path}


@dataclass
class Backbone:
    tag: str
    model: nn.Module
    preprocessing: Preprocessing
    feature_kind: str = "model"
    weights: WeightsInfo | None = None
    load_report: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        self._read = FEATURE_KINDS.get(self.feature_kind)
        self.model.eval()
        if self.weights is None:
            self.weights = WeightsInfo("plugin", state_dict_sha256(self.model))

    def built(self) -> dict:
        """The family read and the architecture actually built (who pinned it is provenance,
        left out): two readings of one file are two backbones for every cache and skip key."""
        arch = self.load_report.get("architecture") or {}
        return {
            "family": self.load_report.get("family"),
            "architecture": {k: v for k, v in arch.items() if k != "from"},
        }

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed float batch -> (N, D) features. Always eval mode (BatchNorm and
        dropout frozen), whatever a caller did to the module in between."""
        if self.model.training:
            self.model.eval()
        return self._read(self.model, x).float()

    @torch.inference_mode()
    def patch_grid(self, x: torch.Tensor) -> PatchGrid:
        """Preprocessed float batch -> the last block's patch tokens as an (N, h, w, D) grid
        (and the class/register tokens), eval mode, float32."""
        if self.model.training:
            self.model.eval()
        g = patch_grid(self.model, x)
        return PatchGrid(g.tokens.float(), None if g.prefix is None else g.prefix.float())

    def embed_dim(self) -> int:
        size = self.preprocessing.crop or 32
        p = next(self.model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        return self.embed(torch.zeros(1, 3, size, size, device=device)).shape[1]


def state_dict_sha256(model: nn.Module) -> str:
    """A content hash of a module's parameters and buffers, for weights not read from a file."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class BuildOptions:
    """What a user may say about a backbone when building it."""

    weights: Path | None = None
    image_size: int | None = None
    feature_kind: str | None = None
    offline: bool = False
    seed: int = 0  # initialisation seed of random:<arch>
    family: str | None = None  # checkpoint family override for ckpt:PATH (auto-detected if None)
    # the architecture of a ckpt:PATH file in its authors' own name (MoCo v3 'vit_small', MAE
    # 'vit_base_patch16', DINO 'vit_small'), for what the file does not declare itself; it
    # must agree with what the file does declare. Refused with tags (they fix their own).
    arch: str | None = None
    allow_incomplete: bool = False  # ckpt:DIR of an unfinished `ssl-eval train` run (recorded)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: ``build(options)`` returns a ready Backbone; ``status()`` tells
    whether its weights are present, downloadable or missing, without building it."""

    name: str
    build: Callable[[BuildOptions], Backbone]
    status: Callable[[], str]
    description: str = ""
