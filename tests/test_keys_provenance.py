"""Keys and provenance hold everything that changes a number (issue 18, point 7): the libraries
that compute a protocol's number enter the unit key (not the feature key), the extraction
batch size does not change the cached features, and records name the CPU they ran on."""

import hashlib

import numpy as np
import pytest

import ssl_eval.core.provenance as prov
from ssl_eval.cli import main

RUN = ["--dataset", "digits", "--protocol", "knn", "--image-size", "16", "--no-progress"]


def _bumped(name):
    real = prov.package_versions()

    def versions():
        return {**real, name: "0.0.0-other"}

    return versions


@pytest.mark.parametrize("lib", ["scikit-learn", "scipy", "faiss-cpu"])
def test_protocol_libraries_enter_the_unit_key_not_the_feature_key(lib, monkeypatch):
    import torch

    from ssl_eval.backbones import BuildOptions, build_backbone
    from ssl_eval.core.config import RunConfig
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.features.extraction import cache_key
    from ssl_eval.orchestrate.evaluate import unit_key
    from ssl_eval.protocols.cards import load_cards

    bb = build_backbone("pixels", BuildOptions())
    bundle = get_dataset("digits", DatasetOptions())
    (card,) = load_cards(["knn"], [])
    cfg = RunConfig(backbones=("pixels",), datasets=("digits",), protocols=(card,))
    cpu = torch.device("cpu")
    before = unit_key(bb, bundle, card, cfg, None, cpu), cache_key(bb, bundle, "train", "float16")
    monkeypatch.setattr(prov, "package_versions", _bumped(lib))
    after = unit_key(bb, bundle, card, cfg, None, cpu), cache_key(bb, bundle, "train", "float16")
    assert before[0] != after[0]  # the number may change with the library: recomputed
    assert before[1] == after[1]  # the features do not: the cache entry is reused


def test_a_missing_library_is_none_not_a_crash(monkeypatch):
    real = prov.package_versions()
    monkeypatch.setattr(
        prov, "package_versions", lambda: {k: v for k, v in real.items() if k != "faiss-cpu"}
    )
    assert prov.library_versions(prov.PROTOCOL_LIBRARIES)["faiss-cpu"] is None


def _entries(cache):
    return {
        p.relative_to(cache).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(cache.rglob("*.npy"))
    }


def _extract(tmp_path, bs, cache):
    args = ["run", "--backbone", "random:cifar_resnet_tiny", *RUN, "--batch-size", str(bs)]
    args += ["--results-dir", str(tmp_path / f"r{bs}-{cache.name}"), "--cache-dir", str(cache)]
    assert main(args) == 0
    return _entries(cache)


@pytest.mark.slow
def test_the_extraction_batch_size_changes_features_so_it_is_in_the_key(tmp_path):
    """On this CPU a network's float16 features of batch 5, 7 and 64 are not the same bytes
    (the kernels block their GEMMs by batch), so the batch size is part of the feature key:
    each batch size writes its own entry, and one batch size finds its own again."""
    seen = {bs: _extract(tmp_path, bs, tmp_path / f"c{bs}") for bs in (5, 7, 64)}
    names = {bs: set(e) for bs, e in seen.items()}
    assert names[5].isdisjoint(names[64]) and names[7].isdisjoint(names[64])
    shared = tmp_path / "shared"
    for bs in (5, 64):
        _extract(tmp_path, bs, shared)
    both = _entries(shared)
    assert set(both) == names[5] | names[64]  # two entries per split, none overwritten
    for bs in (5, 64):
        assert {k: both[k] for k in names[bs]} == seen[bs]  # each its own bytes


def test_records_name_the_cpu_from_proc_cpuinfo(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Test CPU @ 2.20GHz\n"
    )
    monkeypatch.setattr(prov, "CPUINFO", fake)
    monkeypatch.setattr(prov.platform, "processor", lambda: "")  # as on Linux
    assert main(["run", "--backbone", "pixels", *RUN, "--results-dir", str(tmp_path / "r")]) == 0
    from ssl_eval.records.frame import load_frame

    f = load_frame(tmp_path / "r")
    assert set(f["machine.cpu_model"]) == {"Intel(R) Xeon(R) Test CPU @ 2.20GHz"}
    assert (
        f["machine.cpu_capability"].iloc[0] == __import__("torch").backends.cpu.get_cpu_capability()
    )
    assert int(f["schema_version"].iloc[0]) == 3
    # no /proc/cpuinfo: platform.processor(), then "unknown"
    monkeypatch.setattr(prov, "CPUINFO", tmp_path / "absent")
    assert prov.cpu_model() == "unknown"
    assert np.isfinite(float(f["top1"].iloc[0]))
