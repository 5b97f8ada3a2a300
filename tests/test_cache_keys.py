"""Caches and "already done" never serve stale results: the feature-cache key and the unit key
change with everything that changes the numbers."""

import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import image_folder

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.cli import main
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.features import extraction as features
from ssl_eval.features.extraction import cache_key, extract
from ssl_eval.records.store import load_records


def _folder(root, colour_of=lambda c, i: (40 * c, 200 - 30 * c, 90), size=(8, 8)):
    """Uncompressed BMP images: a file's size depends only on its dimensions, so a rewrite with
    other colours is a same-size overwrite."""
    return image_folder(
        root,
        {"train": 12, "val": 6},
        classes=3,
        pixel=colour_of,
        shape=lambda c, i: size,
        suffix=".bmp",
    )


def test_folder_fingerprint_hashes_content_not_sizes(tmp_path):
    """Overwriting every image with a same-size image of other content changes the fingerprint,
    with and without the manifest that spares re-reading unchanged files."""
    _folder(tmp_path / "data")
    man = tmp_path / "manifests"
    before = get_dataset(
        f"folder:{tmp_path / 'data'}", DatasetOptions(manifest_dir=man)
    ).fingerprint
    sizes = {p: p.stat().st_size for p in (tmp_path / "data").rglob("*.bmp")}
    _folder(
        tmp_path / "data", colour_of=lambda c, i: (255 - 40 * c, 30 * c, 200)
    )  # same files, new pixels
    assert {p: p.stat().st_size for p in sizes} == sizes  # a same-size overwrite
    after = get_dataset(f"folder:{tmp_path / 'data'}", DatasetOptions(manifest_dir=man)).fingerprint
    rehashed = get_dataset(f"folder:{tmp_path / 'data'}", DatasetOptions()).fingerprint
    assert before["content_sha256"] != after["content_sha256"] == rehashed["content_sha256"]
    assert "manifest" in after["content_hash"] and "manifest" not in rehashed["content_hash"]
    assert list(man.glob("*.json"))


def test_manifest_does_not_reread_unchanged_files(tmp_path, monkeypatch):
    _folder(tmp_path / "data")
    opts = DatasetOptions(manifest_dir=tmp_path / "m")
    first = get_dataset(f"folder:{tmp_path / 'data'}", opts).fingerprint
    import hashlib

    calls = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = get_dataset(f"folder:{tmp_path / 'data'}", opts).fingerprint
    assert again == first and calls == []


@pytest.mark.slow
def test_rerun_after_same_size_overwrite_recomputes(tmp_path):
    """End to end: the unit is not 'already done' and the old features are not served."""
    _folder(tmp_path / "data")
    args = [
        "run",
        "--backbone",
        "pixels",
        "--dataset",
        f"folder:{tmp_path / 'data'}",
        "--protocol",
        "knn",
        "--results-dir",
        str(tmp_path / "r"),
        "--cache-dir",
        str(tmp_path / "c"),
        "--no-progress",
        "--no-leaderboard",
        "--set",
        "ks=[1]",
    ]
    assert main(args) == 0
    # every class becomes the same grey: k-NN can no longer separate them
    _folder(tmp_path / "data", colour_of=lambda c, i: (120, 120, 120))
    assert main(args) == 0
    values = sorted(r.value for r in load_records(tmp_path / "r") if r.metric == "top1")
    assert (
        len(values) == 2 and values[0] < 0.5 and values[1] == 1.0
    )  # the second run saw the new images
    assert len(list((tmp_path / "c" / "features").iterdir())) == 4  # train + test, twice


def test_cache_key_covers_code_libraries_device_and_precision(monkeypatch):
    bb = build_backbone("pixels", BuildOptions())
    ds = get_dataset("digits", DatasetOptions())
    cpu = cache_key(bb, ds, "train", "float16", torch.device("cpu"))
    gpu = cache_key(bb, ds, "train", "float16", torch.device("cuda"))
    assert cpu["device"] == "cpu" and cpu["autocast"] is None
    assert gpu["device"] == "cuda" and gpu["autocast"] == "bfloat16"
    assert cpu["libraries"]["torch"] == torch.__version__.split("+")[0] or cpu["libraries"]["torch"]
    assert set(cpu["libraries"]) >= {"torch", "timm", "torchvision"}
    monkeypatch.setattr(features, "source_hash", lambda *parts: "changed-code")
    assert cache_key(bb, ds, "train", "float16", torch.device("cpu"))["code"] != cpu["code"]


def test_source_hash_follows_the_files(tmp_path, monkeypatch):
    from ssl_eval.core import provenance

    pkg = tmp_path / "ssl_eval"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(provenance, "PACKAGE_DIR", pkg)
    provenance.source_hash.cache_clear()
    h1 = provenance.source_hash("data")
    (pkg / "data" / "a.py").write_text("x = 2\n")
    provenance.source_hash.cache_clear()
    h2 = provenance.source_hash("data")
    provenance.source_hash.cache_clear()
    assert h1 != h2


PLUGIN = """
import torch
from torch import nn


class Flat(nn.Module):
    def forward(self, x):
        return x.flatten(1) * {scale}


def make():
    return Flat()
"""


def test_plugin_whose_forward_changed_is_a_new_backbone(tmp_path, monkeypatch):
    """A parameter-free plugin hashes its source: an edited forward never serves old features."""
    mod = tmp_path / "myplugin_ck.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = get_dataset("digits", DatasetOptions())
    keys = []
    for scale in (1, 2):
        mod.write_text(textwrap.dedent(PLUGIN.format(scale=scale)))
        sys.modules.pop("myplugin_ck", None)
        bb = build_backbone("py:myplugin_ck:make", BuildOptions())
        assert "plugin_sources" in bb.load_report
        f = extract(
            bb, ds, "test", cache_dir=tmp_path / "c", device=torch.device("cpu"), progress=False
        )
        keys.append((bb.weights.sha256, f.key, float(np.asarray(f.features).max())))
    assert keys[0][0] != keys[1][0] and keys[0][1] != keys[1][1]
    assert keys[1][2] == pytest.approx(2 * keys[0][2], rel=1e-3)
    os.remove(mod)


def test_unit_key_covers_what_changes_the_recorded_numbers():
    from dataclasses import replace

    from ssl_eval.core.config import RunConfig
    from ssl_eval.orchestrate.evaluate import unit_key
    from ssl_eval.protocols.cards import load_card

    bb = build_backbone("pixels", BuildOptions())
    ds = get_dataset("digits", DatasetOptions())
    card = load_card("knn")
    cfg = RunConfig(backbones=("pixels",), datasets=("digits",), protocols=(card,))
    cpu = torch.device("cpu")
    base = unit_key(bb, ds, card, cfg, None, cpu)
    others = [
        unit_key(bb, ds, card, replace(cfg, bootstrap_resamples=200), None, cpu),
        unit_key(bb, ds, card, replace(cfg, feature_dtype="float32"), None, cpu),
        unit_key(bb, ds, card, replace(cfg, val_fraction=0.2), None, cpu),
        unit_key(bb, ds, load_card("knn", ["temperature=0.1"]), cfg, None, cpu),
        unit_key(bb, ds, card, cfg, 1, cpu),
        unit_key(bb, ds, card, cfg, None, torch.device("cuda")),
    ]
    assert len({base, *others}) == 1 + len(others)
