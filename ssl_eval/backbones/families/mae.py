"""MAE (He et al. 2022): ViT-B/16, ViT-L/16, ViT-H/14.

Official files are ``{"model": state_dict}`` in timm's ViT key names. The pre-training
releases (``mae_pretrain_vit_{base,large,huge}.pth``) hold the encoder with its final
``norm``; the full pre-training checkpoints (and the visualisation releases) add the decoder
(``decoder_embed``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``,
``decoder_pos_embed``) and ``mask_token``, all dropped here. The fixed sin-cos ``pos_embed``
is stored, so it loads like any other.

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

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ...errors import UserError
from ..adapters import Family, Loaded, finish_report, register_family, register_tag
from ..checkpoints import Checkpoint
from ..vit import create_timm, load_vit, split_keys, vit_kwargs, vit_shape
from ..weights import WeightsSource

MAE_EVAL = Preprocessing(
    resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic"
)
_DROP = (r"^decoder_", r"^mask_token$", r"^head\.")
_URL = "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_{}.pth"


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


def _build(ckpt: Checkpoint, variant: str | None, opt) -> Loaded:
    root = _root(ckpt, detecting=False)
    if root is None:
        raise UserError(f"{ckpt.path.name} holds no MAE ViT (cls_token, blocks.*) under 'model'")
    sd, dropped = split_keys(ckpt.section(root), *_DROP)
    finetuned = "fc_norm.weight" in sd and "norm.weight" not in sd
    arch, kw = variant, {}
    if variant is None:
        arch, kw = "vit_base_patch16_224", vit_kwargs(vit_shape(sd))
    model = create_timm(arch, opt.image_size or 224, global_pool="avg" if finetuned else "token", **kw)
    report = load_vit(model, sd, "mae")
    stage = "fine-tuned, fc_norm of mean patch token" if finetuned else "pre-trained, class token"
    return Loaded(
        model,
        finish_report(report, f"mae {stage} ({root.rstrip('.') or 'flat'})",
                      [root + k for k in dropped], root),
        MAE_EVAL, "model" if finetuned else "cls",
        f"MAE ViT ({model.embed_dim}-d, {stage})",
    )


register_family(Family(
    "mae", lambda ckpt: _root(ckpt) is not None, _build,
    "MAE ViTs: {'model': encoder (+ decoder_*, mask_token)}; also fine-tuned (fc_norm)",
))

for _tag, _arch, _size, _name in (
    ("mae_vitb16", "vit_base_patch16_224", "base", "ViT-B/16"),
    ("mae_vitl16", "vit_large_patch16_224", "large", "ViT-L/16"),
    ("mae_vith14", "vit_huge_patch14_224", "huge", "ViT-H/14"),
):
    register_tag(
        _tag, "mae", _arch,
        WeightsSource((f"mae_pretrain_vit_{_size}.pth", f"{_arch}.mae.safetensors"),
                      hf_repo=f"timm/{_arch}.mae", url=_URL.format(_size)),
        f"MAE {_name} pre-trained encoder, class token after the final norm",
    )
