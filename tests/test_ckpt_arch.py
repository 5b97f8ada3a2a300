"""Checkpoints load exactly, or not at all.

* The architecture comes from the tag, what the file declares (MoCo v3's ``arch``, MAE's
  ``args.model``, DINO's ``args.arch``/``args.patch_size``) or ``--arch``; all that are present
  must agree, and a file that does not match what it declares is refused.
* Nothing declared: the shapes, plus the invisible head count from the family's own code,
  and only where the layout fits no family whose architecture differs (convert_to_deit.py's
  MoCo v3 ViT-S is refused as ambiguous unless --family mocov3 says so).
* Position embeddings are resized as each family's own code does (references written here
  from the authors' repositories, not from timm).
* Every load report says what was built (``load_report["architecture"]``).

Files are written in the official layouts with random weights; models are tiny (1 block)
where the depth is read from the file, full depth where a declared architecture fixes it."""

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from test_checkpoint_formats import (  # noqa: F401
    _old_training_folder,
    _one_thread,
    cifar_state_dict,
    close,
    mlp_keys,
    randomize,
    to_simclr_v2,
)
from test_ckpt_vits import cls, vit

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.backbones.adapters import FAMILIES
from ssl_eval.backbones.catalog import _ensure_loaded
from ssl_eval.backbones.checkpoints import uninitialised
from ssl_eval.backbones.resnet import ResNet
from ssl_eval.core.errors import UserError
from ssl_eval.data.transforms import Preprocessing

X16 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(21))
X14 = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(22))


def ckpt(path, **opt):
    return build_backbone(f"ckpt:{path}", BuildOptions(**opt))


def moco_file(path, sd: dict, arch: str | None, projector: bool = True) -> None:
    """main_moco.py's save_checkpoint: {"epoch", "arch", "state_dict": DDP module.*, ...}."""
    enc = dict(sd)
    if projector:
        enc |= mlp_keys("head", [sd["cls_token"].shape[-1], 32, 16])
    state = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    state |= {f"module.{k}": v for k, v in mlp_keys("predictor", [16, 32, 16]).items()}
    obj = {
        "epoch": 300,
        "state_dict": state,
        "optimizer": {"state": {}},
        "scaler": {"scale": 1024.0},
    }
    if arch is not None:
        obj["arch"] = arch
    torch.save(obj, path)


def convert_to_deit(src, dst) -> None:
    """MoCo v3's convert_to_deit.py, step by step: keep module.base_encoder.* but its head,
    strip the prefix, save {"model": ...}."""
    state = torch.load(src, weights_only=True)["state_dict"]
    out = {
        k[len("module.base_encoder.") :]: v
        for k, v in state.items()
        if k.startswith("module.base_encoder") and not k.startswith("module.base_encoder.head")
    }
    torch.save({"model": out}, dst)


# ---------------------------------------------------------------- declared, and refused


@pytest.mark.slow
def test_mocov3_declared_vit_base_with_11_blocks_is_refused(tmp_path):
    _, sd = vit("vit_base_patch16_224", 32, seed=31, depth=11)
    moco_file(tmp_path / "declared.pth.tar", sd, "vit_base", projector=False)
    with pytest.raises(
        UserError, match=r"does not match the architecture: \d+ missing \(e\.g\. \['blocks\.11\."
    ):
        ckpt(tmp_path / "declared.pth.tar", image_size=32)
    # the same tensors without the entry are read as what they show: 11 blocks, MoCo's 12 heads
    moco_file(tmp_path / "plain.pth.tar", sd, None, projector=False)
    arch = ckpt(tmp_path / "plain.pth.tar", image_size=32).load_report["architecture"]
    assert (arch["depth"], arch["num_heads"], arch["embed_dim"]) == (11, 12, 768)
    assert arch["from"].startswith("the tensor shapes")


@pytest.mark.slow
def test_mocov3_declared_vit_small_but_another_width_is_refused(tmp_path):
    _, sd = vit("vit_tiny_patch16_224", 32, seed=32, num_heads=12)  # 12 blocks, 192 wide
    moco_file(tmp_path / "narrow.pth.tar", sd, "vit_small")
    with pytest.raises(
        UserError,
        match=r"does not match the architecture: 150 with the wrong shape .*checkpoint \(192,\) vs model \(384,\)",
    ):
        ckpt(tmp_path / "narrow.pth.tar", image_size=32)
    with pytest.raises(UserError, match="does not match the architecture"):
        build_backbone(
            "mocov3_vits16", BuildOptions(weights=tmp_path / "narrow.pth.tar", image_size=32)
        )


@pytest.mark.slow
def test_mocov3_declared_vit_small_loads_with_its_12_heads_and_says_so(tmp_path):
    ref, sd = vit("vit_small_patch16_224", 32, seed=33, num_heads=12)
    moco_file(tmp_path / "vit-s.pth.tar", sd, "vit_small")
    bb = ckpt(tmp_path / "vit-s.pth.tar", image_size=32)
    close(bb.embed(X16), cls(ref, X16))
    arch = bb.load_report["architecture"]
    assert (
        arch["type"],
        arch["depth"],
        arch["embed_dim"],
        arch["num_heads"],
        arch["patch_size"],
    ) == ("vit", 12, 384, 12, 16)
    assert arch["from"] == "the file's 'arch' entry: 'vit_small' (moco-v3 vits.py vit_small)"
    # --arch that agrees is accepted; one that does not, or an unknown name, is refused
    assert (
        ckpt(tmp_path / "vit-s.pth.tar", image_size=32, arch="vit_small")
        .model.blocks[0]
        .attn.num_heads
        == 12
    )
    with pytest.raises(
        UserError,
        match=r"the file's 'arch' entry says 'vit_small' but --arch says 'vit_base'; "
        r"they must agree \(drop --arch\)",
    ):
        ckpt(tmp_path / "vit-s.pth.tar", image_size=32, arch="vit_base")
    with pytest.raises(
        UserError,
        match=r"--arch says 'vit_huge', which is not a mocov3 architecture ssl-eval "
        r"reads; the mocov3 ones are: vit_small, vit_base, resnet50",
    ):
        ckpt(tmp_path / "vit-s.pth.tar", image_size=32, arch="vit_huge")
    with pytest.raises(
        UserError,
        match=r"--arch vit_small applies to ckpt:PATH; mocov3_vits16 is always "
        r"vit_small_patch16_224",
    ):
        build_backbone(
            "mocov3_vits16", BuildOptions(weights=tmp_path / "vit-s.pth.tar", arch="vit_small")
        )


def test_mocov3_convstem_and_resnet_declarations(tmp_path):
    _, sd = vit("vit_tiny_patch16_224", 32, seed=34, depth=1)
    moco_file(tmp_path / "conv.pth.tar", sd, "vit_conv_small")
    with pytest.raises(
        UserError, match="says 'vit_conv_small': MoCo v3's ConvStem ViTs are not supported"
    ):
        ckpt(tmp_path / "conv.pth.tar", image_size=32)
    moco_file(tmp_path / "mixed.pth.tar", sd, "resnet50")
    with pytest.raises(UserError, match="holds a ViT, but the file's 'arch' entry says 'resnet50'"):
        ckpt(tmp_path / "mixed.pth.tar", image_size=32)


# ---------------------------------------------------------------- convert_to_deit.py


@pytest.mark.slow
def test_convert_to_deit_vits_is_refused_unless_mocov3_is_named(tmp_path):
    """convert_to_deit.py's {"model": encoder} is MAE's and DeiT's layout too. A ViT-S there is
    MoCo v3's (12 heads) or DeiT's (6 heads) and the weights cannot tell: refused, unless
    --family mocov3 (or the tag) says which."""
    ref, sd = vit("vit_small_patch16_224", 32, seed=35, num_heads=12)
    moco_file(tmp_path / "vit-s-300ep.pth.tar", sd, "vit_small")
    convert_to_deit(tmp_path / "vit-s-300ep.pth.tar", tmp_path / "deit.pth")
    assert set(torch.load(tmp_path / "deit.pth", weights_only=True)) == {"model"}
    message = (
        r"deit\.pth: a 384-wide ViT under 'model' without MAE's decoder fits MoCo v3 \(convert_to_deit\.py "
        r"output, 12 heads\) and DeiT/timm \(6 heads\), and its weights do not show the head count; "
        r"pass --family mocov3 for MoCo v3, or read a DeiT file as timm:deit_small_patch16_224 --weights FILE"
    )
    with pytest.raises(UserError, match=message):
        ckpt(tmp_path / "deit.pth", image_size=32)
    with pytest.raises(UserError, match=message):
        ckpt(tmp_path / "deit.pth", image_size=32, family="mae")
    told = ckpt(tmp_path / "deit.pth", image_size=32, family="mocov3")
    assert told.load_report["family"] == "mocov3" and told.model.blocks[0].attn.num_heads == 12
    assert told.load_report["format"] == "mocov3 (convert_to_deit.py: model)"
    assert "12 heads of MoCo v3's only 384-wide ViT" in told.load_report["architecture"]["from"]
    close(told.embed(X16), cls(ref, X16))
    tagged = build_backbone(
        "mocov3_vits16", BuildOptions(weights=tmp_path / "deit.pth", image_size=32)
    )
    close(tagged.embed(X16), cls(ref, X16))


@pytest.mark.slow
def test_convert_to_deit_vitb_loads_as_mae_with_a_note(tmp_path):
    """At ViT-B width MAE, MoCo v3 and DeiT agree (12 heads): read, and the note says who else."""
    ref, sd = vit("vit_base_patch16_224", 32, seed=36, depth=1)
    moco_file(tmp_path / "vit-b.pth.tar", sd, None)
    convert_to_deit(tmp_path / "vit-b.pth.tar", tmp_path / "deit_b.pth")
    bb = ckpt(tmp_path / "deit_b.pth", image_size=32)
    assert bb.load_report["family"] == "mae" and "convert_to_deit.py" in bb.load_report["note"]
    assert bb.load_report["architecture"]["num_heads"] == 12
    close(bb.embed(X16), cls(ref, X16))
    moco = ckpt(tmp_path / "deit_b.pth", image_size=32, family="mocov3")
    assert (
        moco.preprocessing.interpolation == "bilinear"
        and bb.preprocessing.interpolation == "bicubic"
    )
    close(moco.embed(X16), cls(ref, X16))


# ---------------------------------------------------------------- MAE, DINO, DINOv2 declarations


@pytest.mark.slow
def test_mae_args_model_is_the_architecture(tmp_path):
    _, sd = vit("vit_small_patch16_224", 32, seed=37)  # 12 blocks, but 384 wide
    decoder = {"decoder_embed.weight": torch.randn(16, 384), "mask_token": torch.zeros(1, 1, 16)}
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=224, norm_pix_loss=True)
    torch.save({"model": sd | decoder, "args": args, "epoch": 799}, tmp_path / "checkpoint-799.pth")
    with pytest.raises(UserError, match="does not match the architecture"):
        ckpt(tmp_path / "checkpoint-799.pth", image_size=32)
    # DeiT's main.py saves {"model", "args"} too: its args.model is not an MAE architecture
    deit = argparse.Namespace(model="deit_small_patch16_224")
    torch.save(
        {"model": sd | {"head.weight": torch.randn(10, 384)}, "args": deit}, tmp_path / "deit.pth"
    )
    with pytest.raises(
        UserError,
        match=r"the file's args\.model says 'deit_small_patch16_224', which is not a mae "
        r"architecture ssl-eval reads; the mae ones are: vit_base_patch16",
    ):
        ckpt(tmp_path / "deit.pth", image_size=32, family="mae")


@pytest.mark.slow
def test_mae_args_model_declared_loads(tmp_path):
    ref, sd = vit("vit_base_patch16_224", 32, seed=38)
    args = argparse.Namespace(model="vit_base_patch16", global_pool=False)
    torch.save({"model": sd, "args": args}, tmp_path / "linprobe.pth")
    bb = ckpt(tmp_path / "linprobe.pth", image_size=32)
    assert bb.load_report["family"] == "mae" and "note" not in bb.load_report
    assert bb.load_report["architecture"]["from"] == (
        "the file's args.model: 'vit_base_patch16' (mae models_vit.py vit_base_patch16)"
    )
    close(bb.embed(X16), cls(ref, X16))


@pytest.mark.slow
def test_dino_args_arch_and_patch_size_are_the_architecture(tmp_path):
    def training_file(name, sd, **args):
        torch.save(
            {
                "teacher": {f"backbone.{k}": v for k, v in sd.items()},
                "student": {f"module.backbone.{k}": v for k, v in sd.items()},
                "args": argparse.Namespace(**args),
                "epoch": 1,
            },
            tmp_path / name,
        )
        return tmp_path / name

    ref, sd = vit("vit_small_patch16_224", 32, seed=39)
    ok = ckpt(training_file("ok.pth", sd, arch="vit_small", patch_size=16), image_size=32)
    assert ok.load_report["architecture"]["from"].startswith(
        "the file's args: 'vit_small, patch 16'"
    )
    close(ok.embed(X16), cls(ref, X16))
    with pytest.raises(
        UserError, match=r"does not match the architecture.*patch_embed\.proj\.weight"
    ):
        ckpt(training_file("p8.pth", sd, arch="vit_small", patch_size=8), image_size=32)
    with pytest.raises(UserError, match="does not match the architecture"):
        ckpt(training_file("base.pth", sd, arch="vit_base", patch_size=16), image_size=32)
    with pytest.raises(
        UserError, match="holds a ViT, but the file's args.arch says 'xcit_small_12_p16'"
    ):
        ckpt(training_file("xcit.pth", sd, arch="xcit_small_12_p16", patch_size=16), image_size=32)
    with pytest.raises(
        UserError,
        match=r"the tag says 'vit_small_patch8_224' but the file's args says "
        r"'vit_small, patch 16'",
    ):
        build_backbone("dino_vits8", BuildOptions(weights=tmp_path / "ok.pth", image_size=32))


@pytest.mark.slow
def test_a_flat_vit_no_dino_model_is_as_wide_is_refused(tmp_path):
    _, sd = vit("vit_large_patch16_224", 32, seed=40, depth=1)
    torch.save(sd, tmp_path / "flat_large.pth")
    with pytest.raises(UserError, match=r"no DINO ViT is 1024 wide .*pass --family mae"):
        ckpt(tmp_path / "flat_large.pth", image_size=32)
    assert (
        ckpt(tmp_path / "flat_large.pth", image_size=32, family="mae")
        .model.blocks[0]
        .attn.num_heads
        == 16
    )


@pytest.mark.slow
def test_dinov2_arch_flag_fixes_depth_and_registers_come_from_the_file(tmp_path):
    ref, sd = vit("vit_small_patch14_reg4_dinov2", 28, seed=41, depth=2, reg_tokens=8)
    r = 0.1 * torch.randn(1, 1, 384)  # DINOv2's layout: the class token's position in pos_embed
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official |= {
        "register_tokens": sd["reg_token"],
        "cls_token": sd["cls_token"] - r,
        "pos_embed": torch.cat([r, sd["pos_embed"]], dim=1),
        "mask_token": torch.zeros(1, 384),
    }
    torch.save(official, tmp_path / "reg8.pth")
    bb = ckpt(tmp_path / "reg8.pth", image_size=28)
    arch = bb.load_report["architecture"]
    assert (arch["registers"], arch["depth"], arch["num_heads"], arch["layer_scale"]) == (
        8,
        2,
        6,
        True,
    )
    close(bb.embed(X14), cls(ref, X14))
    with pytest.raises(
        UserError, match=r"does not match the architecture: 140 missing \(e\.g\. \['blocks\.10\."
    ):
        ckpt(
            tmp_path / "reg8.pth", image_size=28, arch="vit_small"
        )  # DINOv2's vit_small has 12 blocks
    with pytest.raises(
        UserError, match="not a dinov2 architecture ssl-eval reads; the dinov2 ones are: vit_small"
    ):
        ckpt(tmp_path / "reg8.pth", image_size=28, arch="vit_s")


# ---------------------------------------------------------------- solo-learn: args.json


def solo_run(
    folder, backbone: dict, cfg: dict, method: str, dataset: str, args: dict | None = None
):
    """A solo-learn run folder: the Lightning checkpoint (BaseMethod's state dict, with the
    projector, online classifier and momentum copy) and the Checkpointer's args.json."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    dim = next(
        v.shape[0] for k, v in reversed(backbone.items()) if k.endswith(".weight") and v.ndim == 1
    )
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    state |= {f"momentum_backbone.{k}": v + 1 for k, v in backbone.items()}
    state |= {
        "projector.0.weight": torch.randn(8, dim),
        "classifier.weight": torch.randn(10, dim),
        "classifier.bias": torch.zeros(10),
    }
    path = folder / f"{method}-abc123-ep=9.ckpt"
    torch.save(
        {
            "epoch": 9,
            "global_step": 90,
            "pytorch-lightning_version": "2.0.7",
            "state_dict": state,
            "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 9}}}},
            "callbacks": {},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
            "lr_schedulers": [],
        },
        path,
    )
    if args is None:
        args = {
            "name": f"{method}-run",
            "method": method,
            "backbone": cfg,
            "data": {"dataset": dataset, "num_classes": 10},
            "max_epochs": 10,
        }
    (folder / "args.json").write_text(json.dumps(args))
    return path


@pytest.mark.slow
def test_solo_vit_heads_come_from_the_method_in_args_json(tmp_path):
    """The same tensors are a 12-head ViT-S under method mocov3 and a 6-head one under byol
    (solo/backbones/vit/__init__.py picks the constructor by method)."""
    cfg = {"name": "vit_small", "kwargs": {"patch_size": 16, "img_size": 32}}
    ref12, sd = vit("vit_small_patch16_224", 32, seed=50, num_heads=12)
    ref6 = uninitialised(
        lambda: timm.create_model(
            "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32
        )
    ).eval()
    ref6.load_state_dict(sd)
    moco = ckpt(solo_run(tmp_path / "moco", sd, cfg, "mocov3", "cifar10"))
    byol = ckpt(solo_run(tmp_path / "byol", sd, cfg, "byol", "cifar10"))
    assert (
        moco.load_report["family"] == "solo" and moco.load_report["architecture"]["num_heads"] == 12
    )
    assert (
        byol.load_report["architecture"]["num_heads"] == 6
        and "method 'byol'" in byol.load_report["architecture"]["from"]
    )
    with torch.no_grad():
        close(moco.embed(X16), ref12(X16))
        close(byol.embed(X16), ref6(X16))
    assert (moco.embed(X16) - byol.embed(X16)).abs().max() > 1e-3  # the head count matters
    assert moco.preprocessing == Preprocessing(
        resize=32, crop=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261)
    )
    assert "state_dict.classifier.weight" in moco.load_report["dropped"]
    with pytest.raises(
        UserError,
        match=r"solo-learn does not resize a ViT's position embeddings; it was trained "
        r"at 32 pixels, so drop --image-size 64",
    ):
        ckpt(tmp_path / "moco" / "mocov3-abc123-ep=9.ckpt", image_size=64)
    (tmp_path / "moco" / "args.json").unlink()
    with pytest.raises(UserError, match="keeps its architecture in args.json beside it"):
        ckpt(tmp_path / "moco" / "mocov3-abc123-ep=9.ckpt")


def solo_cifar_resnet18(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """solo-learn's BaseMethod on CIFAR: torchvision's resnet18, conv1 -> 3x3 stride 1
    padding 2, maxpool -> Identity, fc -> Identity."""
    import torchvision

    ref = torchvision.models.resnet18()
    ref.fc = torch.nn.Identity()
    ref.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    ref.maxpool = torch.nn.Identity()
    ref.load_state_dict(sd)
    with torch.no_grad():
        return ref.eval()(x)


@pytest.mark.slow
def test_solo_resnet18_cifar_stem_comes_from_args_json(tmp_path):
    import torchvision

    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    sd = randomize(model, 51).state_dict()
    bb = ckpt(solo_run(tmp_path / "simclr", sd, {"name": "resnet18"}, "simclr", "cifar100"))
    close(bb.embed(X16), solo_cifar_resnet18(sd, X16))
    stem = bb.load_report["architecture"]["stem"]
    assert (stem["kernel"], stem["stride"], stem["padding"], stem["maxpool"]) == (3, 1, 2, False)
    bad = {
        "name": "x",
        "method": "simclr",
        "backbone": {"name": "swin_tiny"},
        "data": {"dataset": "cifar10"},
    }
    with pytest.raises(UserError, match="backbone.name says 'swin_tiny': solo-learn's Swin"):
        ckpt(solo_run(tmp_path / "swin", sd, {}, "simclr", "cifar10", args=bad))


# ---------------------------------------------------------------- position embeddings


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, patch: int) -> torch.Tensor:
    """Written from DINO's VisionTransformer.interpolate_pos_encoding for a square w x w input:
    w0 = w // patch + 0.1, bicubic by scale factor w0 / sqrt(N), class entry kept."""
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[-1]
    w0 = h0 = w // patch + 0.1
    side = math.sqrt(n)
    grid = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / side, h0 / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def mae_interpolate_pos_embed(pos_embed: torch.Tensor, new: int) -> torch.Tensor:
    """Written from MAE's util/pos_embed.py interpolate_pos_embed: one extra token kept, the rest
    bicubic to (new, new), align_corners=False."""
    dim = pos_embed.shape[-1]
    orig = int((pos_embed.shape[-2] - 1) ** 0.5)
    grid = pos_embed[:, 1:].reshape(-1, orig, orig, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def mocov3_position_table(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Written from MoCo v3's vits.py build_2d_sincos_position_embedding (h = w = grid), class
    token row (zeros) included."""
    grid_w, grid_h = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32),
        torch.arange(grid, dtype=torch.float32),
        indexing="ij",
    )
    pos_dim = dim // 4
    omega = 1.0 / (temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    table = torch.cat(
        [torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1
    )[None]
    return torch.cat([torch.zeros(1, 1, dim), table], dim=1)


def twin_features(
    arch: str, sd: dict, pos_embed: torch.Tensor, x: torch.Tensor, **kw
) -> torch.Tensor:
    """Class token of a timm model at x's size holding ``sd`` with ``pos_embed``."""
    model = uninitialised(
        lambda: timm.create_model(arch, pretrained=False, num_classes=0, img_size=x.shape[-1], **kw)
    )
    model.load_state_dict({**sd, "pos_embed": pos_embed})
    return cls(model.eval(), x)


def test_dino_resizes_like_its_interpolate_pos_encoding(tmp_path):
    _, sd = vit("vit_small_patch16_224", 224, seed=42, depth=1)  # a 14x14 table, read at 32 pixels
    torch.save(sd, tmp_path / "dino_flat.pth")
    bb = ckpt(tmp_path / "dino_flat.pth", image_size=32)
    want = dino_interpolate_pos_encoding(sd["pos_embed"], 32, 16)
    close(bb.model.pos_embed.detach(), want)
    rep = bb.load_report["pos_embed"]
    assert rep["file_grid"] == [14, 14] and rep["model_grid"] == [2, 2] and "DINO" in rep["resized"]
    close(bb.embed(X16), twin_features("vit_small_patch16_224", sd, want, X16, depth=1))
    assert (
        mae_interpolate_pos_embed(sd["pos_embed"], 2) - want
    ).abs().max() > 1e-3  # the recipes differ


def test_mae_resizes_like_its_interpolate_pos_embed(tmp_path):
    _, sd = vit("vit_base_patch16_224", 224, seed=43, depth=1)
    torch.save({"model": sd | {"decoder_embed.weight": torch.randn(8, 768)}}, tmp_path / "mae.pth")
    bb = ckpt(tmp_path / "mae.pth", image_size=32)
    want = mae_interpolate_pos_embed(sd["pos_embed"], 2)
    close(bb.model.pos_embed.detach(), want)
    assert "MAE" in bb.load_report["pos_embed"]["resized"]
    close(bb.embed(X16), twin_features("vit_base_patch16_224", sd, want, X16, depth=1))
    assert (dino_interpolate_pos_encoding(sd["pos_embed"], 32, 16) - want).abs().max() > 1e-3


def test_mocov3_rebuilds_its_sincos_table_and_refuses_another(tmp_path):
    ref, sd = vit("vit_small_patch16_224", 224, seed=44, depth=1, num_heads=12)
    table = mocov3_position_table(14, 384)
    moco_file(tmp_path / "sincos.pth.tar", sd | {"pos_embed": table}, None)
    bb = ckpt(tmp_path / "sincos.pth.tar", image_size=32)
    want = mocov3_position_table(2, 384)
    close(bb.model.pos_embed.detach(), want)
    assert "sin-cos" in bb.load_report["pos_embed"]["resized"]
    close(
        bb.embed(X16), twin_features("vit_small_patch16_224", sd, want, X16, depth=1, num_heads=12)
    )
    # an interpolated table would not be MoCo v3's at the new size
    assert (mae_interpolate_pos_embed(table, 2) - want).abs().max() > 1e-3
    moco_file(tmp_path / "learned.pth.tar", sd, None)  # a random table: not MoCo v3's sin-cos
    with pytest.raises(UserError, match=r"this file's pos_embed is not that table .*--image-size"):
        ckpt(tmp_path / "learned.pth.tar", image_size=32)
    assert (
        ckpt(tmp_path / "learned.pth.tar", image_size=224).load_report["pos_embed"]["resized"]
        is False
    )


# ---------------------------------------------------------------- the architecture in every report


def _tiny_resnet() -> dict:
    return randomize(uninitialised(lambda: ResNet((1, 1, 1, 1))), 5).state_dict()


def _family_files(tmp_path) -> dict:
    """One small official-layout file per family, with what its report must say it built."""
    rn = _tiny_resnet()
    resnet = {"type": "resnet", "layers": [1, 1, 1, 1], "width": 1, "block": "Bottleneck"}
    _, s16 = vit("vit_small_patch16_224", 32, seed=45, depth=1)
    _, b16 = vit("vit_base_patch16_224", 32, seed=46, depth=1)
    _, d2 = vit("vit_small_patch14_dinov2", 28, seed=47, depth=1)
    _, d3 = vit("vit_small_patch16_dinov3", 32, seed=48, depth=1, global_pool="token")
    torch.save(rn | {"fc.weight": torch.randn(10, 2048)}, tmp_path / "supervised.pth")
    torch.save(
        {"resnet": to_simclr_v2(rn), "head": {"layers.0.weight": torch.randn(8, 2048)}},
        tmp_path / "simclr.pth",
    )
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in cifar_state_dict(1).items()}},
        tmp_path / "cifar.th",
    )
    moco_file(tmp_path / "mocov3.pth.tar", s16, None)
    torch.save({"model": b16 | {"decoder_embed.weight": torch.randn(8, 768)}}, tmp_path / "mae.pth")
    torch.save(s16, tmp_path / "dino.pth")
    torch.save(d2 | {"mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2.pth")
    torch.save(d3, tmp_path / "dinov3.pth")
    import torchvision

    r18 = {
        k: v
        for k, v in randomize(uninitialised(torchvision.models.resnet18), 52).state_dict().items()
        if not k.startswith("fc.")
    }
    solo = solo_run(tmp_path / "solo", r18, {"name": "resnet18"}, "byol", "imagenet")
    vit_s = {"type": "vit", "depth": 1, "embed_dim": 384, "patch_size": 16, "registers": 0}
    return {  # family: (file, size, options, expected subset of load_report["architecture"])
        "supervised": ("supervised.pth", 32, {}, resnet),
        "simclr": ("simclr.pth", 32, {}, resnet),
        "cifar_resnet": (
            "cifar.th",
            32,
            {},
            {"type": "cifar_resnet", "depth": 8, "layers": [1, 1, 1]},
        ),
        "mocov3": ("mocov3.pth.tar", 32, {}, vit_s | {"num_heads": 12}),
        "mae": ("mae.pth", 32, {}, {"type": "vit", "depth": 1, "embed_dim": 768, "num_heads": 12}),
        "dino": ("dino.pth", 32, {}, vit_s | {"num_heads": 6, "position": "absolute"}),
        "dinov2": (
            "dinov2.pth",
            28,
            {},
            {"type": "vit", "patch_size": 14, "num_heads": 6, "layer_scale": True},
        ),
        "dinov3": (
            "dinov3.pth",
            32,
            {},
            {"type": "vit", "num_heads": 6, "registers": 4, "position": "rope"},
        ),
        "solo": (
            solo.relative_to(tmp_path),
            None,
            {},
            {"type": "resnet", "layers": [2, 2, 2, 2], "block": "BasicBlock"},
        ),
    }


@pytest.mark.slow
def test_every_family_reports_the_architecture_it_built(tmp_path):
    _ensure_loaded()
    files = _family_files(tmp_path)
    assert set(files) == set(FAMILIES.names()), "a family without a case here: add one"
    for family, (name, size, opt, expected) in files.items():
        bb = ckpt(tmp_path / name, image_size=size, **opt)
        assert bb.load_report["family"] == family, name
        arch = bb.load_report["architecture"]
        assert {k: arch.get(k) for k in expected} == expected, family
        assert isinstance(arch["from"], str) and arch["from"], family
        assert arch["parameters"] == sum(p.numel() for p in bb.model.parameters())
        if arch["type"] == "vit":  # read from the module built, not from what was asked for
            assert arch["num_heads"] == bb.model.blocks[0].attn.num_heads


@pytest.mark.slow
def test_tags_timm_random_pixels_and_trained_folders_report_it_too(tmp_path):
    _, d2 = vit("vit_small_patch14_dinov2", 28, seed=49)
    torch.save(d2 | {"mask_token": torch.zeros(1, 384)}, tmp_path / "dinov2_vits14_pretrain.pth")
    tag = build_backbone(
        "dinov2_vits14",
        BuildOptions(weights=tmp_path / "dinov2_vits14_pretrain.pth", image_size=28),
    )
    assert (
        tag.load_report["architecture"]["from"]
        == "the tag: 'vit_small' (dinov2 vision_transformer.py vit_small)"
    )
    assert tag.load_report["architecture"]["depth"] == 12
    rnd = build_backbone("random:resnet10t", BuildOptions(image_size=32)).load_report[
        "architecture"
    ]
    assert (
        rnd["type"] == "resnet"
        and rnd["layers"] == [1, 1, 1, 1]
        and rnd["from"] == "timm's resnet10t"
    )
    assert build_backbone("pixels", BuildOptions()).load_report["architecture"]["type"] == "pixels"
    _old_training_folder(tmp_path / "run")
    trained = build_backbone(f"ckpt:{tmp_path / 'run'}", BuildOptions()).load_report["architecture"]
    assert trained["name"] == "cifar_resnet_tiny" and trained["from"].startswith(
        "the training sidecar"
    )
    with pytest.raises(
        UserError, match="--arch vit_small applies to ckpt:PATH; random:resnet10t names its"
    ):
        build_backbone("random:resnet10t", BuildOptions(arch="vit_small"))
