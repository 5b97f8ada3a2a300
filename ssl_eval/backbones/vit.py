"""Shared pieces of the ViT families: reading a ViT's shape from its keys, creating the timm
model that matches, resampling position embeddings, and the strict load.

The official DINO, MoCo v3, MAE and DINOv2 ViTs all use timm's ``VisionTransformer`` key names
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}``, ``norm``); the families differ in containers, prefixes, extra keys,
head counts (:class:`ViTArch`, chosen as ``architecture.py`` says) and in how they resize a
position embedding (:class:`PosEmbedResize`), which each family passes to :func:`load_vit`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from .checkpoints import strict_load, uninitialised

# Heads per width in the original ViT/DeiT sizes (timm's definitions). Each family has its own
# table (MoCo v3's ViT-S has 12 heads); this one stands for "a DeiT/timm ViT of that width".
HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1536: 24}


@dataclass(frozen=True)
class ViTShape:
    embed_dim: int
    depth: int
    patch: int
    mlp_hidden: int  # width of the first MLP matrix (packed SwiGLU: both halves)
    registers: int = 0


def block_indices(sd: dict[str, torch.Tensor]) -> list[int]:
    return sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def vit_shape(sd: dict[str, torch.Tensor], mlp_key: str = "mlp.fc1.weight") -> ViTShape:
    """Width, depth, patch size, MLP width and register count from timm-style keys."""
    try:
        embed = sd["patch_embed.proj.weight"].shape[0]
        patch = sd["patch_embed.proj.weight"].shape[-1]
        hidden = sd[f"blocks.0.{mlp_key}"].shape[0]
    except KeyError as e:
        raise UserError(f"the checkpoint holds no ViT I can read ({e.args[0]} is missing)") from e
    regs = next(
        (
            v.shape[1]
            for k, v in sd.items()
            if k in ("reg_token", "register_tokens", "storage_tokens")
        ),
        0,
    )
    return ViTShape(embed, len(block_indices(sd)), patch, hidden, regs)


@dataclass(frozen=True)
class ViTArch:
    """A plain ViT as its authors' code defines it, created as timm model ``timm`` (whose
    class and defaults: qkv bias, LayerNorm eps 1e-6, class token) with these dimensions.
    ``None`` leaves a dimension to the file's keys (DINO's ``vit_small`` takes any patch
    size); ``mlp_hidden`` None is timm's ratio 4."""

    timm: str
    width: int
    heads: int
    depth: int | None = None
    patch: int | None = None
    mlp_hidden: int | None = None
    where: str = field(default="", compare=False)  # e.g. "moco-v3 vits.py vit_small"

    def filled(self, shape: ViTShape) -> ViTArch:
        """Dimensions left open taken from the file's keys."""
        return replace(self, depth=self.depth or shape.depth, patch=self.patch or shape.patch)

    def kwargs(self) -> dict:
        kw = {"embed_dim": self.width, "num_heads": self.heads}
        if self.depth is not None:
            kw["depth"] = self.depth
        if self.patch is not None:
            kw["patch_size"] = self.patch
        if self.mlp_hidden is not None:  # timm computes int(dim * ratio): a half step above
            kw["mlp_ratio"] = (self.mlp_hidden + 0.5) / self.width
        return kw


def from_shape(
    shape: ViTShape, heads: int, where: str, timm: str = "vit_base_patch16_224"
) -> ViTArch:
    """The ViT the keys show (depth, width, patch, MLP), with the family's head count."""
    return ViTArch(timm, shape.embed_dim, heads, shape.depth, shape.patch, shape.mlp_hidden, where)


def create_timm(arch: str, img_size: int | None = None, **kw) -> nn.Module:
    """A timm model without a classifier and without its random initialisation (every tensor
    is then loaded strictly), which saves seconds for the big ones."""
    import timm

    kw = {"num_classes": 0, **kw}
    if img_size:
        kw["img_size"] = img_size
    return uninitialised(lambda: timm.create_model(arch.split(".")[0], pretrained=False, **kw))


# ---------------------------------------------------------------- position embeddings
#
# Each family resizes an absolute position embedding to another patch grid the way its own
# code does at evaluation time; the recipes differ enough to change features (antialiasing
# when shrinking DINOv2's 37x37 grid to 16x16 changes them at the 1e-1 level).


@dataclass(frozen=True)
class PosEmbedResize:
    """How a family's code maps a position table of ``old`` x ``old`` patches to ``new``:
    ``resize(tokens (1, old*old, D), old, new) -> (1, new_h*new_w, D)``."""

    how: str
    resize: Callable[[torch.Tensor, int, tuple[int, int]], torch.Tensor]


def _grid(tokens: torch.Tensor, old: int) -> torch.Tensor:
    return tokens.reshape(1, old, old, tokens.shape[-1]).permute(0, 3, 1, 2)


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])


def bicubic_with_offset(offset: float, who: str) -> PosEmbedResize:
    """DINO's and DINOv2's ``interpolate_pos_encoding``: bicubic by a scale factor of
    (new + offset) / old per side (their work-around for a floating-point rounding of the
    output size), no antialiasing, float32."""

    def resize(tokens: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
        scale = (float(new[0] + offset) / old, float(new[1] + offset) / old)
        out = F.interpolate(
            _grid(tokens.float(), old), scale_factor=scale, mode="bicubic", antialias=False
        )
        if tuple(out.shape[-2:]) != tuple(new):
            raise UserError(
                f"resizing the position embedding {old}x{old} -> {new} gave {out.shape[-2:]}"
            )
        return _tokens(out)

    return PosEmbedResize(
        f"bicubic, scale factor (new + {offset}) / old, no antialiasing ({who})", resize
    )


def bicubic_to_size(who: str) -> PosEmbedResize:
    """MAE's ``interpolate_pos_embed`` (from DeiT): bicubic to the new size,
    align_corners=False, no antialiasing, at load time."""

    def resize(tokens: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
        out = F.interpolate(
            _grid(tokens.float(), old), size=tuple(new), mode="bicubic", align_corners=False
        )
        return _tokens(out)

    return PosEmbedResize(
        f"bicubic to the new size, align_corners=False, no antialiasing ({who})", resize
    )


def mocov3_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos table for a ``grid`` x ``grid`` patch grid, (1, grid*grid,
    dim), class-token row excluded (vits.py ``build_2d_sincos_position_embedding``): per
    token, sin and cos of its first grid coordinate times the frequencies, then of the
    second; frequencies 1 / temperature^(k / (dim/4))."""
    if dim % 4:
        raise UserError(f"MoCo v3's sin-cos position table needs a width divisible by 4, not {dim}")
    coords = torch.arange(grid, dtype=torch.float32)
    first, second = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    a = first.flatten()[:, None] * omega[None, :]
    b = second.flatten()[:, None] * omega[None, :]
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)[None]


def _rebuild_sincos(tokens: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
    dim = tokens.shape[-1]
    if new[0] != new[1]:
        raise UserError(f"MoCo v3's sin-cos position table is built for square grids, not {new}")
    diff = (tokens.float() - mocov3_sincos(old, dim)).abs().max().item()
    if diff > 1e-4:
        raise UserError(
            f"MoCo v3 rebuilds its fixed sin-cos position embedding for another input size, but "
            f"this file's pos_embed is not that table (max difference {diff:.3g}); evaluate it at "
            "the size it was saved for (--image-size)"
        )
    return mocov3_sincos(new[0], dim)


MOCOV3_SINCOS = PosEmbedResize(
    "fixed 2-D sin-cos table rebuilt for the new grid (MoCo v3 vits.py)", _rebuild_sincos
)


def resize_pos_embed(
    sd: dict[str, torch.Tensor], model: nn.Module, rule: PosEmbedResize
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The checkpoint with its position embedding fitted to the model's patch grid by the
    family's ``rule``, and what was done (None when the model has no absolute table)."""
    pe, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pe is None or own is None or pe.ndim != 3 or pe.shape[-1] != own.shape[-1]:
        return sd, None  # no table, or another width: the strict load names the mismatch
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old = math.isqrt(pe.shape[1] - prefix)
    if old * old != pe.shape[1] - prefix:
        raise UserError(f"position embedding of {pe.shape[1]} tokens is not a square grid")
    new = tuple(int(g) for g in model.patch_embed.grid_size)
    info = {"file_grid": [old, old], "model_grid": list(new)}
    if pe.shape[1] == own.shape[1]:
        return sd, {**info, "resized": False}
    patch = rule.resize(pe[:, prefix:], old, new).to(pe.dtype)
    out = dict(sd)
    out["pos_embed"] = torch.cat([pe[:, :prefix], patch], dim=1)
    return out, {**info, "resized": rule.how}


def split_keys(
    sd: dict[str, torch.Tensor], *patterns: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(keys not matching any pattern, names of those that do) for keys dropped on purpose."""
    regs = [re.compile(p) for p in patterns]
    dropped = [k for k in sd if any(r.match(k) for r in regs)]
    return {k: v for k, v in sd.items() if k not in set(dropped)}, dropped


def load_vit(model: nn.Module, sd: dict[str, torch.Tensor], fmt: str, rule: PosEmbedResize) -> dict:
    """Strict load of a timm-named state dict, the position embedding fitted to the model's
    grid by the family's own ``rule``; the report says whether and how it was resized."""
    sd, pos = resize_pos_embed(sd, model, rule)
    report = strict_load(model, sd, fmt=fmt)
    if pos is not None:
        report["pos_embed"] = pos
    return report


# ---------------------------------------------------------------- inputs of any size
#
# DINO's and DINOv2's ViTs resize their position table in every forward pass
# (``interpolate_pos_encoding``), so the official models take any input whose sides are
# multiples of the patch, square or not. ``follow_input_size`` gives a timm ViT built at one
# size the same behaviour: at its built grid it adds the table loaded for that grid (resized
# once at load, as before); at any other grid it resizes the file's own table by the family's
# rule, as the official forward does, and at the file's own grid uses that table untouched.


def follow_input_size(
    model: nn.Module, file_table: torch.Tensor, rule: PosEmbedResize, report: dict
) -> None:
    """Let ``model`` (a timm ViT created with ``dynamic_img_size=True``) take inputs of any
    patch multiple, its position table resized per input by ``rule`` from ``file_table`` (the
    checkpoint's, timm-named: (1, [prefix +] old*old, D)), and say so in the load ``report``'s
    ``pos_embed``. The table is held as a non-persistent buffer (moved with the model, never in
    its state dict)."""
    if not getattr(model, "dynamic_img_size", False) or getattr(model, "pos_embed", None) is None:
        raise ValueError("follow_input_size needs a timm ViT built with dynamic_img_size=True")
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    old = math.isqrt(file_table.shape[1] - prefix)
    model.register_buffer("file_pos_embed", file_table.detach().clone(), persistent=False)
    model.pos_embed_rule = (rule, old, prefix)
    model._pos_embed = _pos_embed_by_rule.__get__(model)
    report.setdefault("pos_embed", {})["other_grids"] = (
        f"resized in each forward from the file's {old}x{old} table: {rule.how}"
    )


def _table_for(model: nn.Module, h: int, w: int) -> torch.Tensor:
    """The position table an input of an h x w patch grid gets."""
    rule, old, prefix = model.pos_embed_rule
    if (h, w) == tuple(model.patch_embed.grid_size):
        return model.pos_embed
    if torch.is_grad_enabled() and model.pos_embed.requires_grad:
        raise UserError(
            f"a ViT being trained takes its built {model.patch_embed.grid_size} patch grid only "
            f"(here {h}x{w}): its position table is being trained at that grid"
        )
    table = model.file_pos_embed
    if (h, w) != (old, old):
        patch = rule.resize(table[:, prefix:], old, (h, w))
        table = torch.cat([table[:, :prefix].float(), patch], dim=1)
    return table.to(model.pos_embed.dtype)


def _pos_embed_by_rule(self, x: torch.Tensor) -> torch.Tensor:
    """timm's ``VisionTransformer._pos_embed`` for an (N, h, w, D) patch grid, its table from
    ``_table_for`` (the family's resize) instead of timm's own resampling."""
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    pos = _table_for(self, h, w)
    extra = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:
        x = x + pos
        if extra:
            x = torch.cat(extra + [x], dim=1)
    else:
        if extra:
            x = torch.cat(extra + [x], dim=1)
        x = x + pos
    return self.pos_drop(x)
