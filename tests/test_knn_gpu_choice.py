"""The k-NN card's automatic backends on a GPU (knn_gpu.auto_search, wired through
knn_search): only searches of the asked precision compete, the choice lands in the protocol's
details, float16 is asked for by name and refused off a GPU, and a search that cannot return k
neighbours is left out. The GPU itself is stood in for on the CPU: ``_chooses_on`` says yes and
stand-in searches are registered for one test at a time."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ssl_eval.protocols.search.knn as knn_search_mod
from ssl_eval.core.errors import UserError
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.knn import KnnParams, run_knn
from ssl_eval.protocols.search.gpu import GPU_SEARCHES, GpuSearch, _torch, choose
from ssl_eval.protocols.search.knn import knn_search


def _plain(delay, calls=None, name=""):
    def prepare(bank, memory_mb):
        time.sleep(delay)
        b = bank.clone()

        def search(q, k):
            if calls is not None:
                calls.append(name)
            return knn_search(b, q, k, "torch", memory_mb)

        return search

    return prepare


@pytest.fixture
def gpu_standin(monkeypatch):
    """A 'GPU' on the CPU with only stand-in searches: a slow and a fast float32 one, a float16
    one faster still, and a fast float32 one limited to 3 neighbours."""
    monkeypatch.setattr(GPU_SEARCHES, "_exact", {})
    monkeypatch.setattr(knn_search_mod, "_chooses_on", lambda device: True)
    calls: list = []
    for name, prec, delay, max_k in (
        ("f32_slow", "float32", 0.3, None),
        ("f32_fast", "float32", 0.0, None),
        ("f16_fastest", "float16", 0.0, None),
        ("f32_capped", "float32", 0.0, 3),
    ):
        GPU_SEARCHES.register(
            name, GpuSearch(prec, _plain(delay, calls, name), lambda d: None, max_k)
        )
    return calls


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(4, 8)) * 2
    y, yt = rng.integers(0, 4, 300), rng.integers(0, 4, 120)
    x = (means[y] + rng.normal(size=(300, 8))).astype(np.float32)
    xt = (means[yt] + rng.normal(size=(120, 8))).astype(np.float32)
    tr, va = np.arange(300)[np.arange(300) % 5 != 0], np.arange(0, 300, 5)
    return ProtocolInputs(x, y, xt, yt, tr, va, 4)


@pytest.mark.slow
def test_auto_chooses_among_float32_searches_and_records_the_choice(gpu_standin):
    out = run_knn(_inputs(), KnnParams(ks=(5, 20), backend="auto"))
    assert out.details["backend"] == "auto"
    for split in ("val", "test"):
        (rec,) = out.details["searches"][split]
        # the float16 search is faster but was not asked for; the capped one cannot give k=20
        assert rec["backend"] == "f32_fast" and rec["precision"] == "float32"
        assert set(rec["estimates_s"]) == {"f32_slow", "f32_fast"}
        assert "at most 3" in rec["unavailable"]["f32_capped"]
        assert "probe" in rec["chosen_by"]
    plain = run_knn(_inputs(), KnnParams(ks=(5, 20), backend="torch"))
    assert out.metrics == plain.metrics
    for m, v in plain.per_sample.items():
        assert np.array_equal(out.per_sample[m], v)


def test_auto_fp16_chooses_among_float16_searches_only(gpu_standin):
    out = run_knn(_inputs(), KnnParams(ks=(5, 20), backend="auto_fp16"))
    (rec,) = out.details["searches"]["test"]
    assert rec["backend"] == "f16_fastest" and set(rec["estimates_s"]) == {"f16_fastest"}


def test_auto_fp16_is_refused_off_a_gpu_in_one_line():
    with pytest.raises(UserError, match="float16 on a GPU only.*use backend=auto") as e:
        run_knn(_inputs(), KnnParams(ks=(5,), backend="auto_fp16"))
    assert "\n" not in str(e.value)


def test_the_cpu_auto_backend_is_a_fixed_rule_with_no_probe():
    out = run_knn(_inputs(), KnnParams(ks=(5,), backend="auto"))
    assert out.details["backend"] in ("faiss", "torch") and "searches" not in out.details


def test_the_torch_float16_search_multiplies_in_float16():
    """The float16 candidate rounds bank and queries to float16 and returns float16 products
    (not a float32 search under a float16 name)."""
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(400, 32, generator=g), dim=1)
    q = F.normalize(torch.randn(30, 32, generator=g), dim=1)
    sims, idx = _torch(torch.float16)(bank, 512)(q, 10)
    assert torch.equal(sims, sims.half().float())  # every similarity is a float16 value
    exact, _ = knn_search(bank, q, 10, "torch")
    assert not torch.equal(sims, exact)
    torch.testing.assert_close(sims, exact, rtol=0, atol=4e-3)


def test_a_search_that_cannot_return_k_is_left_out_and_said_so(gpu_standin):
    x = F.normalize(torch.randn(50, 4), dim=1)
    choice, _ = choose(x, x, 10, names=["f32_capped", "f32_fast"])
    assert choice.backend == "f32_fast"
    assert choice.unavailable == {"f32_capped": "returns at most 3 neighbours, 10 asked"}
