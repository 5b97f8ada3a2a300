import textwrap

import pytest
import timm
import torch

from ssl_eval.backbones import BuildOptions, build_backbone, list_backbones
from ssl_eval.backbones.registry import get_spec
from ssl_eval.errors import UserError


def test_random_backbone_is_seeded_and_always_eval():
    a = build_backbone("random:resnet10t", BuildOptions(image_size=32))
    b = build_backbone("random:resnet10t", BuildOptions(image_size=32))
    assert a.weights.sha256 == b.weights.sha256 and a.weights.source.startswith("random-init")
    x = torch.randn(4, 3, 32, 32)
    ref = a.embed(x)
    a.model.train()  # a caller leaving BatchNorm in train mode must not change features
    torch.testing.assert_close(a.embed(x), ref)
    assert not a.model.training


def test_unknown_timm_model_suggests():
    with pytest.raises(UserError, match="resnet18"):
        build_backbone("random:resnet81", BuildOptions())


def test_timm_weights_file_loads_strictly_and_reports_dropped_head(tmp_path):
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "w.pth")
    bb = build_backbone("timm:resnet10t", BuildOptions(weights=tmp_path / "w.pth", image_size=32))
    assert bb.load_report["dropped"] == ["fc.bias", "fc.weight"]
    assert bb.load_report["missing"] == [] and bb.load_report["unexpected"] == []
    assert len(bb.weights.sha256) == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.embed(x), ref.forward_head(ref.forward_features(x), pre_logits=True), atol=1e-5, rtol=1e-5)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="does not match the architecture"):
        build_backbone("timm:resnet10t", BuildOptions(weights=tmp_path / "r18.pth"))


def test_code_running_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refusing to load"):
        build_backbone("timm:resnet10t", BuildOptions(weights=tmp_path / "evil.pth"))


def test_truncated_file_is_a_clear_error(tmp_path):
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        build_backbone("timm:resnet10t", BuildOptions(weights=tmp_path / "cut.pth"))


def _official_dinov2_file(path):
    """A DINOv2 hub checkpoint layout: flat state dict, 518-pixel position embeddings, mask_token."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518).eval()
    sd = dict(ref.state_dict())
    sd["mask_token"] = torch.zeros(1, ref.embed_dim)
    torch.save(sd, path)
    return ref


def test_dinov2_official_layout_from_weights_folder(tmp_path, monkeypatch):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    monkeypatch.setenv("SSL_EVAL_WEIGHTS_DIR", str(wdir))
    assert get_spec("dinov2").status() == "downloadable"
    ref = _official_dinov2_file(wdir / "dinov2_vits14_pretrain.pth")
    assert get_spec("dinov2").status().startswith("present")
    # at the checkpoint's own resolution the features are the reference model's class token
    bb = build_backbone("dinov2", BuildOptions(image_size=518))
    assert bb.tag == "dinov2_vits14" and bb.feature_kind == "cls"
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        torch.testing.assert_close(bb.embed(x), ref.forward_features(x)[:, 0], atol=1e-5, rtol=1e-5)
    # at DINOv2's evaluation size the position embeddings are resampled to 16x16
    bb224 = build_backbone("dinov2", BuildOptions())
    assert bb224.preprocessing.resize == 256 and bb224.preprocessing.crop == 224
    assert bb224.preprocessing.interpolation == "bicubic"
    assert bb224.embed(torch.randn(2, 3, 224, 224)).shape == (2, 384)


def test_missing_weights_offline_names_the_file():
    with pytest.raises(UserError, match=r"dinov2_vits14_pretrain\.pth.*SSL_EVAL_WEIGHTS_DIR"):
        build_backbone("dinov2", BuildOptions(offline=True))


PLUGIN = textwrap.dedent("""
    import torch
    from ssl_eval.backbones import Backbone
    from ssl_eval.data.transforms import Preprocessing

    class Mean(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))
        def forward(self, x):
            return x.mean(dim=(2, 3)) * self.scale

    def module_factory():
        return Mean()

    def backbone_factory(weights=None, image_size=None):
        return Backbone("mine", Mean(), Preprocessing(resize=16, crop=16), "model")
""")


def test_python_plugin_and_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ssl_eval.backbones]\nmy_backbone = my_plugin:backbone_factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import ssl_eval.backbones.registry as reg
    from ssl_eval.backbones.plugins import register_entry_points

    reg._ensure_loaded()
    register_entry_points()  # the dist-info above is on sys.path only now
    bb = reg.build_backbone("py:my_plugin:module_factory", BuildOptions())
    assert bb.tag == "py:my_plugin:module_factory" and len(bb.weights.sha256) == 64
    assert bb.embed(torch.randn(2, 3, 8, 8)).shape == (2, 3)
    names = [n for n, _, _ in reg.list_backbones()]
    assert "my_backbone" in names
    bb2 = reg.build_backbone("my_backbone", BuildOptions())
    assert bb2.tag == "my_backbone" and bb2.preprocessing.crop == 16


def test_list_shows_weight_status():
    rows = {name: status for name, status, _ in list_backbones()}
    assert rows["pixels"] == "none needed" and rows["dinov2_vitb14"] in ("downloadable", "missing")
