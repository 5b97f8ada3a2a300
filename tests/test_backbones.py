import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from conftest import cli_env

from ssl_eval.backbones import (
    BACKBONES,
    BuildOptions,
    build_backbone,
    catalog,
    families,
    list_backbones,
)
from ssl_eval.backbones.adapters import FAMILIES, TAGS
from ssl_eval.backbones.catalog import get_spec
from ssl_eval.core.errors import UserError
from ssl_eval.data.transforms import Preprocessing


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
        torch.testing.assert_close(
            bb.embed(x),
            ref.forward_head(ref.forward_features(x), pre_logits=True),
            atol=1e-5,
            rtol=1e-5,
        )


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
    ref = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518
    ).eval()
    sd = dict(ref.state_dict())
    sd["mask_token"] = torch.zeros(1, ref.embed_dim)
    torch.save(sd, path)
    return ref


@pytest.mark.slow
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
    # at DINOv2's evaluation size the position embeddings are resized to 16x16 the way DINOv2's
    # own model does it in every forward pass (interpolate_pos_encoding, hub settings)
    bb224 = build_backbone("dinov2", BuildOptions())
    assert bb224.preprocessing.resize == 256 and bb224.preprocessing.crop == 224
    assert bb224.preprocessing.interpolation == "bicubic"
    want = dinov2_interpolate_pos_encoding(ref.pos_embed.detach(), new=16)
    torch.testing.assert_close(bb224.model.pos_embed.detach(), want, atol=1e-5, rtol=1e-5)
    assert "0.1" in bb224.load_report["pos_embed"]["resized"]
    # and the features are the official model's at 224: the same weights, that table
    twin = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224
    ).eval()
    twin.load_state_dict({**ref.state_dict(), "pos_embed": want})
    x224 = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(
            bb224.embed(x224), twin.forward_features(x224)[:, 0], atol=1e-5, rtol=1e-5
        )
    # the defects this catches: timm's antialiased resize and a resize to the size without
    # DINOv2's offset both miss DINOv2's table by far more than the tolerance
    from timm.layers import resample_abs_pos_embed

    for antialias in (True, False):
        other = resample_abs_pos_embed(
            ref.pos_embed.detach(),
            new_size=[16, 16],
            old_size=[37, 37],
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=antialias,
        )
        assert (other - want).abs().max() > 1e-3


def dinov2_interpolate_pos_encoding(
    pos_embed: torch.Tensor, new: int, offset: float = 0.1
) -> torch.Tensor:
    """The reference, written from DINOv2's DinoVisionTransformer.interpolate_pos_encoding with
    the hub models' settings (interpolate_offset=0.1, interpolate_antialias=False): the class
    token's entry kept, the M x M patch table resized bicubically by scale factor
    (new + offset) / M per side, in float32."""
    cls_pe, patch = pos_embed[:, :1], pos_embed[:, 1:].float()
    m, dim = int(math.sqrt(patch.shape[1])), patch.shape[-1]
    sx = sy = float(new + offset) / m
    grid = torch.nn.functional.interpolate(
        patch.reshape(1, m, m, dim).permute(0, 3, 1, 2),
        scale_factor=(sx, sy),
        mode="bicubic",
        antialias=False,
    )
    assert grid.shape[-2:] == (new, new)
    return torch.cat([cls_pe, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


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
    (dist / "entry_points.txt").write_text(
        "[ssl_eval.backbones]\nmy_backbone = my_plugin:backbone_factory\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import ssl_eval.backbones.catalog as reg
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


# ------------------------------------------- the registries, read from themselves (no lists)

_loaded = catalog._ensure_loaded()  # at collection: the parametrisations below see everything
FAMILIES_DIR = Path(families.__file__).parent


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_every_tag_names_a_family_and_describes_itself(tag):
    family, variant = TAGS[tag]
    assert family in FAMILIES and isinstance(variant, str) and variant
    spec = BACKBONES.get(tag)
    assert spec.name == tag and spec.description.strip()
    status = spec.status()
    assert isinstance(status, str) and status


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_name_has_a_spec_that_describes_itself(name):
    spec = BACKBONES.get(name)
    assert spec.name == name or spec.name in BACKBONES  # an alias names another entry's spec
    assert callable(spec.build) and spec.description.strip()
    status = spec.status()
    assert isinstance(status, str) and status


@pytest.mark.parametrize("prefix", [e.name for e in BACKBONES.prefixes()])
def test_every_prefix_says_what_follows_the_colon(prefix):
    entry = next(e for e in BACKBONES.prefixes() if e.name == prefix)
    assert callable(entry.obj) and entry.help.strip()


@pytest.mark.parametrize("name", FAMILIES.names())
def test_every_family_detects_builds_and_describes_itself(name):
    fam = FAMILIES.get(name)
    assert (
        fam.name == name
        and callable(fam.detect)
        and callable(fam.build)
        and fam.description.strip()
    )


# Run in a fresh interpreter: here other tests import family modules themselves. Prints the
# modules imported after the public listing alone, and the modules owning a registration (a
# family, an exact name, a prefix, a folder reader).
DISCOVERY_PROBE = """
import json, sys
from ssl_eval.backbones import BACKBONES, list_backbones
from ssl_eval.backbones.adapters import FAMILIES, FOLDER_READERS
list_backbones()
owners = {e.obj.build.__module__ for e in [*FAMILIES.entries(), *BACKBONES.entries()]}
owners |= {e.obj.__module__ for e in BACKBONES.prefixes()} | {r.build.__module__ for r in FOLDER_READERS}
print(json.dumps({"imported": sorted(sys.modules), "owners": sorted(owners)}))
"""


@pytest.mark.slow
def test_every_file_in_families_is_discovered_and_registers_something(tmp_path):
    """Dropping a module file in backbones/families/ is all a new family needs: the listing
    imports it, and it registers something."""
    on_disk = {
        f"{families.__name__}.{p.stem}" for p in FAMILIES_DIR.glob("*.py") if p.stem != "__init__"
    }
    on_disk |= {f"{families.__name__}.{p.parent.name}" for p in FAMILIES_DIR.glob("*/__init__.py")}
    assert len(on_disk) >= 10 and set(catalog.family_modules()) == on_disk
    out = subprocess.run(
        [sys.executable, "-c", DISCOVERY_PROBE],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        check=True,
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert on_disk <= set(seen["imported"]), (
        f"not discovered: {sorted(on_disk - set(seen['imported']))}"
    )
    assert on_disk <= set(seen["owners"]), (
        f"register nothing: {sorted(on_disk - set(seen['owners']))}"
    )


# ------------------------------------------------------- preprocessing travels as plain data


def _every_preprocessing() -> dict[str, Preprocessing]:
    """Every Preprocessing a family module defines (its papers' evaluation settings)."""
    found = {
        "default": Preprocessing(),
        "sized": Preprocessing(resize=36, crop=32, interpolation="nearest"),
    }
    for name in _loaded:
        for attr, value in vars(sys.modules[name]).items():
            if isinstance(value, Preprocessing):
                found[f"{name.rpartition('.')[2]}.{attr}"] = value
    return found


@pytest.mark.parametrize("key", sorted(_every_preprocessing()))
def test_preprocessing_round_trips_through_a_dict_and_json(key):
    pre = _every_preprocessing()[key]
    d = pre.to_dict()
    assert Preprocessing.from_dict(d) == pre
    assert Preprocessing.from_dict(json.loads(json.dumps(d))) == pre
    assert Preprocessing.from_dict(d).to_dict() == d


def test_preprocessing_from_dict_refuses_unknown_and_missing_settings():
    d = Preprocessing(resize=36, crop=32).to_dict()
    with pytest.raises(UserError, match="unknown preprocessing setting.*antialias"):
        Preprocessing.from_dict({**d, "antialias": False})
    with pytest.raises(UserError, match="lacks.*std"):
        Preprocessing.from_dict({k: v for k, v in d.items() if k != "std"})
    short = Preprocessing.from_dict({"mean": [0.5] * 3, "std": [0.25] * 3})
    assert short == Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3)
