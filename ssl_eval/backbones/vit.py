"""Shared pieces of the ViT families: reading a ViT's shape from its keys, creating the timm
model that matches, resampling position embeddings, and the strict load.

The official DINO, MoCo v3, MAE and DINOv2 ViTs all use timm's ``VisionTransformer`` key names
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,
norm2,mlp.fc1,mlp.fc2}``, ``norm``); the families differ in containers, prefixes, extra keys
and head counts, which each family file handles before calling :func:`load_vit`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from .checkpoints import strict_load, uninitialised

# Heads per width in the original ViT/DeiT sizes; MoCo v3's ViT-S is the exception (12).
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
    regs = next((v.shape[1] for k, v in sd.items()
                 if k in ("reg_token", "register_tokens", "storage_tokens")), 0)
    return ViTShape(embed, len(block_indices(sd)), patch, hidden, regs)


def vit_kwargs(shape: ViTShape, heads: dict[int, int] = HEADS) -> dict:
    """timm keyword arguments for a ViT of this shape (heads from the family's table)."""
    if shape.embed_dim not in heads:
        raise UserError(
            f"cannot tell the head count of a ViT {shape.embed_dim} wide; use a tagged backbone"
        )
    return {
        "embed_dim": shape.embed_dim, "depth": shape.depth, "patch_size": shape.patch,
        "num_heads": heads[shape.embed_dim],
        # timm computes int(dim * ratio): a half step above keeps that exact
        "mlp_ratio": (shape.mlp_hidden + 0.5) / shape.embed_dim,
    }


def create_timm(arch: str, img_size: int | None = None, **kw) -> nn.Module:
    """A timm model without a classifier and without its random initialisation (every tensor
    is then loaded strictly), which saves seconds for the big ones."""
    import timm

    kw = {"num_classes": 0, **kw}
    if img_size:
        kw["img_size"] = img_size
    return uninitialised(lambda: timm.create_model(arch.split(".")[0], pretrained=False, **kw))



def resample_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resize a checkpoint's absolute position embedding to the model's patch grid
    (e.g. DINOv2's 518-pixel 37x37 grid to 224 pixels' 16x16)."""
    from timm.layers import resample_abs_pos_embed

    pe, own = sd.get("pos_embed"), getattr(model, "pos_embed", None)
    if pe is None or own is None or pe.shape == own.shape:
        return sd
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    old = math.isqrt(pe.shape[1] - prefix)
    if old * old != pe.shape[1] - prefix:
        raise UserError(f"position embedding of {pe.shape[1]} tokens is not a square grid")
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(
        pe, new_size=list(model.patch_embed.grid_size), old_size=[old, old],
        num_prefix_tokens=prefix, interpolation="bicubic", antialias=True, verbose=False,
    )
    return out


def split_keys(sd: dict[str, torch.Tensor], *patterns: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(keys not matching any pattern, names of those that do) for keys dropped on purpose."""
    regs = [re.compile(p) for p in patterns]
    dropped = [k for k in sd if any(r.match(k) for r in regs)]
    return {k: v for k, v in sd.items() if k not in set(dropped)}, dropped


def load_vit(model: nn.Module, sd: dict[str, torch.Tensor], fmt: str) -> dict:
    """Strict load of a timm-named state dict (position embedding resampled when needed)."""
    return strict_load(model, resample_pos_embed(sd, model), fmt=fmt)
