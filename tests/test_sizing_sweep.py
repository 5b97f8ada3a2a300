"""benchmarks/suite_sizing.py --sweep-smoke: the sizing sweep end to end at tiny sizes (a few
variants of the default suite's recipes, trained for one epoch on 512 images, scored on the
validation split). The structure of what it writes, and that a variant really changed what the
trainer received: the crop-scale variant's checkpoint was trained with (0.2, 1) on every view,
the suite's SimCLR with (0.75, 1), and nothing else differs."""

import importlib.util
import json
import sys

import pytest
from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location(
        "suite_sizing", ROOT / "benchmarks" / "suite_sizing.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_sweep_smoke(tmp_path, monkeypatch):
    mod = _load()
    out = tmp_path / "out"
    argv = ["suite_sizing.py", "--sweep-smoke", "--work", str(tmp_path / "w"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    doc = json.loads((out / "sweep-smoke.json").read_text())
    md = (out / "sweep-smoke.md").read_text()

    # structure
    assert "do not edit" in md.splitlines()[0]
    m = doc["machine"]
    assert m["cpu_model"] and m["cores"] >= 1
    assert len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    assert doc["code_version"]
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == set(mod.SMOKE)
    for r in rows.values():
        assert 0 <= r["val_top1"] <= 100 and r["val_images"] > 0
        assert r["val_top1"] == max(r["val_top1_by_k"].values())
        assert f"| {r['variant']} |" in md
    assert rows["pixels"]["train_s"] == 0 and rows["simclr"]["train_s"] > 0
    assert set(doc["step_time"]) == {"16px", "32px"}
    for t in doc["step_time"].values():
        assert t["ms_per_step"] > 0 and t["images_per_s"] > 0

    # the real property: what the trainer received (the checkpoint's resolved config)
    got = doc["resolved_configs"]
    crop = [v["crop_scale"] for v in got["simclr crop 0.2"]["aug"]["global_views"]]
    base = [v["crop_scale"] for v in got["simclr"]["aug"]["global_views"]]
    assert crop == [[0.2, 1.0]] * 2 and base == [[0.75, 1.0]] * 2
    assert rows["simclr crop 0.2"]["changed"] == [
        "aug.global_views.*.crop_scale: [0.75, 1.0] -> [0.2, 1.0]"
    ]
    assert rows["simclr"]["changed"] == ["none: the suite's recipe"]
    side = json.loads(
        (
            tmp_path / "w" / "sweep-smoke" / "checkpoints" / "simclr-crop-0-2" / "backbone.json"
        ).read_text()
    )
    assert side["train_config"] == got["simclr crop 0.2"]
