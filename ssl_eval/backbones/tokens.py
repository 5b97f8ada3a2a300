"""Token-level outputs of a backbone: the last block's tokens, and its patch tokens as a grid.

Every model ssl-eval builds exposes ``forward_features``: a (N, C, H, W) map for CNNs, or a
(N, L, D) token sequence for transformers whose first ``num_prefix_tokens`` are the class and
register tokens (timm ViTs, the official families, the Hugging Face and open_clip towers). The
dense probes and the attentive probes read patch tokens through :func:`patch_grid` and nothing
else, so a family that builds its model differently adapts ``forward_features``, not them. The
multi-layer kinds read the last blocks through :class:`LastBlocks` in the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..core.errors import UserError


def has_tokens(model: nn.Module) -> bool:
    """Whether ``model`` gives token-level outputs (``forward_features``) at all."""
    return hasattr(model, "forward_features")


def forward_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's ``forward_features`` (the last block, after its final norm)."""
    if not has_tokens(model):
        raise UserError(
            f"{type(model).__name__} gives only its pooled output (no forward_features): "
            "token features need a ViT or a CNN backbone"
        )
    out = model.forward_features(x)
    if isinstance(out, dict):  # some timm models return dicts
        out = out.get("x", next(iter(out.values())))
    return out


def num_prefix_tokens(model: nn.Module) -> int:
    """Class and register tokens in front of the patch tokens (1 when the model does not say)."""
    return int(getattr(model, "num_prefix_tokens", 1))


def grid_shape(num_patches: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) patch grid of ``num_patches`` tokens for an input of ``height`` x ``width``:
    the factorisation whose aspect matches the input's. Refused when none does (tokens that are
    not one grid, e.g. a model that pools or drops patches)."""
    h = max(1, round(math.sqrt(num_patches * height / width)))
    for cand in (h, h - 1, h + 1):
        if cand > 0 and num_patches % cand == 0:
            w = num_patches // cand
            if abs(cand / w - height / width) <= 0.5 * height / width:
                return cand, w
    raise UserError(
        f"{num_patches} patch tokens do not form a grid for a {height}x{width} input: "
        "this model does not give one token per patch"
    )


@dataclass
class PatchGrid:
    """``tokens``: (N, h, w, D) patch tokens (CNN: the last stage's map, channels last);
    ``prefix``: (N, P, D) class and register tokens, None for a CNN or a model without them."""

    tokens: torch.Tensor
    prefix: torch.Tensor | None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.tokens.shape[1]), int(self.tokens.shape[2])

    def sequence(self) -> torch.Tensor:
        """(N, h*w, D): the patch tokens in raster order."""
        n, h, w, d = self.tokens.shape
        return self.tokens.reshape(n, h * w, d)


def patch_grid(model: nn.Module, x: torch.Tensor) -> PatchGrid:
    """``x`` (N, 3, H, W) preprocessed -> the last block's patch tokens as a grid."""
    out = forward_tokens(model, x)
    if out.ndim == 4:  # CNN: N C H W
        return PatchGrid(out.permute(0, 2, 3, 1), None)
    if out.ndim != 3:
        raise UserError(
            f"{type(model).__name__}'s features have shape {tuple(out.shape)}: patch tokens need "
            "a ViT (N, L, D) or a CNN feature map (N, C, H, W)"
        )
    prefix = num_prefix_tokens(model)
    patches = out[:, prefix:]
    h, w = grid_shape(patches.shape[1], x.shape[-2], x.shape[-1])
    return PatchGrid(
        patches.reshape(out.shape[0], h, w, out.shape[-1]), out[:, :prefix] if prefix else None
    )


# ---------------------------------------------------------------- the last blocks


class LastBlocks(Protocol):
    """What the multi-layer feature kinds (``layers:N``, ``last:N``) read of a model: the class
    and register tokens and the patch tokens of each of its last blocks, after its final norm,
    as DINOv2's and DINOv3's ``get_intermediate_layers(n, return_class_token=True)`` give them.

    ``block_count()`` is the depth; a model whose blocks carry no class token refuses there
    with one line naming the kinds it does give. ``last_blocks(x, n)`` is
    ``[(patch tokens (N, L, D), prefix tokens (N, P, D))]`` for the last ``n`` blocks, oldest
    first. timm ViTs give it through :class:`TimmBlocks`; the Hugging Face and open_clip towers
    (``families/hf.py``, ``families/openclip.py``) implement it themselves, each from its
    library's own intermediate outputs and final norm."""

    def block_count(self) -> int: ...

    def last_blocks(self, x: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]: ...


class TimmBlocks:
    """A timm ViT's ``forward_intermediates`` (``norm=True``: its final norm on every block)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def block_count(self) -> int:
        return len(self.model.blocks)

    def last_blocks(self, x: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.model.forward_intermediates(
            x,
            indices=n,
            return_prefix_tokens=True,
            norm=True,
            intermediates_only=True,
            output_fmt="NLC",
        )


def block_reader(model: nn.Module) -> LastBlocks | None:
    """The model's own :class:`LastBlocks` (a tower that implements it), a timm ViT with a class
    token read through :class:`TimmBlocks`, or None (a CNN, a model without blocks)."""
    if hasattr(model, "last_blocks") and hasattr(model, "block_count"):
        return model
    if (
        hasattr(model, "forward_intermediates")
        and getattr(model, "blocks", None) is not None
        and getattr(model, "num_prefix_tokens", 0) >= 1
    ):
        return TimmBlocks(model)
    return None
