"""ViT (and ConvNeXt) checkpoint layouts: MoCo v3, MAE, DINO, DINOv2, DINOv3. Each file is
built from a random timm reference exactly as the official code saves it (containers,
prefixes, names, extra keys), loaded through the tag and/or ``ckpt:PATH`` detection, and
must give the reference's features to 1e-5.

Real architectures at small inputs (32 pixels for /16, 28 for /14) where creating them is
cheap; ViT-L/H/g and the largest DINOv3s would cost tens of seconds each on a 2-core CPU, so
their key mapping is tested at their real width, heads and MLP (ViT-H/14 MAE, ViT-g/14
SwiGLU DINOv2, ViT-S+/16 SwiGLU DINOv3) with 2 blocks through ``ckpt:PATH`` (which reads the
depth from the file), and every tag's full architecture is checked against the papers' table
on the meta device."""

import argparse

import pytest
import timm
import torch
from test_checkpoint_formats import _one_thread, close, mlp_keys, randomize  # noqa: F401

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.adapters import TAGS
from ssl_eval.backbones.checkpoints import uninitialised
from ssl_eval.backbones.families.mocov3 import VIT_VARIANTS
from ssl_eval.core.errors import UserError

X16 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
X14 = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))


def vit(arch: str, img: int, seed: int = 0, **kw):
    """A random timm model and its state dict (built without timm's slow initialisation)."""
    if not arch.startswith("convnext"):
        kw["img_size"] = img
    model = uninitialised(lambda: timm.create_model(arch, pretrained=False, num_classes=0, **kw))
    model = randomize(model, seed)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def cls(model, x):
    with torch.no_grad():
        return model.forward_features(x)[:, 0]


@pytest.fixture(scope="module")
def vits16():
    return vit("vit_small_patch16_224", 32, seed=5)


# ---------------------------------------------------------------- the tags' architectures

PAPER = {  # tag: (width, depth, heads, patch)
    "mocov3_vits16": (384, 12, 12, 16),
    "mocov3_vitb16": (768, 12, 12, 16),
    "mae_vitb16": (768, 12, 12, 16),
    "mae_vitl16": (1024, 24, 16, 16),
    "mae_vith14": (1280, 32, 16, 14),
    "dino_vits16": (384, 12, 6, 16),
    "dino_vits8": (384, 12, 6, 8),
    "dino_vitb16": (768, 12, 12, 16),
    "dino_vitb8": (768, 12, 12, 8),
    "dinov2_vits14": (384, 12, 6, 14),
    "dinov2_vitb14": (768, 12, 12, 14),
    "dinov2_vitl14": (1024, 24, 16, 14),
    "dinov2_vitg14": (1536, 40, 24, 14),
    "dinov2_vitg14_reg": (1536, 40, 24, 14),
    "dinov3_vits16": (384, 12, 6, 16),
    "dinov3_vitsp16": (384, 12, 6, 16),
    "dinov3_vitb16": (768, 12, 12, 16),
    "dinov3_vitl16": (1024, 24, 16, 16),
    "dinov3_vith16p": (1280, 32, 20, 16),
}


@pytest.mark.slow
def test_every_vit_tag_has_its_papers_architecture():
    list_backbones()  # registers every family's tags
    for tag, (width, depth, heads, patch) in PAPER.items():
        family, arch = TAGS[tag]
        kw = VIT_VARIANTS[arch] if family == "mocov3" else {}
        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False, num_classes=0, **kw)
        got = (
            m.embed_dim,
            len(m.blocks),
            m.blocks[0].attn.num_heads,
            m.patch_embed.proj.kernel_size[0],
        )
        assert got == (width, depth, heads, patch), tag
    assert TAGS["dinov3_vitsp16"][1] == "vit_small_plus_patch16_dinov3"  # SwiGLU, ratio 6
    for size in ("tiny", "small", "base", "large"):
        assert TAGS[f"dinov3_convnext_{size}"] == ("dinov3", f"convnext_{size}")


# ---------------------------------------------------------------- MoCo v3


@pytest.mark.slow
def test_mocov3_vits16_training_checkpoint(tmp_path):
    ref, sd = vit("vit_small_patch16_224", 32, seed=6, num_heads=12)  # MoCo v3's ViT-S: 12 heads
    enc = sd | mlp_keys("head", [384, 64, 64, 32])  # the 3-layer projector replaced `head`
    state = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    state |= {f"module.momentum_encoder.{k}": v + 1 for k, v in enc.items()}
    state |= {f"module.{k}": v for k, v in mlp_keys("predictor", [32, 64, 32]).items()}
    torch.save(
        {
            "epoch": 300,
            "arch": "vit_small",
            "state_dict": state,
            "optimizer": {"state": {}},
            "scaler": {"scale": 65536.0},
        },
        tmp_path / "vit-s-300ep.pth.tar",
    )
    bb = build_backbone(
        "mocov3_vits16", BuildOptions(weights=tmp_path / "vit-s-300ep.pth.tar", image_size=32)
    )
    close(bb.embed(X16), cls(ref, X16))
    assert bb.feature_kind == "cls" and (bb.preprocessing.resize, bb.preprocessing.crop) == (37, 32)
    via = build_backbone(f"ckpt:{tmp_path / 'vit-s-300ep.pth.tar'}", BuildOptions(image_size=32))
    assert via.load_report["family"] == "mocov3" and via.model.blocks[0].attn.num_heads == 12
    assert any(
        d.startswith("state_dict.module.base_encoder.head") for d in via.load_report["dropped"]
    )
    close(via.embed(X16), cls(ref, X16))
    with pytest.raises(
        UserError, match="the tag says 'resnet50' but the file's 'arch' entry says 'vit_small'"
    ):
        build_backbone("mocov3_r50", BuildOptions(weights=tmp_path / "vit-s-300ep.pth.tar"))


# ---------------------------------------------------------------- MAE


@pytest.mark.slow
def test_mae_vitb16_pretrain_checkpoint_with_decoder(tmp_path):
    ref, sd = vit("vit_base_patch16_224", 32, seed=7)
    decoder = {
        "mask_token": torch.zeros(1, 1, 512),
        "decoder_embed.weight": torch.randn(512, 768),
        "decoder_embed.bias": torch.zeros(512),
        "decoder_pos_embed": torch.zeros(1, 5, 512),
        "decoder_blocks.0.norm1.weight": torch.ones(512),
        "decoder_norm.weight": torch.ones(512),
        "decoder_norm.bias": torch.zeros(512),
        "decoder_pred.weight": torch.randn(768, 512),
        "decoder_pred.bias": torch.zeros(768),
    }
    torch.save({"model": sd | decoder}, tmp_path / "mae_pretrain_vit_base.pth")
    bb = build_backbone(
        "mae_vitb16", BuildOptions(weights=tmp_path / "mae_pretrain_vit_base.pth", image_size=32)
    )
    assert bb.feature_kind == "cls" and bb.preprocessing.interpolation == "bicubic"
    close(bb.embed(X16), cls(ref, X16))  # MAE's linear probe: class token after the final norm
    via = build_backbone(
        f"ckpt:{tmp_path / 'mae_pretrain_vit_base.pth'}", BuildOptions(image_size=32)
    )
    assert via.load_report["family"] == "mae" and via.load_report["dropped_count"] == len(decoder)
    close(via.embed(X16), cls(ref, X16))


@pytest.mark.slow
def test_mae_vith14_finetuned_global_pool_layout(tmp_path):
    """Fine-tuned MAE: `norm` deleted, `fc_norm` on the mean patch token, a `head` (ViT-H/14
    width and heads, 2 blocks)."""
    ref, sd = vit("vit_huge_patch14_224", 28, seed=8, depth=2, global_pool="avg")
    assert "fc_norm.weight" in sd and "norm.weight" not in sd
    torch.save(
        {"model": sd | {"head.weight": torch.randn(1000, 1280), "head.bias": torch.zeros(1000)}},
        tmp_path / "mae_finetuned_vit_huge.pth",
    )
    bb = build_backbone(
        f"ckpt:{tmp_path / 'mae_finetuned_vit_huge.pth'}", BuildOptions(image_size=28)
    )
    assert bb.feature_kind == "model" and "fine-tuned" in bb.load_report["format"]
    assert bb.model.blocks[0].attn.num_heads == 16
    with torch.no_grad():
        close(bb.embed(X14), ref(X14))


# ---------------------------------------------------------------- DINO


@pytest.mark.slow
def test_dino_vits16_hub_file_and_training_checkpoint(tmp_path, vits16):
    ref, sd = vits16
    torch.save(sd, tmp_path / "dino_deitsmall16_pretrain.pth")
    bb = build_backbone(
        "dino_vits16",
        BuildOptions(weights=tmp_path / "dino_deitsmall16_pretrain.pth", image_size=32),
    )
    close(bb.embed(X16), cls(ref, X16))
    assert (
        build_backbone(
            f"ckpt:{tmp_path / 'dino_deitsmall16_pretrain.pth'}", BuildOptions(image_size=32)
        ).load_report["family"]
        == "dino"
    )
    head = {
        "head.mlp.0.weight": torch.randn(64, 384),
        "head.last_layer.weight_v": torch.randn(128, 64),
    }
    train = {
        "student": {f"module.backbone.{k}": v + 1 for k, v in sd.items()}
        | {f"module.{k}": v for k, v in head.items()},
        "teacher": {f"backbone.{k}": v for k, v in sd.items()} | head,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 128)},
        "fp16_scaler": {"scale": 1024.0},
    }
    torch.save(train, tmp_path / "checkpoint.pth")
    via = build_backbone(f"ckpt:{tmp_path / 'checkpoint.pth'}", BuildOptions(image_size=32))
    assert (
        via.load_report["family"] == "dino"
        and via.load_report["format"] == "dino (teacher.backbone)"
    )
    close(via.embed(X16), cls(ref, X16))  # the teacher, as DINO evaluates


# ---------------------------------------------------------------- DINOv2


@pytest.mark.slow
def test_dinov2_reg4_hub_layout(tmp_path):
    ref, sd = vit("vit_small_patch14_reg4_dinov2", 28, seed=9)
    r = 0.1 * torch.randn(1, 1, 384)  # DINOv2 keeps the class token's position in pos_embed
    official = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    official |= {
        "register_tokens": sd["reg_token"],
        "cls_token": sd["cls_token"] - r,
        "pos_embed": torch.cat([r, sd["pos_embed"]], dim=1),
        "mask_token": torch.zeros(1, 384),
    }
    torch.save(official, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    bb = build_backbone(
        "dinov2_vits14_reg",
        BuildOptions(weights=tmp_path / "dinov2_vits14_reg4_pretrain.pth", image_size=28),
    )
    close(bb.embed(X14), cls(ref, X14))
    assert bb.load_report["dropped"] == ["mask_token"]


@pytest.mark.slow
def test_dinov2_chunked_teacher_checkpoint(tmp_path):
    ref, sd = vit("vit_small_patch14_dinov2", 28, seed=10)
    backbone = {}
    for k, v in sd.items():  # block_chunks=4: blocks.<chunk>.<global index>
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]
        backbone[f"backbone.{k}"] = v
    teacher = backbone | {
        "backbone.mask_token": torch.zeros(1, 384),
        "dino_head.mlp.0.weight": torch.randn(32, 384),
        "ibot_head.mlp.0.weight": torch.randn(32, 384),
    }
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    via = build_backbone(f"ckpt:{tmp_path / 'teacher_checkpoint.pth'}", BuildOptions(image_size=28))
    assert via.load_report["family"] == "dinov2" and "chunked" in via.load_report["format"]
    close(via.embed(X14), cls(ref, X14))
    bb = build_backbone(
        "dinov2_vits14", BuildOptions(weights=tmp_path / "teacher_checkpoint.pth", image_size=28)
    )
    close(bb.embed(X14), cls(ref, X14))


@pytest.mark.slow
def test_dinov2_giant_swiglu_w12_w3_keys(tmp_path):
    ref, sd = vit("vit_giant_patch14_dinov2", 28, seed=11, depth=2)
    official = {
        k.replace("mlp.fc1.", "mlp.w12.").replace("mlp.fc2.", "mlp.w3."): v for k, v in sd.items()
    }
    assert "blocks.1.mlp.w12.weight" in official
    torch.save(
        official | {"mask_token": torch.zeros(1, 1536)}, tmp_path / "dinov2_vitg14_pretrain.pth"
    )
    via = build_backbone(
        f"ckpt:{tmp_path / 'dinov2_vitg14_pretrain.pth'}", BuildOptions(image_size=28)
    )
    assert via.load_report["family"] == "dinov2" and via.model.blocks[0].attn.num_heads == 24
    close(via.embed(X14), cls(ref, X14))


# ---------------------------------------------------------------- DINOv3


def to_dinov3(sd: dict, head_dim: int = 64) -> dict:
    """timm Eva names -> DINOv3's (written from its vision_transformer.py and layers). The
    RoPE periods are the official base-100 schedule (rope_position_encoding.py), which the
    timm reference recomputes: ssl-eval reads the file's (tests/test_variants_dinov3.py)."""
    k = torch.arange(head_dim // 4, dtype=torch.float32)
    out = {
        "mask_token": torch.zeros(1, sd["cls_token"].shape[-1]),
        "rope_embed.periods": 100.0 ** (2 * k / (head_dim // 2)),
    }
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    for k, v in sd.items():
        if k.endswith("attn.v_bias"):
            continue
        if k.endswith("attn.q_bias"):  # one q/k/v bias whose k third bias_mask zeroes
            p = k[: -len("q_bias")]
            out[p + "qkv.bias"] = torch.cat([v, torch.randn_like(v), sd[p + "v_bias"]])
            out[p + "qkv.bias_mask"] = torch.cat(
                [torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)]
            )
            continue
        k = (
            k.replace("reg_token", "storage_tokens")
            .replace("gamma_1", "ls1.gamma")
            .replace("gamma_2", "ls2.gamma")
        )
        if swiglu:
            k = (
                k.replace(".mlp.fc1_g.", ".mlp.w1.")
                .replace(".mlp.fc1_x.", ".mlp.w2.")
                .replace(".mlp.fc2.", ".mlp.w3.")
            )
        out[k] = v
    return out


@pytest.mark.slow
def test_dinov3_vits16_official_layout(tmp_path):
    ref, sd = vit("vit_small_patch16_dinov3_qkvb", 32, seed=12, global_pool="token")
    torch.save(to_dinov3(sd), tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    bb = build_backbone(
        "dinov3_vits16",
        BuildOptions(
            weights=tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", image_size=32
        ),
    )
    close(bb.embed(X16), cls(ref, X16))
    assert bb.preprocessing.interpolation == "bicubic" and "bias_mask" in bb.load_report["note"]
    assert "mask_token" in bb.load_report["dropped"]
    assert "rope_embed.periods" not in bb.load_report["dropped"]  # used: timm's RoPE holds them
    assert bb.load_report["rope_periods"] == "the file's (equal to the base-100 schedule)"


@pytest.mark.slow
def test_dinov3_swiglu_and_timm_layouts_by_detection(tmp_path):
    """ViT-S+/16 (SwiGLU w1/w2/w3) official layout, and timm's own (bias-free) hub layout."""
    ref, sd = vit("vit_small_plus_patch16_dinov3_qkvb", 32, seed=13, global_pool="token", depth=2)
    official = to_dinov3(sd)
    assert "blocks.0.mlp.w1.weight" in official and "blocks.0.mlp.w3.weight" in official
    torch.save(official, tmp_path / "splus.pth")
    via = build_backbone(f"ckpt:{tmp_path / 'splus.pth'}", BuildOptions(image_size=32))
    assert via.load_report["family"] == "dinov3"
    close(via.embed(X16), cls(ref, X16))
    ref2, sd2 = vit("vit_small_patch16_dinov3", 32, seed=14, global_pool="token", depth=2)
    torch.save(sd2, tmp_path / "timm_layout.pth")
    via2 = build_backbone(f"ckpt:{tmp_path / 'timm_layout.pth'}", BuildOptions(image_size=32))
    assert (
        via2.load_report["family"] == "dinov3"
        and "blocks.0.attn.q_bias" not in via2.model.state_dict()
    )
    close(via2.embed(X16), cls(ref2, X16))


@pytest.mark.slow
def test_dinov3_convnext_tiny_official_layout(tmp_path):
    ref, sd = vit("convnext_tiny", 32, seed=15)
    official = {}
    for k, v in sd.items():  # timm -> DINOv3/FB ConvNeXt names
        k = k.replace("stem.", "downsample_layers.0.").replace("head.norm.", "norm.")
        k = (
            k.replace("conv_dw.", "dwconv.")
            .replace("mlp.fc1.", "pwconv1.")
            .replace("mlp.fc2.", "pwconv2.")
        )
        parts = k.split(".")
        if parts[0] == "stages" and parts[2] == "downsample":
            k = ".".join(["downsample_layers", parts[1]] + parts[3:])
        elif parts[0] == "stages" and parts[2] == "blocks":
            k = ".".join(["stages", parts[1]] + parts[3:])
        official[k] = v
    assert "downsample_layers.1.1.weight" in official and "stages.2.8.gamma" in official
    torch.save(official, tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")
    bb = build_backbone(
        "dinov3_convnext_tiny",
        BuildOptions(weights=tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth"),
    )
    with torch.no_grad():
        expected = ref(X16)  # LayerNorm of the average pool
    close(bb.embed(X16), expected)
    via = build_backbone(
        f"ckpt:{tmp_path / 'dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth'}", BuildOptions()
    )
    assert via.load_report["family"] == "dinov3" and via.feature_kind == "model"
    close(via.embed(X16), expected)
