"""benchmarks/bench_dense.py's plumbing, without its measurements: the synthetic VOC folder is
what ssl-eval's voc2012-seg loader reads, a step is timed from the end of the head's matmuls to
the next batch's call, and a pass over its stated bound makes the script exit 1 (the results
files written either way)."""

import importlib.util
import json

import numpy as np
import pytest
from conftest import ROOT

from ssl_eval.data.datasets import DatasetOptions, get_dataset


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_dense", ROOT / "benchmarks" / "bench_dense.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_synthetic_voc_folder_is_read_by_the_voc_loader(tmp_path):
    mod = _load()
    mod.make_voc(tmp_path, 3, 2)
    b = get_dataset("voc2012-seg", DatasetOptions(data_root=tmp_path))
    assert (len(b.train), len(b.test), len(b.dense.classes)) == (3, 2, 21)
    assert b.train.load(0).shape == (375, 500, 3)
    for split in (b.dense.train, b.dense.test):
        for i in range(len(split)):
            t = split.load(i)
            assert t.shape == (375, 500)
            ids = set(np.unique(t).tolist())
            assert 0 in ids and 255 in ids and ids - {0, 255}  # background, border, a class
            assert max(ids - {255}) < 21


def test_a_step_runs_from_the_end_of_the_matmuls_to_the_next_call():
    mod = _load()
    # (call start, matmul median, matmuls' end): calls at 0, 10, 30, 60 s, matmuls of 1 s
    log = [(0.0, 1.0, 3.0), (10.0, 1.0, 13.0), (30.0, 2.0, 36.0), (60.0, 1.0, 63.0)]
    steps, mms, ratios = mod.step_times(log, warm=1)
    assert steps == [17.0, 24.0] and mms == [1.0, 2.0] and ratios == [17.0, 12.0]


def _passes(added: dict) -> list:
    rec = {"tokens": "cached", "token_bytes": 2**20, "token_budget_bytes": 2**31}
    common = {"train_rows": 32, "val_rows": 0, "test_images": 1, "seconds": 1.0, "blocks": 12,
              "base_mb": 800.0, "anon_added_mb": 1.0, "load_1min_end": 1.0}  # fmt: skip
    step = {"tokens": "cached", "steps_timed": 2, "step_ms_median": 100.0,
            "matmul_ms_median": 1.0, "ratio_quantiles": [90, 95, 100, 105, 110]}  # fmt: skip
    scoring = {"windows_per_image": [2], "overhead_ms": 5.0, "overhead_ms_range": [4.0, 6.0],
               "whole_ms": 50.0, "whole_ms_range": [40.0, 60.0], "grid_ms": 0.1,
               "overhead_over_grid": 50.0, "voc_val_overhead_s": 7.2,
               "voc_val_whole_s": 72.5}  # fmt: skip
    extra = {"tokens": {"record": rec}, "step": step, "scoring": scoring,
             "probe": {"steps": 2, "tokens": "cached"},
             "probe_streamed": {"steps": 1, "tokens": "streamed"}}  # fmt: skip
    return [
        {
            "what": w,
            **common,
            **extra[w],
            "added_mb": added.get(w, 10.0),
            "peak_mb": 800.0 + added.get(w, 10.0),
        }  # fmt: skip
        for w in ("tokens", "step", "probe", "probe_streamed", "scoring")
    ]


def test_a_pass_over_its_bound_exits_1(tmp_path, monkeypatch):
    mod = _load()
    monkeypatch.setattr(mod, "make_voc", lambda *a, **k: None)
    for added, rc in (({}, 0), ({"probe": 1e6}, 1)):
        passes = iter(_passes(added))
        monkeypatch.setattr(mod, "run_child", lambda a, what, it=passes: next(it))
        out = tmp_path / f"out{rc}"
        argv = ["--images", "32", "--out", str(out), "--work", str(tmp_path / "w")]
        assert mod.main(argv) == rc
        res = json.loads((out / "bench_dense.json").read_text())
        within = {p["what"]: p["within_bound"] for p in res["passes"]}
        assert within["probe"] is (rc == 0) and within["tokens"] is True
        assert within["scoring"] is None  # no bound: a timing only
        md = (out / "bench_dense.md").read_text()
        assert ("**NO**" in md) is (rc == 1)
        cpu = [ln.split(":", 1)[1].strip() for ln in res["machine"]["lscpu"] if "Model" in ln]
        assert cpu and cpu[0] in md and "torch_threads" in res["machine"]


def test_a_pass_through_the_cut_vit_is_judged_with_the_whole_models_difference():
    mod = _load()
    b = mod.bounds(32)
    passes = [p | {"blocks": 1} for p in _passes({"probe": b["probe"] - 50})]
    passes += [
        {"what": "forward_whole", "blocks": 12, "added_mb": 600.0},
        {"what": "forward_cut", "blocks": 1, "added_mb": 500.0},
    ]
    mod.judge(passes, b)
    probe = next(p for p in passes if p["what"] == "probe")
    # within on its own figure, over once the whole model's 100 MiB more is added
    assert probe["whole_model_added_mb"] == round(b["probe"] + 50, 1)
    assert probe["within_bound"] is False
    assert all(p["within_bound"] for p in passes if p["what"] in ("tokens", "forward_whole"))


@pytest.mark.slow
def test_suite_dense_scores_the_validation_rows_and_never_the_test_split():
    spec = importlib.util.spec_from_file_location(
        "suite_dense", ROOT / "benchmarks" / "suite_dense.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    b = get_dataset("shapes-seg", DatasetOptions())
    train_idx, val_idx = np.array([0, 2, 3, 5]), np.array([1, 4])
    view = mod.validation_view(b, train_idx, val_idx)
    assert np.array_equal(view.train.images, b.train.images[train_idx])
    assert np.array_equal(view.test.images, b.train.images[val_idx])
    assert np.array_equal(view.dense.train.targets, b.dense.train.targets[train_idx])
    assert np.array_equal(view.dense.test.targets, b.dense.train.targets[val_idx])
    assert view.fingerprint != b.fingerprint  # no cache entry of the whole split is reused
