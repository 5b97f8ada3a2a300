"""What the feature cache stores is what it computed: a damaged, truncated or missing entry file
is reported in one line, discarded and recomputed, never read as data."""

import json

import numpy as np
import pytest
import torch

from ssl_eval.backbones import BuildOptions, build_backbone
from ssl_eval.data.datasets import DatasetOptions, get_dataset
from ssl_eval.features.extraction import extract


def _extract(tmp_path):
    bb, ds = build_backbone("pixels", BuildOptions()), get_dataset("digits", DatasetOptions())
    return extract(bb, ds, "train", cache_dir=tmp_path, device=torch.device("cpu"), progress=False)


def _flip(path, n=2000):
    data = bytearray(path.read_bytes())
    start = len(data) - n - 16
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _rows(path):
    arr = np.load(path, mmap_mode="r+")
    arr[:50] = arr[100:150]  # other, finite rows
    arr.flush()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        ("features.npy", _flip),
        ("features.npy", _rows),
        ("features.npy", _truncate),
        ("labels.npy", _truncate),
        ("features.npy", lambda p: p.unlink()),
        ("meta.json", lambda p: p.unlink()),
        ("meta.json", lambda p: p.write_text("{not json")),
    ],
)
def test_damaged_entry_is_reported_discarded_and_recomputed(tmp_path, capsys, damage):
    clean = _extract(tmp_path)
    reference = np.array(clean.features)
    name, hurt = damage
    hurt(clean.path / name)
    capsys.readouterr()
    again = _extract(tmp_path)
    err = capsys.readouterr().err
    assert (
        not again.cache_hit
        and "is damaged" in err
        and "discarding it" in err
        and "Traceback" not in err
    )
    np.testing.assert_array_equal(np.asarray(again.features), reference)
    third = _extract(tmp_path)  # the recomputed entry is whole again
    assert third.cache_hit


def test_entry_records_its_checksums(tmp_path):
    fs = _extract(tmp_path)
    meta = json.loads((fs.path / "meta.json").read_text())
    assert meta["checksum"] == "crc32" and set(meta["checksums"]) == {"features.npy", "labels.npy"}
