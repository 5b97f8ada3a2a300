"""benchmarks/gpu_checks.py runs end to end at tiny sizes on the CPU (so the script a lent GPU
runs is known to work), and knn_gpu.py chooses the fastest search and records the choice."""

import importlib.util
import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from ssl_eval.protocols.search.gpu import GPU_SEARCHES, GpuSearch, choose, gpu_knn_search
from ssl_eval.protocols.search.knn import knn_search


def _script():
    spec = importlib.util.spec_from_file_location(
        "gpu_checks", ROOT / "benchmarks" / "gpu_checks.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_checks"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_gpu_checks_smoke_runs_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert _script().main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["smoke"] and res["device"] == "cpu"
    for name in ("env", "decode", "extract", "knn", "finetune", "headline"):
        assert "error" not in res[name], res[name]
    assert res["decode"]["to"] == [32, 32, 3] and res["decode"]["images"] == 12
    assert {"plain", "channels_last+pinned", "forward_only_resident_batch"} <= set(res["extract"])
    assert res["knn"]["auto"]["backend"] == "torch"  # the only search a CPU offers
    assert "faiss_gpu" in res["knn"]["auto"]["unavailable"]
    assert res["knn"]["auto_fp16"].startswith("not measured")  # float16 runs on a GPU only
    head = res["headline"]
    assert set(head["phases_s"]) == {"extract_train", "extract_test", "knn", "linear", "fewshot"}
    assert head["full_size_phases_s"]["knn"] == pytest.approx(
        head["phases_s"]["knn"] * 100,
        rel=0.05,
        abs=0.6,  # phases are rounded to 10 ms, estimates to 0.1 s
    )
    assert "x 100" in head["extrapolation_rule"]


PROBE_METRICS = {
    "linear_aug": "top1",
    "attentive_capi": "top1",
    "attentive_vjepa2": "top1",
    "logreg": "top1",
    "linseg": "miou",
    "lindepth": "rmse",
    "knnseg": "miou",
}


@pytest.mark.slow
def test_probes_smoke_runs_every_newer_protocol_with_its_cpu_reference(tmp_path):
    mod = _script()
    assert "probes" in mod.CHECKS.names()
    out = tmp_path / "gpu.json"
    assert mod.main(["--smoke", "--only", "probes", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"smoke", "device", "probes"}
    probes = res["probes"]
    assert "error" not in probes, probes
    assert set(PROBE_METRICS) <= set(probes) and set(mod.PROBES) == set(PROBE_METRICS)
    for name, metric in PROBE_METRICS.items():
        row = probes[name]
        assert row["ok"] is True and row["card"] == mod.PROBES[name].card, row
        assert row["peak_gpu_mb"] is None  # a CPU has no GPU memory to report
        assert row["seconds"] > 0 and metric in row
        if metric == "rmse":
            assert row[metric] > 0
        else:
            assert 0 <= row[metric] <= 1
    # the online training views ran for the dense recipes; knnseg reads cached tokens
    assert probes["linseg"]["tokens"] == probes["lindepth"]["tokens"] == "online"
    assert probes["knnseg"]["tokens"] == "cached"
    # logistic regression's two paths on the same features: here both on the CPU (numpy)
    ref = probes["logreg"]["reference"]
    assert ref["same_C_and_top1"] is True and ref["selected_C"] == probes["logreg"]["selected_C"]
    # on the CPU the "GPU" run and its float32 CPU reference are the same computation twice
    for name in ("linear_aug", "attentive_capi", "attentive_vjepa2"):
        ref = probes[name]["reference"]
        assert ref["top1"] == probes[name]["top1"]
        assert ref["top1_difference_device_minus_cpu"] == 0.0


@pytest.mark.slow
def test_a_failing_probe_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    mod = _script()
    keep = {n: mod.PROBES[n] for n in ("logreg", "linseg", "knnseg")}
    monkeypatch.setattr(mod, "PROBES", keep)
    real = mod._probe_one

    def planted(ctx, name, probe):
        if name == "linseg":
            raise RuntimeError("planted failure\nsecond line of the message")
        return real(ctx, name, probe)

    monkeypatch.setattr(mod, "_probe_one", planted)
    out = tmp_path / "gpu.json"
    assert mod.main(["--smoke", "--only", "probes", "--out", str(out)]) == 1  # a failure shows
    probes = json.loads(out.read_text())["probes"]
    assert probes["linseg"]["ok"] is False
    assert probes["linseg"]["error"] == "RuntimeError: planted failure"  # one line
    assert probes["logreg"]["ok"] is True and probes["knnseg"]["ok"] is True  # before and after
    assert "miou" in probes["knnseg"] and "top1" in probes["logreg"]
    assert probes["error"] == "sub-probes failed: linseg"


def test_gpu_checks_refuses_to_pretend_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert _script().main([]) == 2
    assert "not measured" in capsys.readouterr().out


def _slow_setup(delay):
    def prepare(bank, memory_mb):
        time.sleep(delay)
        b = bank.clone()
        return lambda q, k: knn_search(b, q, k, "torch", memory_mb)

    return prepare


@pytest.fixture
def fake_searches(monkeypatch):
    """Three stand-in searches, registered for one test only (a registry is global: left
    there, they would be candidates of every later automatic choice)."""
    fakes = dict(GPU_SEARCHES._exact)
    monkeypatch.setattr(GPU_SEARCHES, "_exact", fakes)
    for name, delay in (("test_slow", 0.3), ("test_fast", 0.0)):
        GPU_SEARCHES.register(name, GpuSearch("float32", _slow_setup(delay), lambda d: None))
    GPU_SEARCHES.register(
        "test_absent", GpuSearch("float32", _slow_setup(0), lambda d: "not on this machine")
    )


@pytest.mark.slow
def test_the_fastest_search_is_chosen_and_the_choice_recorded(fake_searches):
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(500, 16, generator=g), dim=1)
    q = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    sims, idx, choice = gpu_knn_search(bank, q, 5, names=["test_slow", "test_fast", "test_absent"])
    assert choice.backend == "test_fast"
    rec = choice.record()
    assert rec["estimates_s"]["test_slow"] > 0.25 > rec["estimates_s"]["test_fast"]
    assert rec["unavailable"] == {"test_absent": "not on this machine"}
    assert rec["precision"] == "float32" and "probe" in rec["chosen_by"]
    ref_s, ref_i = knn_search(bank, q, 5, "torch")
    torch.testing.assert_close(sims, ref_s)
    assert torch.equal(idx, ref_i)


def test_no_available_search_is_an_error_not_a_silent_fallback(fake_searches):
    x = torch.eye(4)
    with pytest.raises(RuntimeError, match="not on this machine"):
        choose(x, x, 1, names=["test_absent"])
