"""hf: Hugging Face vision models through transformers, offline: tiny randomly initialised
models written with save_pretrained (with their image processor), read by ssl-eval and compared
with transformers' own forward on the processor's pixels, on images already at the model's
size (PIL's and torchvision's resampling differ slightly). The feature compared is the one the
paper evaluates: DINOv2 and MAE the class token, I-JEPA the mean patch token, SigLIP the
pooled output."""

import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed ([hf] extra)")

from safetensors.torch import load_file, save_file  # noqa: E402

from ssl_eval.backbones.base import BuildOptions  # noqa: E402
from ssl_eval.backbones.catalog import build_backbone  # noqa: E402
from ssl_eval.core.errors import UserError  # noqa: E402
from ssl_eval.core.files import sha256_file  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def save(folder, kind):
    """A tiny random model of ``kind`` and its image processor, saved with save_pretrained."""
    import transformers as tf

    torch.manual_seed(0)
    vit = dict(TINY, image_size=32, patch_size=8)
    if kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**vit))
        proc = tf.BitImageProcessor(
            size={"shortest_edge": 36},
            crop_size={"height": 32, "width": 32},
            image_mean=MEAN,
            image_std=STD,
            resample=3,
        )
    elif kind == "mae":  # the pre-training model: the encoder plus the decoder ssl-eval drops
        model = tf.ViTMAEForPreTraining(
            tf.ViTMAEConfig(
                **vit,
                decoder_hidden_size=16,
                decoder_num_hidden_layers=1,
                decoder_num_attention_heads=2,
                decoder_intermediate_size=32,
            )
        )
        proc = tf.ViTImageProcessor(
            size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
        )
    elif kind == "ijepa":
        model = tf.IJepaModel(tf.IJepaConfig(**vit))
        proc = tf.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3)
    elif kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**vit))
        proc = tf.SiglipImageProcessor(size={"height": 32, "width": 32})
    elif kind == "dinov3":  # a class token and 4 registers in front of the patches
        model = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**vit, num_register_tokens=4))
        proc = tf.BitImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def images(size, n=4):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def library_features(folder, imgs, kind):
    """transformers' own forward on its processor's pixels, read as the paper reads it."""
    from PIL import Image

    proc = transformers.AutoImageProcessor.from_pretrained(folder)
    extra = {"mask_ratio": 0.0} if kind == "mae" else {}  # MAE's model masks 75% by default
    model = transformers.AutoModel.from_pretrained(folder, use_kernels=False, **extra).eval()
    with torch.no_grad():
        out = model(**proc(images=[Image.fromarray(a) for a in imgs], return_tensors="pt"))
    if kind in ("dinov2", "mae"):
        return out.last_hidden_state[:, 0]
    if kind == "ijepa":
        return out.last_hidden_state.mean(dim=1)
    return out.pooler_output


def ours(bb, imgs):
    pre = bb.preprocessing
    u8 = torch.stack([pre.geometric(torch.from_numpy(a).permute(2, 0, 1)) for a in imgs])
    return bb.embed(pre.normalise(u8))


@pytest.mark.parametrize(
    "kind, size, feature",
    [("dinov2", 36, "cls"), ("mae", 32, "cls"), ("ijepa", 32, "avgpool"), ("siglip", 32, "model")],
)
@pytest.mark.slow
def test_features_equal_the_librarys_forward(tmp_path, kind, size, feature):
    folder = save(tmp_path / kind, kind)
    bb = build_backbone(f"hf:{folder}")
    assert bb.feature_kind == feature and bb.load_report["feature_kind_from"]
    imgs = images(size)
    mine, theirs = ours(bb, imgs), library_features(folder, imgs, kind)
    assert mine.shape == theirs.shape == (4, 32)
    assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()
    rep = bb.load_report
    assert rep["family"] == "hf" and rep["missing"] == [] and rep["unexpected"] == []
    assert bb.weights.sha256 == sha256_file(folder / "model.safetensors")


def test_preprocessing_comes_from_the_processor_config(tmp_path):
    pre = build_backbone(f"hf:{save(tmp_path / 'd', 'dinov2')}").preprocessing
    assert (pre.resize, pre.crop, pre.interpolation) == (36, 32, "bicubic")
    assert pre.mean == pytest.approx(MEAN) and pre.std == pytest.approx(STD)
    bb = build_backbone(f"hf:{save(tmp_path / 's', 'siglip')}")
    pre = bb.preprocessing
    assert (pre.resize, pre.crop, pre.mean, pre.std) == (32, 32, (0.5,) * 3, (0.5,) * 3)
    assert "ignoring the aspect ratio" in bb.load_report["preprocessing_notes"][0]


def test_mae_decoder_is_dropped_and_reported(tmp_path):
    bb = build_backbone(f"hf:{save(tmp_path / 'mae', 'mae')}")
    assert bb.load_report["dropped_count"] > 0
    assert all(k.startswith("decoder") for k in bb.load_report["dropped"])


def test_loading_is_strict(tmp_path):
    folder = save(tmp_path / "d", "dinov2")
    weights = folder / "model.safetensors"
    sd = load_file(weights)
    save_file({k: v for k, v in sd.items() if not k.endswith("layernorm.weight")}, weights)
    with pytest.raises(UserError, match="missing") as e:
        build_backbone(f"hf:{folder}")
    assert "\n" not in str(e.value)
    save_file({**sd, "projector.weight": torch.zeros(2)}, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="unexpected"):
        build_backbone(f"hf:{folder}")


def test_no_class_token_refuses_cls(tmp_path):
    folder = save(tmp_path / "j", "ijepa")
    with pytest.raises(UserError, match="no class token"):
        build_backbone(f"hf:{folder}", BuildOptions(feature_kind="cls"))


def test_hub_id_offline_names_the_download_command():
    with pytest.raises(UserError, match="hf download facebook/dinov2-small") as e:
        build_backbone("hf:facebook/dinov2-small")
    assert "\n" not in str(e.value)


def test_hub_id_is_read_from_the_local_cache(tmp_path, monkeypatch):
    """The cache layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/REV}."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-dinov2"
    save(repo / "snapshots" / ("a" * 40), "dinov2")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    bb = build_backbone("hf:org/tiny-dinov2")
    assert (
        bb.feature_kind == "cls" and "Hugging Face cache" in bb.load_report["architecture"]["from"]
    )


def test_without_the_extra_the_error_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(UserError, match=r'pip install "ssleval-bench\[hf\]"') as e:
        build_backbone(f"hf:{tmp_path}")
    assert "\n" not in str(e.value)


def test_two_tower_siglip_reads_its_image_tower(tmp_path):
    """A SiglipModel folder (both towers): the vision model alone is built, the text tower and
    the logit scale/bias are dropped and listed; the feature is get_image_features."""
    import transformers as tf

    torch.manual_seed(0)
    text = dict(TINY, num_hidden_layers=1, vocab_size=100, max_position_embeddings=16)
    model = tf.SiglipModel(
        tf.SiglipConfig(vision_config=dict(TINY, image_size=32, patch_size=8), text_config=text)
    ).eval()
    model.save_pretrained(tmp_path / "s")
    tf.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "s")
    bb = build_backbone(f"hf:{tmp_path / 's'}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=x)
    ref = getattr(ref, "pooler_output", ref)
    assert bb.feature_kind == "model" and torch.allclose(bb.embed(x), ref, atol=1e-5)
    assert "logit_scale" in bb.load_report["dropped"]
    assert bb.load_report["architecture"]["class"] == "SiglipVisionModel"


def test_registers_are_skipped_by_avgpool(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.DINOv3ViTModel(
        tf.DINOv3ViTConfig(**TINY, image_size=32, patch_size=8, num_register_tokens=4)
    ).eval()
    model.save_pretrained(tmp_path / "d3")
    tf.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(tmp_path / "d3")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model(pixel_values=x).last_hidden_state  # class, 4 registers, 16 patches
    cls = build_backbone(f"hf:{tmp_path / 'd3'}")
    assert cls.feature_kind == "cls" and torch.allclose(cls.embed(x), tokens[:, 0], atol=1e-5)
    avg = build_backbone(f"hf:{tmp_path / 'd3'}", BuildOptions(feature_kind="avgpool"))
    assert torch.allclose(avg.embed(x), tokens[:, 5:].mean(dim=1), atol=1e-5)
    assert avg.load_report["feature_kind_from"] == "--feature-kind"


def test_another_image_size_interpolates_position_embeddings(tmp_path):
    bb = build_backbone(f"hf:{save(tmp_path / 'm', 'mae')}", BuildOptions(image_size=48))
    assert bb.preprocessing.crop == 48 and bb.embed(torch.randn(2, 3, 48, 48)).shape == (2, 32)
    assert any("interpolate_pos_encoding" in n for n in bb.load_report["preprocessing_notes"])


# ---------------------------------------------------------------- layers:N


def _block_reference(model, x, final_norm, prefix, n):
    """[class token, mean patch token] of each of the last ``n`` blocks, after the final norm,
    from transformers' own outputs: the last block is the model's ``last_hidden_state`` (its
    own norm), the one before it ``output_hidden_states``' entry with the final norm's weights
    applied here by hand (``F.layer_norm``), registers (``prefix`` tokens) left out of the mean."""
    import torch.nn.functional as F

    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == 1 + model.config.num_hidden_layers  # the embeddings, then each block
    w, b, eps = final_norm.weight, final_norm.bias, final_norm.eps
    blocks = [F.layer_norm(h, (h.shape[-1],), w, b, eps) for h in hidden[-n:-1]]
    blocks.append(out.last_hidden_state)
    return torch.cat([t for h in blocks for t in (h[:, 0], h[:, prefix:].mean(dim=1))], dim=1)


@pytest.mark.parametrize("kind, prefix", [("dinov2", 1), ("mae", 1), ("dinov3", 5)])
def test_layers_are_the_blocks_through_the_final_norm(tmp_path, kind, prefix):
    """layers:N of a Hugging Face tower: per block, the class token and the mean patch token
    (DINOv3's registers left out) after the model's final norm (Dinov2Model and ViTMAEModel:
    layernorm; DINOv3ViTModel: norm); layers:1's class token is the cls feature."""
    from dataclasses import replace

    folder = save(tmp_path / kind, kind)
    extra = {"mask_ratio": 0.0} if kind == "mae" else {}  # MAE keeps every patch (shuffled)
    model = transformers.AutoModel.from_pretrained(folder, use_kernels=False, **extra).eval()
    final_norm = model.norm if kind == "dinov3" else model.layernorm
    bb = build_backbone(f"hf:{folder}", BuildOptions(feature_kind="layers:2"))
    x = torch.randn(3, 3, 32, 32)
    for n in (1, 2):
        got = replace(bb, feature_kind=f"layers:{n}").embed(x)
        want = _block_reference(model, x, final_norm, prefix, n)
        assert got.shape == (3, 2 * n * 32)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    cls = replace(bb, feature_kind="cls").embed(x)
    torch.testing.assert_close(replace(bb, feature_kind="layers:1").embed(x)[:, :32], cls)
    with pytest.raises(UserError, match="has 2; ask for at most 2") as e:
        replace(bb, feature_kind="layers:3").embed(x)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kind, says",
    [
        ("ijepa", "I-JEPA has none.*use avgpool"),
        ("siglip", "SigLIP has none.*use model or avgpool"),
    ],
)
def test_layers_without_a_class_token_is_one_line(tmp_path, kind, says):
    bb = build_backbone(f"hf:{save(tmp_path / kind, kind)}", BuildOptions(feature_kind="layers:1"))
    with pytest.raises(UserError, match=f"read each block's class token; {says}") as e:
        bb.embed(torch.randn(1, 3, 32, 32))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_linear_dinov2_runs_on_a_hf_tower_from_the_cli(tmp_path, capsys):
    """`ssl-eval run --protocol linear@dinov2` on a tiny Dinov2Model: the heads read its
    layers:2 row; a layer count beyond its 2 blocks is one line and a non-zero exit."""
    from ssl_eval.cli import main
    from ssl_eval.records.store import load_records

    folder = save(tmp_path / "d", "dinov2")
    common = ["--dataset", "digits", "--no-progress", "--results-dir", str(tmp_path / "r")]
    args = ["run", "--backbone", f"hf:{folder}", "--protocol", "linear@dinov2"]
    sets = ["--set", "n_last_blocks=[1,2]", "--set", "iterations=20", "--set", "batch_size=256"]
    assert main(args + sets + common + ["--cache-dir", str(tmp_path / "c")]) == 0
    rec = next(r for r in load_records(tmp_path / "r") if r.metric == "top1")
    read = rec.details["features_read"]
    assert read["feature_kind"] == "layers:2" and read["layout"]["blocks"] == [-2, -1]
    assert len(rec.details["val_top1"]) == 52 and rec.ci95 is not None
    deep = ["--set", "n_last_blocks=[1,3]", "--set", "iterations=5"]
    assert main(args + deep + common + ["--cache-dir", str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err
    assert "has 2; ask for at most 2" in err and "Traceback" not in err
