"""Which architecture a checkpoint is built as, and a description of what was built.

A file's tensors pin some dimensions (a ViT's depth, width, patch size, MLP width and
registers; a ResNet's blocks and widths) and not others: a ViT's head count is invisible in
its weights (MoCo v3's ViT-S has 12 heads, DeiT's and DINO's 6, with identical tensors).
So the architecture comes from, in this order: the tag; what the file declares about itself
(MoCo v3's ``arch`` entry, MAE's ``args.model``, DINO's ``args.arch``); ``--arch``. All that
are present must agree. When none is, the family reads the visible dimensions from the keys
and takes the invisible ones from its own code, which each family does only where its code
defines exactly one architecture for what the keys show; otherwise it refuses.

Names are the authors' own: what their training script's ``--arch`` (or ``--model``) takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from torch import nn

from ..core.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Pick(Generic[T]):
    """An architecture, its authors' name and who named it."""

    spec: T
    name: str
    source: str  # "the tag", "the file's 'arch' entry", "--arch"


def check_kind(
    pick: Pick | None, holds_vit: bool, vit_spec: type, file: str, variant: str | None
) -> None:
    """A named architecture and the file agree on being a ViT or a ResNet, else a UserError."""
    if pick is None or holds_vit == isinstance(pick.spec, vit_spec):
        return
    held = "a ViT" if holds_vit else "a ResNet"
    if pick.source == "the tag":
        raise UserError(f"{file} holds {held}, not the {variant} this tag expects")
    raise UserError(f"{file} holds {held}, but {pick.source} says {pick.name!r}")


def compatible(a: object, b: object) -> bool:
    """Same architecture; a dataclass field that one of them leaves ``None`` matches anything
    (DINO's ``vit_small`` takes any patch size)."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b) and type(a) is type(b):
        for f in dataclasses.fields(a):
            if not f.compare:
                continue
            x, y = getattr(a, f.name), getattr(b, f.name)
            if x is not None and y is not None and x != y:
                return False
        return True
    return a == b


def agree(file: str, picks: list[Pick]) -> Pick | None:
    """The first pick, after checking that every other one names the same architecture."""
    for p in picks[1:]:
        if not compatible(picks[0].spec, p.spec):
            first = picks[0]
            fix = (
                "drop --arch"
                if p.source == "--arch" and first.source != "the tag"
                else "use the tag that matches the file, or read it as ckpt:PATH"
            )
            raise UserError(
                f"{file}: {first.source} says {first.name!r} but {p.source} says {p.name!r}; "
                f"they must agree ({fix})"
            )
    return picks[0] if picks else None


@dataclass(frozen=True)
class ArchTable(Generic[T]):
    """A family's architectures by their authors' names. ``aliases`` are other spellings of
    them (a tag's timm name, MAE's pre-training names), as a name or as the architecture
    itself; ``refused`` names architectures the family's code has but ssl-eval cannot build,
    with the reason."""

    family: str
    names: Mapping[str, T]
    aliases: Mapping[str, str | T] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)

    def pick(self, name: str, source: str, file: str) -> Pick[T]:
        key = self.aliases.get(name, name)
        if not isinstance(key, str):
            return Pick(key, name, source)
        if key in self.refused:
            raise UserError(f"{file}: {source} says {name!r}: {self.refused[key]}")
        if key not in self.names:
            hint = (
                f" (the file is read as {self.family}; --family reads it as another)"
                if source == "--arch"
                else ""
            )
            raise UserError(
                f"{file}: {source} says {name!r}, which is not a {self.family} architecture "
                f"ssl-eval reads; the {self.family} ones are: {', '.join(self.names)}{hint}"
            )
        return Pick(self.names[key], key, source)

    def choose(
        self,
        file: str,
        *,
        variant: str | None = None,
        declared: tuple[object, str] | None = None,
        flag: str | None = None,
    ) -> Pick[T] | None:
        """What the tag (``variant``), the file (``declared``: its value and where it says
        so) and ``--arch`` (``flag``) name, checked to agree; None when none names one."""
        picks = []
        if variant:
            picks.append(self.pick(variant, "the tag", file))
        if declared is not None and isinstance(declared[0], str) and declared[0]:
            picks.append(self.pick(declared[0], declared[1], file))
        if flag:
            picks.append(self.pick(flag, "--arch", file))
        return agree(file, picks)


# ---------------------------------------------------------------- what was built


def _vit(model: nn.Module) -> dict:
    blk = model.blocks[0]
    mlp = blk.mlp
    first = next((getattr(mlp, n) for n in ("fc1", "fc1_g", "w12") if hasattr(mlp, n)), None)
    patch = model.patch_embed.patch_size
    regs = getattr(model, "num_reg_tokens", None)
    if regs is None:
        reg = getattr(model, "reg_token", None)
        regs = 0 if reg is None else int(reg.shape[1])
    if getattr(model, "rope", None) is not None:
        position = "rope"
    elif getattr(model, "pos_embed", None) is not None:
        position = "absolute"
    else:
        position = "none"
    layer_scale = (
        any(not isinstance(getattr(blk, n, nn.Identity()), nn.Identity) for n in ("ls1",))
        or getattr(blk, "gamma_1", None) is not None
    )
    return {
        "type": "vit",
        "class": type(model).__name__,
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(blk.attn.num_heads),
        "patch_size": int(patch[0] if isinstance(patch, tuple | list) else patch),
        "mlp": type(mlp).__name__,
        "mlp_hidden": int(first.out_features) if first is not None else None,
        "class_token": getattr(model, "cls_token", None) is not None,
        "registers": int(regs),
        "layer_scale": bool(layer_scale),
        "position": position,
        "grid": [int(g) for g in model.patch_embed.grid_size],
    }


def _resnet(model: nn.Module, stages: int) -> dict:
    layers = [len(getattr(model, f"layer{i}")) for i in range(1, stages + 1)]
    block = model.layer1[0]
    convs = [m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)]  # timm: deep stems
    first, last = convs[0], convs[-1]
    out = {
        "type": "resnet",
        "class": type(model).__name__,
        "block": type(block).__name__,
        "layers": layers,
        "stem": {
            "convs": len(convs),
            "kernel": int(first.kernel_size[0]),
            "stride": int(first.stride[0]),
            "padding": int(first.padding[0]),
            "channels": int(last.out_channels),
            "maxpool": not isinstance(getattr(model, "maxpool", nn.Identity()), nn.Identity),
        },
    }
    if hasattr(block, "conv3") and len(convs) == 1:  # torchvision bottleneck: x 64-wide stem
        out["width"] = int(last.out_channels) // 64
    return out


def describe(model: nn.Module) -> dict:
    """The architecture actually built, read from the module itself (not from what was
    asked for): for the load report of every record."""
    n_params = sum(p.numel() for p in model.parameters())
    if callable(getattr(model, "describe_architecture", None)):  # a family's own (DINO's XCiT)
        out = model.describe_architecture()
    elif hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        out = _vit(model)
    elif all(hasattr(model, f"layer{i}") for i in (1, 2, 3, 4)) and hasattr(model, "conv1"):
        out = _resnet(model, 4)
    elif all(hasattr(model, f"layer{i}") for i in (1, 2, 3)) and hasattr(model, "conv1"):
        out = _resnet(model, 3)
        out["type"] = "cifar_resnet"
        out["depth"] = 2 + 2 * sum(out["layers"])
    elif hasattr(model, "stages") and hasattr(model, "stem"):  # timm ConvNeXt
        out = {
            "type": "convnext",
            "class": type(model).__name__,
            "depths": [len(s.blocks) for s in model.stages],
            "dims": [int(s.blocks[0].conv_dw.in_channels) for s in model.stages],
        }
    else:
        out = {"type": type(model).__name__}
        for key in ("blocks", "widths"):
            if hasattr(model, key):
                out[key] = list(getattr(model, key))
    out["parameters"] = int(n_params)
    if hasattr(model, "num_features") or hasattr(model, "embed_dim"):
        out["features"] = int(getattr(model, "num_features", None) or model.embed_dim)
    return out
