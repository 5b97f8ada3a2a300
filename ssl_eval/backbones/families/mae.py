"""MAE (He et al. 2022): ViT-B/16, ViT-L/16, ViT-H/14.

Official files are ``{"model": state_dict}`` in timm's ViT key names. The pre-training
releases (``mae_pretrain_vit_{base,large,huge}.pth``) hold the encoder with its final
``norm``; the full pre-training checkpoints (and the visualisation releases) add the decoder
(``decoder_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``,
``decoder_pos_embed``) and ``mask_token``, all dropped here, and ``args`` (whose ``model``,
e.g. ``mae_vit_base_patch16``, is the architecture built; the file must match it). The fixed
sin-cos ``pos_embed`` is stored; at another input size it is resized as MAE's
``interpolate_pos_embed`` does (bicubic to the new size). ``{"model": encoder}`` without a
decoder is also what MoCo v3's convert_to_deit.py and DeiT write: where their head counts
differ at the file's width (ViT-S: 12 and 6), the file is refused as ambiguous.

Feature kind, following MAE's own code (models_vit.py, main_linprobe.py):
  * pre-trained encoder -> ``cls``: the linear probe's default (``global_pool=False``) reads
    the class token after the final ``norm``;
  * fine-tuned checkpoints (``fc_norm`` present, ``norm`` absent: MAE deletes ``norm`` when
    fine-tuning with global pooling) -> ``model``: ``fc_norm`` of the mean patch token, which
    is timm's ``global_pool="avg"`` with ``fc_norm``; their ``head`` is dropped.
Evaluation preprocessing (main_linprobe.py): resize 256 bicubic, centre crop 224, ImageNet
mean/std.
"""

from __future__ import annotations

from ...core.errors import UserError
from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..architecture import ArchTable
from ..checkpoints import Checkpoint
from ..vit import (
    HEADS,
    ViTArch,
    bicubic_to_size,
    create_timm,
    from_shape,
    load_vit,
    split_keys,
    vit_shape,
)
from ..weights import WeightsSource
from .mocov3 import HEADS_BY_WIDTH as MOCOV3_HEADS

MAE_EVAL = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
)
_DROP = (r"^decoder_", r"^mask_token$", r"^head\.")
_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{}.pth"
# models_vit.py (fine-tuning, linear probe) and models_mae.py (pre-training, mae_ names; the
# _dec512d8b suffix names the decoder, which is dropped here)
_VITS = {
    "vit_base_patch16": ViTArch(
        "vit_base_patch16_224", 768, 12, 12, 16, where="mae models_vit.py vit_base_patch16"
    ),
    "vit_large_patch16": ViTArch(
        "vit_large_patch16_224", 1024, 16, 24, 16, where="mae models_vit.py vit_large_patch16"
    ),
    "vit_huge_patch14": ViTArch(
        "vit_huge_patch14_224", 1280, 16, 32, 14, where="mae models_vit.py vit_huge_patch14"
    ),
}
_ALIASES = {
    alias: name
    for name, spec in _VITS.items()
    for alias in (spec.timm, f"mae_{name}", f"mae_{name}_dec512d8b")
}
ARCHS = ArchTable("mae", _VITS, aliases=_ALIASES)
_BY_WIDTH = {spec.width: spec for spec in _VITS.values()}
# timm's names for a DeiT of that width: where a look-alike file can be read instead
_DEIT = {192: "deit_tiny_patch16_224", 384: "deit_small_patch16_224", 768: "deit_base_patch16_224"}
POS_EMBED = bicubic_to_size("MAE util/pos_embed.py interpolate_pos_embed")


def _root(ckpt: Checkpoint, detecting: bool = True) -> str | None:
    """Where the encoder sits. A flat ViT without a decoder is DINO's layout as far as
    detection goes, but a tag (or --family mae) reads it too: timm's hub copies are flat."""
    for root in ("model.", ""):
        if not ckpt.has(root + "cls_token", root + "blocks.0.attn.qkv.weight"):
            continue
        if ckpt.any_prefix(root + "blocks.0.ls1.") or ckpt.any_prefix(root + "blocks.0.0."):
            continue  # layer scale or chunked blocks: DINOv2
        if root or not detecting or ckpt.any_prefix("decoder_"):
            return root
    return None


def _undeclared(ckpt: Checkpoint, root: str, sd: dict, fmt_note: list[str]) -> tuple[ViTArch, str]:
    """Nothing names the architecture: the shapes, and the heads of MAE's ViT that wide,
    unless the layout also fits a family whose ViT of that width has other heads."""
    file, shape = ckpt.path.name, vit_shape(sd)
    width = shape.embed_dim
    known = _BY_WIDTH.get(width)
    finetuned = "fc_norm.weight" in sd and "norm.weight" not in sd  # MAE's global-pool fine-tuning
    if not ckpt.any_prefix(root + "decoder_") and not finetuned:
        # {"model": encoder} is also what MoCo v3's convert_to_deit.py and DeiT write
        fits = {
            "MAE ({} heads)": known.heads if known else None,
            "MoCo v3 (convert_to_deit.py output, {} heads)": MOCOV3_HEADS.get(width),
            "DeiT/timm ({} heads)": HEADS.get(width),
        }
        fits = {who: h for who, h in fits.items() if h}
        if len(set(fits.values())) > 1:
            listed = " and ".join(who.format(h) for who, h in fits.items())
            deit = (
                f"timm:{_DEIT[width]} --weights FILE"
                if width in _DEIT
                else "timm:<arch> --weights FILE"
            )
            raise UserError(
                f"{file}: a {width}-wide ViT under '{root.rstrip('.') or 'the top level'}' without "
                f"MAE's decoder fits {listed}, and its weights do not show the head count; pass "
                f"--family mocov3 for MoCo v3, or read a DeiT file as {deit}"
            )
        if len(fits) > 1:
            fmt_note.append(
                "MoCo v3's convert_to_deit.py and DeiT save this layout too, with the same "
                "architecture at this width; --family mocov3 reads it with MoCo v3's "
                "preprocessing"
            )
    if known is None:
        raise UserError(
            f"{file}: no MAE ViT is {width} wide (models_vit.py: vit_base_patch16 768, "
            "vit_large_patch16 1024, vit_huge_patch14 1280)"
        )
    spec = from_shape(shape, known.heads, known.where, known.timm)
    return spec, (
        f"the tensor shapes, and the {known.heads} heads of MAE's only {width}-wide ViT "
        f"({known.where})"
    )


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    root = _root(ckpt, detecting=False)
    if root is None:
        raise UserError(f"{ckpt.path.name} holds no MAE ViT (cls_token, blocks.*) under 'model'")
    sd, dropped = split_keys(ckpt.section(root), *_DROP)
    finetuned = "fc_norm.weight" in sd and "norm.weight" not in sd
    args = ckpt.meta.get("args")
    declared = (args.get("model") if isinstance(args, dict) else None, "the file's args.model")
    pick = ARCHS.choose(ckpt.path.name, variant=variant, declared=declared, flag=opt.arch)
    notes: list[str] = []
    if pick is None:
        spec, arch_from = _undeclared(ckpt, root, sd, notes)
    else:
        spec, arch_from = pick.spec, f"{pick.source}: {pick.name!r} ({pick.spec.where})"
    model = create_timm(
        spec.timm,
        opt.image_size or 224,
        global_pool="avg" if finetuned else "token",
        **spec.kwargs(),
    )
    report = load_vit(model, sd, "mae", POS_EMBED)
    stage = "fine-tuned, fc_norm of mean patch token" if finetuned else "pre-trained, class token"
    report = finish_report(
        report, f"mae {stage} ({root.rstrip('.') or 'flat'})", [root + k for k in dropped], root
    )
    if notes:
        report["note"] = notes[0]
    return Loaded(
        model,
        report,
        MAE_EVAL,
        "model" if finetuned else "cls",
        f"MAE ViT ({model.embed_dim}-d, {stage})",
        arch_from,
    )


register_family(
    Family(
        "mae",
        lambda ckpt: _root(ckpt) is not None,
        _build,
        "MAE ViTs: {'model': encoder (+ decoder_*, mask_token)}; also fine-tuned (fc_norm)",
    )
)

for _tag, _arch, _size, _name in (
    ("mae_vitb16", "vit_base_patch16_224", "base", "ViT-B/16"),
    ("mae_vitl16", "vit_large_patch16_224", "large", "ViT-L/16"),
    ("mae_vith14", "vit_huge_patch14_224", "huge", "ViT-H/14"),
):
    register_tag(
        _tag,
        "mae",
        _arch,
        WeightsSource(
            (f"mae_pretrain_vit_{_size}.pth", f"{_arch}.mae.safetensors"),
            hf_repo=f"timm/{_arch}.mae",
            url=_URL.format(_size),
        ),
        f"MAE {_name} pre-trained encoder, class token after the final norm",
    )
