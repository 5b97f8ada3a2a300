"""Fuzzing the checkpoint readers (tests/fuzzing.py): any bytes as a weights file, any state
dict through format detection (seeded by each family's own layout), any trained sidecar:
a valid object or a one-line ``UserError``; never another exception."""

from __future__ import annotations

import io
import json

import pytest
import torch
from fuzzing import FUZZ, mutated_docs, one_line, scalars, values
from hypothesis import example, given
from hypothesis import strategies as st

from ssl_eval.backbones.adapters import detect_family
from ssl_eval.backbones.catalog import _ensure_loaded
from ssl_eval.backbones.checkpoints import read_checkpoint
from ssl_eval.backbones.trained_format import FORMAT
from ssl_eval.core.errors import UserError

# ---------------------------------------------------------------- checkpoints

KEY_PARTS = [
    "module.",
    "state_dict.",
    "model.",
    "teacher.",
    "student.",
    "backbone.",
    "base_encoder.",
    "momentum_encoder.",
    "resnet.net.0.",
    "encoder.",
    "head.",
    "blocks.0.",
    "blocks.0.0.",
    "layer1.0.",
    "layer4.0.",
    "stages.0.0.",
    "downsample_layers.0.0.",
]
KEY_LEAVES = [
    "conv1.weight",
    "bn1.weight",
    "bn1.running_mean",
    "fc.weight",
    "fc.bias",
    "cls_token",
    "pos_embed",
    "mask_token",
    "reg_token",
    "storage_tokens",
    "register_tokens",
    "patch_embed.proj.weight",
    "attn.qkv.weight",
    "ls1.gamma",
    "gamma_1",
    "norm.weight",
    "fc_norm.weight",
    "decoder_embed.weight",
    "gamma",
    "weight",
    "linear.weight",
    "layers.0.weight",
]
keys = st.tuples(st.lists(st.sampled_from(KEY_PARTS), max_size=3), st.sampled_from(KEY_LEAVES))
tensors = st.lists(st.integers(0, 3), max_size=4).map(lambda s: torch.zeros(s))
leaves = st.one_of(tensors, tensors, scalars)


@st.composite
def state_dicts(draw):
    sd: dict = {}
    for parts, leaf in draw(st.lists(keys, max_size=12)):
        node = sd
        if draw(st.booleans()):  # nested containers, as training scripts save them
            for p in parts:
                node = node.setdefault(p.rstrip("."), {})
                if not isinstance(node, dict):
                    break
            else:
                node[leaf] = draw(leaves)
        else:
            sd["".join(parts) + leaf] = draw(leaves)
    extra = draw(st.dictionaries(st.sampled_from(["arch", "epoch", "args"]), scalars, max_size=2))
    if draw(st.booleans()):
        extra["pytorch-lightning_version"] = "2.0"
    return {**sd, **extra}


def _t(*shape):
    return torch.zeros(shape)


_ensure_loaded()  # every family registers its detector on import

# the least each detector accepts, in its authors' layout; mutated below
LAYOUTS = {
    "supervised": {
        "conv1.weight": _t(2, 3, 7, 7),
        "layer1.0.downsample.0.weight": _t(1),
        "layer4.0.conv3.weight": _t(1),
        "fc.weight": _t(2, 2),
    },
    "cifar_resnet": {"conv1.weight": _t(2, 3, 3, 3), "layer3.0.conv1.weight": _t(1)},
    "simclr": {"resnet": {"net.0.0.weight": _t(2, 3, 7, 7)}, "head": {"w": _t(1)}},
    "mocov3": {"state_dict": {"module.base_encoder.conv1.weight": _t(2, 3, 7, 7)}},
    "dino": {
        "teacher": {
            "backbone.cls_token": _t(1, 1, 4),
            "backbone.pos_embed": _t(1, 5, 4),
            "backbone.blocks.0.attn.qkv.weight": _t(12, 4),
        }
    },
    "dinov2": {"cls_token": _t(1, 1, 4), "pos_embed": _t(1, 5, 4), "blocks.0.ls1.gamma": _t(4)},
    "mae": {
        "model": {
            "cls_token": _t(1, 1, 4),
            "blocks.0.attn.qkv.weight": _t(12, 4),
            "decoder_embed.weight": _t(4, 4),
        }
    },
    "solo": {"pytorch-lightning_version": "2.0", "state_dict": {"backbone.conv1.weight": _t(1)}},
}


@st.composite
def mutated_layouts(draw):
    """A family's layout with keys dropped, shapes changed, a container added and decoys."""
    name = draw(st.sampled_from(sorted(LAYOUTS)))
    flat: dict = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(LAYOUTS[name])
    for k in list(flat):
        action = draw(st.sampled_from(["keep", "keep", "keep", "drop", "reshape", "plain"]))
        if action == "drop":
            del flat[k]
        elif action == "reshape":
            flat[k] = draw(tensors)
        elif action == "plain":
            flat[k] = draw(scalars)
    prefix = draw(st.sampled_from(["", "", "module.", "state_dict.", "model."]))
    out = {prefix + k: v for k, v in flat.items()}
    for parts, leaf in draw(st.lists(keys, max_size=3)):
        out["".join(parts) + leaf] = draw(leaves)
    return out


def _as_file(tmp_path, obj, name="w.pt"):
    buf = io.BytesIO()
    torch.save(obj, buf)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


@FUZZ
@given(sd=st.one_of(mutated_layouts(), mutated_layouts(), state_dicts(), values))
@example(sd={"cls_token": torch.zeros(()), "pos_embed": torch.zeros(0)})
@pytest.mark.slow
def test_any_state_dict_is_detected_or_refused_in_one_line(tmp_path, sd):
    path = _as_file(tmp_path, sd)
    try:
        family = detect_family(read_checkpoint(path))
    except UserError as e:
        one_line(e)
        return
    assert family.name


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_layout_is_detected_as_its_family(tmp_path, name):
    """The fuzzer's seeds reach every detector: unmutated, each is its family's."""
    assert detect_family(read_checkpoint(_as_file(tmp_path, LAYOUTS[name]))).name == name


REAL = io.BytesIO()
torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1), "fc.weight": torch.zeros(2, 2)}, REAL)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.tuples(st.integers(0, len(REAL.getvalue())), st.binary(max_size=4)).map(
            lambda t: REAL.getvalue()[: t[0]] + t[1] + REAL.getvalue()[t[0] + len(t[1]) :]
        ),
        st.integers(0, len(REAL.getvalue())).map(lambda n: REAL.getvalue()[:n]),
    ),
    suffix=st.sampled_from([".pt", ".pth", ".safetensors", ".bin"]),
)
@pytest.mark.slow
def test_any_bytes_as_a_checkpoint_are_refused_in_one_line_or_read(tmp_path, data, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(data)
    try:
        ckpt = read_checkpoint(path)
    except UserError as e:
        one_line(e)
        return
    assert ckpt.flat and all(isinstance(v, torch.Tensor) for v in ckpt.flat.values())
    try:
        detect_family(ckpt)
    except UserError as e:
        one_line(e)


SIDECAR = {
    "format": FORMAT,
    "format_version": 1,
    "architecture": {"name": "cifar_resnet_tiny", "kwargs": {}},
    "preprocessing": {
        "resize": 16,
        "crop": 16,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
    },
    "feature_kind": "avgpool",
}


def _read_sidecar(folder, raw: bytes):
    from ssl_eval.backbones.trained_format import read_sidecar, sidecar_preprocessing

    (folder / "backbone.json").write_bytes(raw)
    try:
        pre = sidecar_preprocessing(read_sidecar(folder))
    except UserError as e:
        one_line(e)
        return
    assert len(pre.mean) == 3 and len(pre.std) == 3
    assert all(isinstance(x, float) for x in pre.mean + pre.std)


@FUZZ
@given(doc=mutated_docs(SIDECAR))
@example(doc={**SIDECAR, "preprocessing": {"mean": 5, "std": None}})
@example(doc={**SIDECAR, "format_version": [1]})
def test_any_edit_of_a_trained_sidecar_is_read_or_refused_in_one_line(tmp_path, doc):
    """The sidecar a trained backbone is rebuilt from (format, architecture, preprocessing)."""
    _read_sidecar(tmp_path, json.dumps(doc).encode())


@FUZZ
@given(raw=st.binary(max_size=60))
@example(raw=b"[" * 100_000)
@example(raw=b"\xff")
def test_any_bytes_as_a_trained_sidecar_are_refused_in_one_line(tmp_path, raw):
    _read_sidecar(tmp_path, raw)


@pytest.mark.slow
def test_a_library_message_of_several_lines_reaches_the_user_in_one_line(tmp_path):
    """torch's refusal of a damaged file is paragraphs long: the CLI prints one line of it."""
    import subprocess
    import sys

    from conftest import ROOT, cli_env

    (tmp_path / "w.pt").write_bytes(b"\x00")
    args = ["run", "--backbone", f"ckpt:{tmp_path / 'w.pt'}", "--dataset", "digits"]
    r = subprocess.run(
        [sys.executable, "-m", "ssl_eval.cli", *args, "--results-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        cwd=ROOT,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("building")]
    assert len(lines) == 1 and "corrupt or truncated" in lines[0], r.stderr
    assert "Unsupported operand" in lines[0] and "Weights only load failed" not in lines[0]
