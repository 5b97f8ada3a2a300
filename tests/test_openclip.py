"""openclip: CLIP / SigLIP image towers through open_clip, offline: tiny randomly initialised
open_clip models saved in the layout open_clip publishes (open_clip_config.json +
open_clip_model.safetensors, written by open_clip's own save_config_for_hf), read by ssl-eval
and compared with open_clip's encode_image, each side with its own preprocessing, on images
already at the model's size (PIL's and torchvision's resampling differ slightly)."""

import json
import sys

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="open_clip not installed (the [clip] extra)")

from safetensors.torch import load_file, save_file  # noqa: E402

from ssl_eval.backbones.base import BuildOptions  # noqa: E402
from ssl_eval.backbones.catalog import build_backbone  # noqa: E402
from ssl_eval.core.errors import UserError  # noqa: E402
from ssl_eval.core.files import sha256_file  # noqa: E402

TEXT = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
CLIP_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": TEXT,
}
# a SigLIP-style tower: a timm trunk with attention (MAP) pooling and no projection
SIGLIP_CFG = {
    "embed_dim": 64,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 160,  # timm's test_vit is built for 160 pixels
        "timm_model_name": "test_vit",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {**TEXT, "width": 64, "no_causal_mask": True, "pool_type": "last"},
}
OPENAI = {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD}
HALF = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def publish(folder, cfg, norm, resize_mode, seed=0):
    """A random open_clip model in its published layout, as push_to_hf_hub's save_for_hf
    writes it (weights + open_clip_config.json; the tokenizer files are not read)."""
    from open_clip.push_to_hf_hub import save_config_for_hf

    torch.manual_seed(seed)
    model_cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
    model = model_cls(**{k: v for k, v in cfg.items() if k != "custom_text"}).eval()
    model.visual.image_mean, model.visual.image_std = norm["mean"], norm["std"]
    model.visual.preprocess_cfg = {"interpolation": "bicubic", "resize_mode": resize_mode}
    folder.mkdir(parents=True)
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    save_config_for_hf(model, folder / "open_clip_config.json", cfg)
    return folder


def images(size, n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def both_sides(folder, imgs, **opt):
    """(ssl-eval backbone, its features, open_clip's model, open_clip's encode_image)."""
    from PIL import Image

    bb = build_backbone(f"openclip:{folder}", BuildOptions(**opt))
    u8 = torch.stack(
        [bb.preprocessing.geometric(torch.from_numpy(a).permute(2, 0, 1)) for a in imgs]
    )
    ours = bb.embed(bb.preprocessing.normalise(u8))
    ref, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    ref.eval()
    with torch.no_grad():
        theirs = ref.encode_image(torch.stack([preprocess(Image.fromarray(a)) for a in imgs]))
    return bb, ours, ref, theirs


def test_clip_vit_features_equal_encode_image(tmp_path):
    folder = publish(tmp_path / "clip", CLIP_CFG, OPENAI, "shortest")
    bb, ours, ref, theirs = both_sides(folder, images(32))
    assert ours.shape == theirs.shape == (4, 16)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    pre = bb.preprocessing
    assert (pre.resize, pre.crop, pre.interpolation) == (32, 32, "bicubic")
    assert pre.mean == pytest.approx(OPENAI["mean"]) and pre.std == pytest.approx(OPENAI["std"])
    rep = bb.load_report
    assert rep["family"] == "openclip" and rep["missing"] == [] and rep["unexpected"] == []
    assert rep["architecture"]["quick_gelu"] is True and rep["kept"] == len(ref.visual.state_dict())
    assert "logit_scale" in rep["dropped"] and rep["dropped_count"] > 0  # the text tower, listed
    weights = folder / "open_clip_model.safetensors"
    assert bb.weights.source == "file" and bb.weights.sha256 == sha256_file(weights)


def test_cls_is_the_token_before_the_projection(tmp_path):
    folder = publish(tmp_path / "clip", CLIP_CFG, OPENAI, "shortest")
    bb, _, ref, _ = both_sides(folder, images(32, n=1))
    x = torch.randn(3, 3, 32, 32)
    cls = build_backbone(f"openclip:{folder}", BuildOptions(feature_kind="cls")).embed(x)
    proj = ref.visual.proj.detach().clone()
    ref.visual.proj = None  # open_clip's own forward, stopped before the projection
    with torch.no_grad():
        assert torch.allclose(cls, ref.visual(x), atol=1e-5)
    assert torch.allclose(cls @ proj, bb.embed(x), atol=1e-5)


def test_siglip_style_timm_tower_features_equal_encode_image(tmp_path):
    folder = publish(tmp_path / "siglip", SIGLIP_CFG, HALF, "squash")
    bb, ours, _, theirs = both_sides(folder, images(160, n=2))
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert bb.preprocessing.mean == (0.5, 0.5, 0.5) and bb.preprocessing.crop == 160
    assert "squash" in bb.load_report["preprocessing_notes"][0]  # square images only: recorded
    cls = build_backbone(f"openclip:{folder}", BuildOptions(feature_kind="cls"))
    x = torch.randn(2, 3, 160, 160)
    assert torch.allclose(cls.embed(x), bb.embed(x), atol=1e-5)  # no projection: pooled = embedding


def test_loading_is_strict(tmp_path):
    folder = publish(tmp_path / "clip", CLIP_CFG, OPENAI, "shortest")
    weights = folder / "open_clip_model.safetensors"
    sd = load_file(weights)
    save_file({k: v for k, v in sd.items() if k != "visual.ln_post.weight"}, weights)
    with pytest.raises(UserError, match="1 missing"):
        build_backbone(f"openclip:{folder}")
    save_file({**sd, "visual.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(UserError, match="unexpected"):
        build_backbone(f"openclip:{folder}")
    save_file({**sd, "projector.weight": torch.zeros(2)}, weights)
    with pytest.raises(UserError, match="neither open_clip's image tower nor"):
        build_backbone(f"openclip:{folder}")


def test_arch_with_weights_file_and_image_size(tmp_path):
    """openclip:ARCH with --weights: open_clip's built-in config; --image-size resamples the
    position embedding with open_clip's own resize_pos_embed."""
    folder = publish(tmp_path / "clip", CLIP_CFG, OPENAI, "shortest")
    (tmp_path / "ssl-eval-tiny-clip.json").write_text(json.dumps(CLIP_CFG))
    open_clip.add_model_config(tmp_path / "ssl-eval-tiny-clip.json")  # a built-in name now
    opt = BuildOptions(weights=folder / "open_clip_model.safetensors")
    bb = build_backbone("openclip:ssl-eval-tiny-clip", opt)
    x = torch.randn(2, 3, 32, 32)
    same = build_backbone(f"openclip:{folder}").embed(x)
    assert torch.allclose(bb.embed(x), same, atol=1e-6)
    big = build_backbone(
        "openclip:ssl-eval-tiny-clip", BuildOptions(weights=opt.weights, image_size=48)
    )
    assert big.preprocessing.crop == 48 and big.embed(torch.randn(1, 3, 48, 48)).shape == (1, 16)
    assert "resize_pos_embed" in big.load_report["format"]
    with pytest.raises(UserError, match="names no weights"):
        build_backbone("openclip:ssl-eval-tiny-clip")


def test_named_tags_carry_open_clips_settings():
    from ssl_eval.backbones.families.openclip import tag_config

    for arch in ("ViT-B-16", "ViT-L-14"):
        cfg, pp, repo = tag_config(arch, "openai")
        assert cfg["quick_gelu"] is True and tuple(pp["mean"]) == OPENAI["mean"]
        assert pp["resize_mode"] == "shortest" and pp["interpolation"] == "bicubic"
        assert repo.startswith("timm/") and pp["size"] == 224
    cfg, pp, repo = tag_config("ViT-B-16-SigLIP2", "webli")
    assert tuple(pp["mean"]) == (0.5, 0.5, 0.5) and pp["resize_mode"] == "squash"
    assert repo == "timm/ViT-B-16-SigLIP2" and cfg["vision_cfg"]["timm_pool"] == "map"
    with pytest.raises(UserError, match="no pretrained tag"):
        tag_config("ViT-B-16", "nope")
    with pytest.raises(UserError, match="Did you mean"):
        tag_config("ViT-B-61", None)


def test_offline_without_a_local_copy_names_the_download_command():
    for name in ("clip_vitb16", "openclip:ViT-L-14/openai", "siglip2_vitb16"):
        with pytest.raises(UserError, match="hf download timm/") as e:
            build_backbone(name)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="hf download org/model"):
        build_backbone("openclip:hf-hub:org/model")


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(UserError, match=r'pip install "ssleval-bench\[clip\]"') as e:
        build_backbone(f"openclip:{tmp_path}")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- layers:N


def _rows(blocks, n, prefix=1):
    """[class token, mean patch token] of each of the last ``n`` normed blocks."""
    return torch.cat([t for h in blocks[-n:] for t in (h[:, 0], h[:, prefix:].mean(dim=1))], 1)


def _clip_blocks_by_hand(visual, x):
    """open_clip's ViT walked here one resblock at a time: conv1 patches behind the class
    embedding, the position embedding, ln_pre, each resblock (in the layout the transformer
    runs: LND unless ``batch_first``), and ln_post, the final norm, on every block's output."""
    t = visual.conv1(x).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.reshape(1, 1, -1).expand(t.shape[0], 1, -1)
    h = visual.ln_pre(torch.cat([cls, t], dim=1) + visual.positional_embedding)
    lnd = not getattr(visual.transformer, "batch_first", False)
    outs = []
    for blk in visual.transformer.resblocks:
        h = blk(h.transpose(0, 1)).transpose(0, 1) if lnd else blk(h)
        outs.append(visual.ln_post(h))
    return outs


def test_clip_layers_are_the_resblocks_through_ln_post(tmp_path):
    from dataclasses import replace

    folder = publish(tmp_path / "clip", CLIP_CFG, OPENAI, "shortest")
    bb = build_backbone(f"openclip:{folder}", BuildOptions(feature_kind="layers:2"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        blocks = _clip_blocks_by_hand(bb.model.visual, x)
    for n in (1, 2):
        got = replace(bb, feature_kind=f"layers:{n}").embed(x)
        assert got.shape == (3, 2 * n * 32)
        torch.testing.assert_close(got, _rows(blocks, n), rtol=1e-5, atol=1e-5)
    cls = replace(bb, feature_kind="cls").embed(x)  # the pooled token before the projection
    torch.testing.assert_close(replace(bb, feature_kind="layers:1").embed(x)[:, :32], cls)
    with pytest.raises(UserError, match="has 2; ask for at most 2") as e:
        replace(bb, feature_kind="layers:3").embed(x)
    assert "\n" not in str(e.value)


def test_timm_trunk_layers_are_the_trunks_blocks_through_its_norm(tmp_path):
    """A timm trunk (test_vit: a class token, attention pooling) read through the trunk's
    forward_intermediates, against its blocks walked here with its final norm on each."""
    folder = publish(tmp_path / "siglip", SIGLIP_CFG, HALF, "squash")
    bb = build_backbone(f"openclip:{folder}", BuildOptions(feature_kind="layers:2"))
    trunk = bb.model.visual.trunk
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        h = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x)))
        blocks = []
        for blk in trunk.blocks:
            h = blk(h)
            blocks.append(trunk.norm(h))
    want = _rows(blocks, 2, prefix=trunk.num_prefix_tokens)
    torch.testing.assert_close(bb.embed(x), want, rtol=1e-5, atol=1e-5)


def test_layers_without_a_class_token_or_final_norm_is_one_line():
    """SigLIP's timm trunk has no class token; a CoCa-style tower's ln_post follows its
    attentional pooler: both refused in one line naming the single-layer kinds."""
    import timm
    from torch import nn

    from ssl_eval.backbones.base import Backbone, WeightsInfo
    from ssl_eval.backbones.families.openclip import OpenClipImageTower
    from ssl_eval.data.transforms import Preprocessing

    pre = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    siglip = nn.Module()
    siglip.trunk = timm.create_model(
        "test_vit", img_size=32, class_token=False, global_pool="map", num_classes=0
    )
    coca = open_clip.model._build_vision_tower(
        16, {**CLIP_CFG["vision_cfg"], "attentional_pool": True, "attn_pooler_queries": 4}
    )
    x = torch.randn(1, 3, 32, 32)
    for visual, says in ((siglip, "SigLIP pools"), (coca, "attentional pooler")):
        bb = Backbone("t", OpenClipImageTower(visual), pre, "layers:1", WeightsInfo("none", "0"))
        with pytest.raises(UserError, match=f"{says}.*use model, cls or avgpool") as e:
            bb.embed(x)
        assert "\n" not in str(e.value)
