"""DINOv2 (Oquab et al. 2023): ViT-S/B/L/g 14, with and without registers.

Hub releases (``dinov2_vits14_pretrain.pth``, ``dinov2_vits14_reg4_pretrain.pth`` ...) are flat
state dicts in timm-like names plus ``mask_token`` (pre-training only, dropped), layer scale
``ls1.gamma``/``ls2.gamma``, position embeddings for 518 pixels (37x37 patches, resampled to the
evaluation size) and, for the register models, ``register_tokens``. ViT-g uses a fused SwiGLU
MLP, ``mlp.w12`` (both halves, gate first) and ``mlp.w3``: timm's packed SwiGLU with
``fc1``/``fc2`` computes the same ``silu(x1) * x2``.

Training checkpoints (``eval/<iter>/teacher_checkpoint.pth``) are ``{"teacher": ...}`` with
``backbone.*``, ``dino_head.*`` and ``ibot_head.*``; with ``block_chunks > 0`` the blocks are
chunked as ``blocks.<chunk>.<i>`` where ``i`` is the global block index (each chunk pads its
start with Identity modules), so un-chunking just drops the chunk number.

Conversion to timm (written here): register models become timm's ``reg_token`` with
``no_embed_class`` (the class token's position embedding is folded into ``cls_token``);
``w12``/``w3`` become ``fc1``/``fc2``. The 37x37 position table is resized to the
evaluation grid once, at load, exactly as DINOv2's ``interpolate_pos_encoding`` does in every
forward pass with the settings its builder gives each variant (:data:`PLAIN`,
:data:`REGISTERS`), which differ:

- ``dinov2_vit{s,b,l,g}14``: ``hub/backbones.py`` ``_make_dinov2_model``'s defaults,
  ``interpolate_offset=0.1``, ``interpolate_antialias=False``: bicubic by a scale factor of
  (new + 0.1) / 37, no antialiasing (also ``configs/ssl_default_config.yaml``'s, which training
  checkpoints without registers were made with);
- ``dinov2_vit{s,b,l,g}14_reg``: ``hub/backbones.py`` ``dinov2_vit*14_reg``,
  ``num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True``: bicubic to the
  new size, antialiased (also ``configs/eval/vit*14_reg4_pretrain.yaml``'s, so a training
  checkpoint with registers is read the same way);

all from facebookresearch/dinov2 at b8931f7bf91576930313be2c6d6af376033b35f0 (the settings date
from 9c7e324, "Add new backbones trained with registers"; the offset-0 branch resizes to the
size since e1277af), with img_size 518, patch 14, layer scale, ``vit_giant2`` with
``ffn_layer="swiglufused"``. Until issue 20 the register models were resized with the plain
ones' settings (their 224 px table 7% off, features 2.3% on the released weights per the
issue, 0.3-0.7% on random ones); ``tests/test_dinov2_variants.py`` checks every tag against a
transcription of its builder. The head count is
DINOv2's for the width (the files declare no architecture; ``--arch vit_small`` ... fixes one,
depth included). Evaluation as DINOv2's: resize 256 bicubic, centre crop
224, ImageNet mean/std; feature: the class token after the final norm (k-NN protocol;
``--feature-kind last:4`` gives the linear protocol's concatenation).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable
from ..checkpoints import Checkpoint
from ..registry import BACKBONES
from ..vit import (
    PosEmbedResize,
    bicubic_with_offset,
    create_timm,
    follow_input_size,
    load_vit,
    split_keys,
    vit_shape,
)
from ..weights import WeightsSource

DINOV2_EVAL = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
)
_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
# dinov2/models/vision_transformer.py: (width, heads, depth); vit_giant2 has the SwiGLU MLP.
# timm's vit_*_patch14[_reg4]_dinov2 are these (layer scale, registers, SwiGLU included).
_OWN = {
    "vit_small": (384, 6, 12),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 16, 24),
    "vit_giant2": (1536, 24, 40),
}
_TIMM_SIZE = {"vit_small": "small", "vit_base": "base", "vit_large": "large", "vit_giant2": "giant"}
ARCHS = ArchTable(
    "dinov2",
    _OWN,
    aliases={
        f"vit_{size}_patch14_{reg}dinov2": own
        for own, size in _TIMM_SIZE.items()
        for reg in ("", "reg4_")
    },
)
_BY_WIDTH = {width: name for name, (width, _, _) in _OWN.items()}


def _to_size_antialiased(who: str) -> PosEmbedResize:
    """``interpolate_pos_encoding`` with ``interpolate_offset`` 0: bicubic to the new size
    (no scale factor), antialiased as the register models set it, float32."""

    def resize(tokens: torch.Tensor, old: int, new: tuple[int, int]) -> torch.Tensor:
        grid = tokens.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
        out = F.interpolate(grid, size=tuple(new), mode="bicubic", antialias=True)
        return out.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])

    return PosEmbedResize(f"bicubic to the new size, antialiased ({who})", resize)


# The builders' interpolate_offset / interpolate_antialias (dinov2 hub/backbones.py @ b8931f7).
PLAIN = bicubic_with_offset(
    0.1,
    "DINOv2 vision_transformer.py interpolate_pos_encoding with hub/backbones.py "
    "dinov2_vit*14's interpolate_offset=0.1, interpolate_antialias=False",
)
REGISTERS = _to_size_antialiased(
    "DINOv2 vision_transformer.py interpolate_pos_encoding with hub/backbones.py "
    "dinov2_vit*14_reg's interpolate_offset=0.0, interpolate_antialias=True"
)


def pos_embed_rule(registers: int) -> PosEmbedResize:
    """How DINOv2's builder for a model with that many register tokens resizes its table."""
    return REGISTERS if registers else PLAIN


_ROOTS = (
    "teacher.backbone.",
    "model.teacher.backbone.",
    "teacher.module.backbone.",
    "student.backbone.",
    "model.student.backbone.",
)
_URL = "https://dl.fbaipublicfiles.com/dinov2/{n}/{n}{r}_pretrain.pth"
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def _prefix(ckpt: Checkpoint) -> str | None:
    for p in _ROOTS + ("",):
        if not ckpt.has(p + "cls_token", p + "pos_embed"):
            continue
        if (
            p + "mask_token" in ckpt.flat
            or ckpt.any_prefix(p + "blocks.0.ls1.")
            or ckpt.any_prefix(p + "blocks.0.0.")
        ):
            return p
    return None


def to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 names -> timm's (un-chunk, registers, SwiGLU); timm names pass."""
    out = {}
    for k, v in sd.items():
        k = _CHUNKED.sub(r"blocks.\1.", k)
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)
        out[re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)] = v
    if "register_tokens" in out:
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    prefix = _prefix(ckpt)
    if prefix is None:
        raise UserError(f"{ckpt.path.name} holds no DINOv2 ViT (cls_token, pos_embed, ls1)")
    sd, dropped = split_keys(ckpt.section(prefix), r"^mask_token$")
    others = [k for k in ckpt.flat if not k.startswith(prefix)]  # heads, student, optimiser
    sd = to_timm(sd)
    shape = vit_shape(sd)
    file = ckpt.path.name
    pick = ARCHS.choose(file, variant=variant, flag=opt.arch)
    if pick is None:  # nothing declared: the shapes, and the heads of DINOv2's ViT that wide
        if shape.embed_dim not in _BY_WIDTH:
            raise UserError(
                f"{file}: no DINOv2 ViT is {shape.embed_dim} wide (vit_small 384, "
                "vit_base 768, vit_large 1024, vit_giant2 1536)"
            )
        name = _BY_WIDTH[shape.embed_dim]
        kw = {"depth": shape.depth, "patch_size": shape.patch}
        arch_from = (
            f"the tensor shapes, and the {_OWN[name][1]} heads of DINOv2's only "
            f"{shape.embed_dim}-wide ViT (dinov2 vision_transformer.py {name})"
        )
    else:
        name, kw = pick.name, {}
        arch_from = f"{pick.source}: {pick.name!r} (dinov2 vision_transformer.py {pick.name})"
    if variant is None:  # the registers the file holds (the released ones have 4)
        kw["patch_size"] = shape.patch
        if shape.registers:
            kw["reg_tokens"] = shape.registers
    arch = variant or f"vit_{_TIMM_SIZE[name]}_patch14_{'reg4_' if shape.registers else ''}dinov2"
    model = create_timm(arch, opt.image_size or 224, dynamic_img_size=True, **kw)
    rule = pos_embed_rule(getattr(model, "num_reg_tokens", 0))
    report = load_vit(model, sd, "dinov2", rule)
    # any input size, the table resized per forward as the hub's models do
    follow_input_size(model, sd["pos_embed"], rule, report)
    chunked = any(_CHUNKED.match(k) for k in ckpt.section(prefix))
    fmt = f"dinov2 ({prefix.rstrip('.') or 'flat'}{', chunked blocks' if chunked else ''})"
    return Loaded(
        model,
        finish_report(report, fmt, others + [prefix + k for k in dropped], prefix),
        DINOV2_EVAL,
        "cls",
        f"DINOv2 ViT ({model.embed_dim}-d class token)",
        arch_from,
    )


register_family(
    Family(
        "dinov2",
        lambda ckpt: _prefix(ckpt) is not None,
        _build,
        "DINOv2: flat hub files (mask_token, ls1) or training checkpoints (teacher.backbone.*)",
    )
)


def _register(size: str, registers: bool) -> None:
    tag = f"dinov2_vit{size}14" + ("_reg" if registers else "")
    arch = f"vit_{_SIZES[size]}_patch14_{'reg4_' if registers else ''}dinov2"
    official = _URL.format(n=f"dinov2_vit{size}14", r="_reg4" if registers else "")
    source = WeightsSource(
        filenames=(official.rsplit("/", 1)[1], f"{arch}.lvd142m.safetensors"),
        hf_repo=f"timm/{arch}.lvd142m",
        url=official,
    )
    desc = f"DINOv2 ViT-{size.upper() if size != 'g' else 'g'}/14{' with 4 registers' if registers else ''} (class token)"
    register_tag(tag, "dinov2", arch, source, desc)


for _s in _SIZES:
    for _r in (False, True):
        _register(_s, _r)
BACKBONES.register("dinov2", BACKBONES.get("dinov2_vits14"), "alias of dinov2_vits14")
