"""Every ResNet checkpoint layout ssl-eval reads, built from a random reference model exactly
as the official code saves it, must give the reference's features (to 1e-5), through the tag
(``BuildOptions(weights=...)`` or the weights folders) and through ``ckpt:PATH`` detection.
Plus the failure modes: wrong architecture, extra keys, truncated files, code-running pickles.
(ViT layouts: tests/test_ckpt_vits.py.)"""

import argparse
import hashlib
import json
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ssl_eval.backbones import BuildOptions, build_backbone, get_spec, list_backbones
from ssl_eval.backbones.checkpoints import uninitialised
from ssl_eval.backbones.resnet import ResNet, resnet_shape
from ssl_eval.core.errors import UserError
from ssl_eval.core.files import sha256_file
from ssl_eval.data.transforms import Preprocessing

X224 = torch.randn(
    1, 3, 32, 32, generator=torch.Generator().manual_seed(1)
)  # ResNet-50s: 1 small image
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny forward passes: with 2 threads on a shared 2-core machine, thread synchronisation
    costs 10-40x the arithmetic. One thread keeps these tests fast; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every saved tensor with distinct random values of a sensible scale (BN statistics
    included), cheaply: slices of one random pool at random offsets."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 23, generator=g)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            n = t.numel()
            if n < pool.numel():
                off = int(torch.randint(0, pool.numel() - n, (1,), generator=g))
                r = pool[off : off + n].view(t.shape)
            else:
                r = torch.randn(t.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                val = r.abs() + 0.5
            elif t.ndim <= 1 and (leaf == "weight" or "gamma" in leaf):
                val = 1 + 0.1 * r
            elif t.ndim >= 2 and leaf == "weight":
                val = r / t[0].numel() ** 0.5
            else:
                val = 0.1 * r
            t.copy_(val)
    return model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def r50():
    """A random torchvision ResNet-50: (full state dict with fc, pooled features of X224)."""
    ref = randomize(uninitialised(torchvision.models.resnet50), 1)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    ref.fc = nn.Identity()
    with torch.no_grad():
        return sd, ref(X224)


# ---------------------------------------------------------------- CIFAR ResNets


def cifar_state_dict(n: int, seed: int = 0) -> dict:
    """Official key names of a CIFAR ResNet-(6n+2), random values (no shortcut weights)."""
    g = torch.Generator().manual_seed(seed)

    def bn(p, c):
        return {
            f"{p}.weight": 1 + 0.1 * torch.randn(c, generator=g),
            f"{p}.bias": 0.1 * torch.randn(c, generator=g),
            f"{p}.running_mean": 0.1 * torch.randn(c, generator=g),
            f"{p}.running_var": 0.5 + torch.rand(c, generator=g),
        }

    def conv(cout, cin):
        return torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5

    sd = {"conv1.weight": conv(16, 3), **bn("bn1", 16)}
    cin = 16
    for s, c in enumerate((16, 32, 64), 1):
        for i in range(n):
            sd[f"layer{s}.{i}.conv1.weight"] = conv(c, cin)
            sd.update(bn(f"layer{s}.{i}.bn1", c))
            sd[f"layer{s}.{i}.conv2.weight"] = conv(c, c)
            sd.update(bn(f"layer{s}.{i}.bn2", c))
            cin = c
    sd["linear.weight"], sd["linear.bias"] = (
        torch.randn(10, 64, generator=g),
        torch.randn(10, generator=g),
    )
    return sd


def cifar_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The CIFAR ResNet written from the weights README, functionally: option-A shortcuts."""

    def bn(p, t):
        return F.batch_norm(
            t,
            sd[f"{p}.running_mean"],
            sd[f"{p}.running_var"],
            sd[f"{p}.weight"],
            sd[f"{p}.bias"],
            training=False,
        )

    x = F.relu(bn("bn1", F.conv2d(x, sd["conv1.weight"], padding=1)))
    blocks = sorted(
        {tuple(map(int, m.groups())) for k in sd if (m := re.match(r"layer(\d)\.(\d+)\.", k))}
    )
    for s, i in blocks:
        p = f"layer{s}.{i}"
        stride = 2 if (s > 1 and i == 0) else 1
        out = F.relu(bn(f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
        out = bn(f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1))
        short = x
        if stride == 2:
            extra = out.shape[1] - x.shape[1]
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, extra // 2, extra // 2))
        x = F.relu(out + short)
    return x.mean(dim=(2, 3))


def test_cifar_resnet_official_layout_from_weights_folder(tmp_path, monkeypatch):
    wdir = tmp_path / "weights"
    wdir.mkdir()
    sd = cifar_state_dict(3)
    torch.save(
        {"best_prec1": 91.78, "state_dict": {f"module.{k}": v for k, v in sd.items()}},
        wdir / "resnet20-12fca82f.th",
    )
    rows = {n: s for n, s, _ in list_backbones()}
    assert rows["cifar_resnet20"].startswith("present") and rows["cifar_resnet56"] == "downloadable"
    bb = build_backbone("cifar_resnet20", BuildOptions(offline=True))
    close(bb.embed(X32), cifar_reference(sd, X32))
    assert bb.preprocessing.crop == 32 and bb.preprocessing.mean == (0.485, 0.456, 0.406)
    rep = bb.load_report
    assert rep["family"] == "cifar_resnet" and rep["dropped"] == [
        "state_dict.module.linear.bias",
        "state_dict.module.linear.weight",
    ]
    assert (
        rep["missing"] == [] and rep["unexpected"] == [] and "defaulted" in rep
    )  # old files: no step counters
    assert bb.weights.sha256 == sha256_file(wdir / "resnet20-12fca82f.th")

    sd56 = cifar_state_dict(9, seed=1)
    torch.save(
        {"best_prec1": 93.6, "state_dict": {f"module.{k}": v for k, v in sd56.items()}},
        tmp_path / "r56.th",
    )
    bb56 = build_backbone(f"ckpt:{tmp_path / 'r56.th'}", BuildOptions())
    assert (
        bb56.load_report["family"] == "cifar_resnet" and "resnet-56" in bb56.load_report["format"]
    )
    close(bb56.embed(X32), cifar_reference(sd56, X32))
    with pytest.raises(
        UserError, match="does not match the architecture"
    ):  # wrong depth for the tag
        build_backbone("cifar_resnet20", BuildOptions(weights=tmp_path / "r56.th"))


# ---------------------------------------------------------------- torchvision / SimCLR / MoCo / DINO


@pytest.mark.slow
def test_torchvision_r50_v2_and_v1_from_torch_hub_cache(tmp_path, r50):
    sd, ref = r50
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(sd, hub / "resnet50-11ad3fa6.pth")  # torchvision's own file name for V2
    bb = build_backbone("supervised_r50", BuildOptions(offline=True))
    close(bb.embed(X224), ref)
    assert (bb.preprocessing.resize, bb.preprocessing.crop, bb.preprocessing.interpolation) == (
        232,
        224,
        "bilinear",
    )
    assert bb.load_report["dropped"] == ["fc.bias", "fc.weight"] and bb.weights.path.endswith(
        "resnet50-11ad3fa6.pth"
    )
    v1 = build_backbone("supervised_r50_v1", BuildOptions(weights=hub / "resnet50-11ad3fa6.pth"))
    assert (v1.preprocessing.resize, v1.preprocessing.crop) == (256, 224)
    via = build_backbone(f"ckpt:{hub / 'resnet50-11ad3fa6.pth'}", BuildOptions())
    assert via.load_report["family"] == "supervised" and "simclr" in via.load_report["note"]
    close(via.embed(X224), ref)


def test_missing_weights_name_the_official_file_and_places(tmp_path):
    with pytest.raises(
        UserError, match=r"resnet50-0676ba61\.pth.*download\.pytorch\.org.*hub.checkpoints"
    ):
        build_backbone("supervised_r50_v1", BuildOptions(offline=True))
    with pytest.raises(UserError, match=r"resnet50-1x\.pth.*simclr-converter"):
        build_backbone("simclr_r50", BuildOptions(offline=True))
    with pytest.raises(UserError, match=r"vit-b-300ep\.pth\.tar.*moco-v3"):
        build_backbone("mocov3_vitb16", BuildOptions(offline=True))


@pytest.mark.slow
def test_simclr_v1_converted_layout(tmp_path, r50):
    sd, ref = r50
    torch.save({"state_dict": sd}, tmp_path / "resnet50-1x.pth")  # the converter's output
    bb = build_backbone("simclr_r50", BuildOptions(weights=tmp_path / "resnet50-1x.pth"))
    close(bb.embed(X224), ref)
    assert bb.preprocessing.mean == (0.0, 0.0, 0.0) and bb.preprocessing.std == (1.0, 1.0, 1.0)
    plain = build_backbone(f"ckpt:{tmp_path / 'resnet50-1x.pth'}", BuildOptions())
    assert plain.load_report["family"] == "supervised"  # same layout: detection cannot tell
    told = build_backbone(f"ckpt:{tmp_path / 'resnet50-1x.pth'}", BuildOptions(family="simclr"))
    assert told.load_report["family"] == "simclr" and told.load_report["family_from"] == "--family"
    assert told.preprocessing.std == (1.0, 1.0, 1.0)


def to_simclr_v2(sd: dict) -> dict:
    """torchvision names -> SimCLRv2-Pytorch's nested-Sequential names (written from its resnet.py)."""
    out = {}
    for k, v in sd.items():
        if m := re.match(r"layer(\d)\.(\d+)\.conv(\d)\.(.*)", k):
            s, j, c, rest = m.groups()
            k = f"net.{s}.blocks.{j}.net.{2 * int(c) - 2}.{rest}"
        elif m := re.match(r"layer(\d)\.(\d+)\.bn(\d)\.(.*)", k):
            s, j, c, rest = m.groups()
            k = f"net.{s}.blocks.{j}.net.{2 * int(c) - 1}.0.{rest}"
        elif m := re.match(r"layer(\d)\.(\d+)\.downsample\.0\.(.*)", k):
            k = "net.{}.blocks.{}.projection.shortcut.{}".format(*m.groups())
        elif m := re.match(r"layer(\d)\.(\d+)\.downsample\.1\.(.*)", k):
            k = "net.{}.blocks.{}.projection.bn.0.{}".format(*m.groups())
        elif k.startswith("conv1."):
            k = "net.0.0." + k[6:]
        elif k.startswith("bn1."):
            k = "net.0.1.0." + k[4:]
        out[k] = v
    return out


@pytest.mark.slow
def test_simclr_v2_converted_layout(tmp_path, r50):
    sd, ref = r50
    head = {
        "layers.0.weight": torch.randn(2048, 2048),
        "layers.1.weight": torch.ones(2048),
        "layers.1.bias": torch.zeros(2048),
        "layers.1.running_mean": torch.zeros(2048),
        "layers.1.running_var": torch.ones(2048),
        "layers.6.weight": torch.randn(128, 2048),
    }
    torch.save({"resnet": to_simclr_v2(sd), "head": head}, tmp_path / "r50_1x_sk0.pth")
    bb = build_backbone("simclr2_r50", BuildOptions(weights=tmp_path / "r50_1x_sk0.pth"))
    close(bb.embed(X224), ref)
    via = build_backbone(f"ckpt:{tmp_path / 'r50_1x_sk0.pth'}", BuildOptions())
    assert via.load_report["family"] == "simclr" and via.preprocessing.mean == (0.0, 0.0, 0.0)
    assert (
        "head.layers.0.weight" in via.load_report["dropped"]
        and "resnet.fc.weight" in via.load_report["dropped"]
    )
    close(via.embed(X224), ref)
    sk1 = to_simclr_v2(sd) | {"net.1.blocks.0.net.2.mixing_conv.0.weight": torch.zeros(1)}
    torch.save({"resnet": sk1, "head": head}, tmp_path / "r50_1x_sk1.pth")
    with pytest.raises(UserError, match="selective-kernel"):
        build_backbone(f"ckpt:{tmp_path / 'r50_1x_sk1.pth'}", BuildOptions())


@pytest.mark.slow
def test_wide_resnet_shapes_are_read_from_the_keys():
    with torch.device("meta"):
        sd2, sd4 = ResNet(width=2).state_dict(), ResNet((3, 4, 23, 3), width=4).state_dict()
    assert resnet_shape(sd2) == ((3, 4, 6, 3), 2) and resnet_shape(sd4) == ((3, 4, 23, 3), 4)
    assert sd2["conv1.weight"].shape[0] == 128 and sd2["layer4.2.conv3.weight"].shape[0] == 4096
    # width 1 is torchvision's ResNet-50 key for key, shape for shape
    tv = {
        k: v.shape
        for k, v in torchvision.models.resnet50().state_dict().items()
        if not k.startswith("fc.")
    }
    with torch.device("meta"):
        assert {k: v.shape for k, v in ResNet().state_dict().items()} == tv


def mlp_keys(prefix: str, dims: list[int]) -> dict:
    """MoCo v3's _build_mlp: Linear(no bias), BN, ReLU ... last BN without affine."""
    out, i = {}, 0
    for n, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
        out[f"{prefix}.{i}.weight"] = torch.randn(b, a) * 0.01
        last = n == len(dims) - 2
        if not last:
            out[f"{prefix}.{i + 1}.weight"], out[f"{prefix}.{i + 1}.bias"] = (
                torch.ones(b),
                torch.zeros(b),
            )
        out[f"{prefix}.{i + 1}.running_mean"], out[f"{prefix}.{i + 1}.running_var"] = (
            torch.zeros(b),
            torch.ones(b),
        )
        out[f"{prefix}.{i + 1}.num_batches_tracked"] = torch.tensor(5)
        i += 3
    return out


@pytest.mark.slow
def test_mocov3_r50_training_checkpoint(tmp_path, r50):
    sd, ref = r50
    enc = {k: v for k, v in sd.items() if not k.startswith("fc.")} | mlp_keys("fc", [2048, 256, 64])
    state = {f"module.base_encoder.{k}": v for k, v in enc.items()}
    state |= {f"module.momentum_encoder.{k}": v + 1 for k, v in enc.items()}
    state |= {f"module.{k}": v for k, v in mlp_keys("predictor", [64, 256, 64]).items()}
    ckpt = {
        "epoch": 1000,
        "arch": "resnet50",
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.3, "params": [0, 1]}]},
        "scaler": {"scale": 1024.0},
    }
    torch.save(ckpt, tmp_path / "r-50-1000ep.pth.tar")
    bb = build_backbone("mocov3_r50", BuildOptions(weights=tmp_path / "r-50-1000ep.pth.tar"))
    close(bb.embed(X224), ref)
    via = build_backbone(f"ckpt:{tmp_path / 'r-50-1000ep.pth.tar'}", BuildOptions())
    rep = via.load_report
    assert rep["family"] == "mocov3" and rep["missing"] == [] and rep["unexpected"] == []
    dropped = " ".join(rep["dropped"])
    assert (
        "state_dict.module.momentum_encoder" in dropped and "state_dict.module.predictor" in dropped
    )
    assert "module.base_encoder.fc" in dropped
    close(via.embed(X224), ref)


@pytest.mark.slow
def test_dino_resnet50_hub_and_training_checkpoint(tmp_path, r50):
    sd, ref = r50
    backbone = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # DINO's fc is Identity
    torch.save(backbone, tmp_path / "dino_resnet50_pretrain.pth")
    bb = build_backbone(
        "dino_resnet50", BuildOptions(weights=tmp_path / "dino_resnet50_pretrain.pth")
    )
    close(bb.embed(X224), ref)
    assert bb.preprocessing.interpolation == "bicubic"
    head = {
        "head.mlp.0.weight": torch.randn(8, 2048),
        "head.last_layer.weight_g": torch.ones(16, 1),
    }
    train = {  # the ResNet teacher has BatchNorm, so DINO wraps it in DDP too: module.backbone.*
        "teacher": {f"module.backbone.{k}": v for k, v in backbone.items()}
        | {f"module.{k}": v for k, v in head.items()},
        "student": {f"module.backbone.{k}": v + 1 for k, v in backbone.items()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="resnet50", out_dim=65536),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    torch.save(train, tmp_path / "checkpoint.pth")
    via = build_backbone(f"ckpt:{tmp_path / 'checkpoint.pth'}", BuildOptions())
    assert (
        via.load_report["family"] == "dino"
        and "teacher.module.backbone" in via.load_report["format"]
    )
    close(via.embed(X224), ref)  # the teacher, not the student


# ---------------------------------------------------------------- failures


@pytest.mark.slow
def test_wrong_architecture_and_extra_keys_are_errors(tmp_path, r50):
    sd, _ = r50
    torch.save(sd | {"layer5.0.conv1.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(UserError, match=r"1 unexpected.*layer5"):
        build_backbone("supervised_r50", BuildOptions(weights=tmp_path / "extra.pth"))
    torch.save(
        {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}, tmp_path / "short.pth"
    )
    with pytest.raises(UserError, match=r"1 missing.*layer3\.1\.bn2\.running_var"):
        build_backbone(f"ckpt:{tmp_path / 'short.pth'}", BuildOptions())
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in cifar_state_dict(3).items()}},
        tmp_path / "c.th",
    )
    with pytest.raises(UserError, match="no torchvision-layout ResNet"):
        build_backbone("supervised_r50", BuildOptions(weights=tmp_path / "c.th"))
    with pytest.raises(UserError, match="holds a ResNet, not the vit_small_patch16_224"):
        build_backbone("dino_vits16", BuildOptions(weights=tmp_path / "short.pth"))


def test_truncated_corrupt_and_code_running_files(tmp_path):
    torch.save({"state_dict": cifar_state_dict(3)}, tmp_path / "full.th")
    data = (tmp_path / "full.th").read_bytes()
    (tmp_path / "cut.th").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.th").write_bytes(b"not a checkpoint at all" * 20)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": cifar_state_dict(3), "hook": Evil()}, tmp_path / "evil.th")
    for name in ("cut.th", "junk.th"):
        with pytest.raises(UserError, match="corrupt or truncated"):
            build_backbone(f"ckpt:{tmp_path / name}", BuildOptions())
    with pytest.raises(UserError, match=r"refusing to load .*evil\.th.*print"):
        build_backbone(f"ckpt:{tmp_path / 'evil.th'}", BuildOptions())
    with pytest.raises(UserError, match="refusing to load"):
        build_backbone("cifar_resnet20", BuildOptions(weights=tmp_path / "evil.th"))


def test_detection_and_family_errors(tmp_path):
    torch.save({"encoder": {"w": torch.zeros(3)}}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"cannot tell which family.*--family.*dinov3"):
        build_backbone(f"ckpt:{tmp_path / 'odd.pth'}", BuildOptions())
    with pytest.raises(UserError, match=r"unknown --family 'simclr3'.*simclr"):
        build_backbone(f"ckpt:{tmp_path / 'odd.pth'}", BuildOptions(family="simclr3"))
    with pytest.raises(UserError, match="already names its weights"):
        build_backbone(f"ckpt:{tmp_path / 'odd.pth'}", BuildOptions(weights=tmp_path / "odd.pth"))
    with pytest.raises(UserError, match="no such file"):
        build_backbone(f"ckpt:{tmp_path / 'absent.pth'}", BuildOptions())
    with pytest.raises(UserError, match="applies to ckpt:PATH"):
        build_backbone("cifar_resnet20", BuildOptions(family="dino"))


@pytest.mark.slow
def test_load_report_reaches_the_result_record(tmp_path):
    """Through the CLI: ckpt:PATH with --family, the record keeps the report and the sha256."""
    from ssl_eval.cli import main
    from ssl_eval.records.store import load_records

    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in cifar_state_dict(3).items()}},
        tmp_path / "r20.th",
    )
    rc = main(
        [
            "run",
            "--backbone",
            f"ckpt:{tmp_path / 'r20.th'}",
            "--family",
            "cifar_resnet",
            "--dataset",
            "digits",
            "--protocol",
            "knn",
            "--image-size",
            "8",
            "--num-workers",
            "0",
            "--results-dir",
            str(tmp_path / "res"),
            "--no-progress",
            "--no-leaderboard",
        ]
    )
    assert rc == 0
    rec = next(r for r in load_records(tmp_path / "res") if r.metric == "top1")
    assert (
        rec.load_report["family"] == "cifar_resnet" and rec.load_report["family_from"] == "--family"
    )
    assert rec.weights["sha256"] == sha256_file(tmp_path / "r20.th")


# ------------------------------------------- folders written by `ssl-eval train` (one format)

# backbone.json exactly as `ssl-eval train` wrote it before the format had its own module
OLD_SIDECAR = {
    "format": "ssl-eval-trained-backbone",
    "format_version": 1,
    "method": "simclr",
    "architecture": {"name": "cifar_resnet_tiny", "kwargs": {}},
    "preprocessing": {
        "resize": 32,
        "crop": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
    },
    "feature_kind": "model",
    "train_config": {},
    "dataset": {"name": "digits", "fingerprint": "x"},
    "epochs": 2,
    "epochs_done": 2,
    "complete": True,
    "seed": 0,
    "code_version": "0",
    "collapsed": False,
    "final_diagnostics": {},
    "history": [],
}


def _old_training_folder(path):
    from safetensors.torch import save_file

    from ssl_eval.backbones.archs import build_arch

    model = randomize(build_arch("cifar_resnet_tiny"), 7)
    path.mkdir()
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path / "backbone.safetensors"),
    )
    (path / "backbone.json").write_text(json.dumps(OLD_SIDECAR))
    return model


def test_training_folder_written_before_still_loads(tmp_path):
    ref = _old_training_folder(tmp_path / "run")
    assert get_spec(f"ckpt:{tmp_path / 'run'}").status().startswith("present")
    bb = build_backbone(f"ckpt:{tmp_path / 'run'}", BuildOptions())
    assert bb.preprocessing == Preprocessing(resize=32, crop=32) and bb.feature_kind == "model"
    assert (
        bb.load_report["format"] == "ssl-eval-trained-backbone"
        and bb.load_report["training"]["epochs"] == 2
    )
    assert bb.weights.sha256 == sha256_file(tmp_path / "run" / "backbone.safetensors")
    with torch.no_grad():
        close(bb.embed(X32), ref(X32))


def test_trained_format_writes_weights_first_and_reads_back(tmp_path, monkeypatch):
    from ssl_eval.backbones import trained_format as tf
    from ssl_eval.backbones.archs import build_arch

    model = randomize(build_arch("cifar_resnet_tiny"), 8)
    real = tf.atomic_write_json

    def sidecar_after_weights(path, obj):
        assert (path.parent / tf.WEIGHTS).is_file()  # a sidecar always describes weights that exist
        real(path, obj)

    monkeypatch.setattr(tf, "atomic_write_json", sidecar_after_weights)
    side = {k: v for k, v in OLD_SIDECAR.items() if k not in ("format", "format_version")}
    tf.write_trained_backbone(tmp_path, model.state_dict(), side)
    written = json.loads((tmp_path / "backbone.json").read_text())
    digest = hashlib.sha256((tmp_path / tf.WEIGHTS).read_bytes()).hexdigest()
    assert written.pop(tf.WEIGHTS_SHA256) == digest  # verified when the weights are read
    assert written == OLD_SIDECAR
    assert tf.is_training_dir(tmp_path) and tf.sidecar_preprocessing(
        tf.read_sidecar(tmp_path)
    ) == Preprocessing(resize=32, crop=32)
    sd = tf.read_weights(tmp_path)
    assert sd.keys() == model.state_dict().keys() and all(
        torch.equal(sd[k], v) for k, v in model.state_dict().items()
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 2}, "format version 2"),
        ({"format": "other"}, "not an ssl-eval training sidecar"),
        ({"architecture": {}}, "names no architecture"),
        ({"preprocessing": None}, "no 'preprocessing'"),
        (
            {"preprocessing": {**OLD_SIDECAR["preprocessing"], "antialias": True}},
            "unknown preprocessing setting",
        ),
    ],
)
def test_damaged_or_foreign_training_folders_are_user_errors(tmp_path, change, message):
    _old_training_folder(tmp_path / "run")
    (tmp_path / "run" / "backbone.json").write_text(json.dumps({**OLD_SIDECAR, **change}))
    with pytest.raises(UserError, match=message):
        build_backbone(f"ckpt:{tmp_path / 'run'}", BuildOptions())


def test_training_folder_without_or_with_damaged_weights(tmp_path):
    _old_training_folder(tmp_path / "run")
    w = tmp_path / "run" / "backbone.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged"):
        build_backbone(f"ckpt:{tmp_path / 'run'}", BuildOptions())
    w.unlink()
    with pytest.raises(UserError, match="has not finished an epoch"):
        build_backbone(f"ckpt:{tmp_path / 'run'}", BuildOptions())
