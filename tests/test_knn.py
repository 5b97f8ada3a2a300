import numpy as np
import pytest
import torch

from ssl_eval.errors import UserError
from ssl_eval.knn_search import knn_classify
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.cards import load_card, parse_card
from ssl_eval.protocols.knn import KnnParams, run_knn


def reference_knn(bank, bank_y, queries, k, T, C):
    """Straightforward weighted k-NN: full similarity matrix, argsort, loop over queries."""
    b = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ b.T
    out = np.zeros((len(q), C))
    for i in range(len(q)):
        order = np.argsort(-sims[i], kind="stable")[:k]
        for j in order:
            out[i, bank_y[j]] += np.exp(sims[i, j] / T)
    return out


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_matches_reference_for_every_k(backend):
    rng = np.random.default_rng(0)
    C, D = 7, 16
    bank = rng.normal(size=(600, D)).astype(np.float32)
    bank_y = rng.integers(0, C, 600)
    queries = rng.normal(size=(150, D)).astype(np.float32)
    ks = (1, 10, 20, 100, 200)
    scores = knn_classify(
        torch.from_numpy(bank),
        torch.from_numpy(bank_y),
        torch.from_numpy(queries),
        ks,
        0.07,
        C,
        backend=backend,
    )
    for k in ks:
        ref = reference_knn(bank, bank_y, queries, k, 0.07, C)
        got = scores[k].numpy()
        np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-6 * ref.max())
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_torch_backend_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    bank = torch.from_numpy(rng.normal(size=(3000, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, 3000))
    q = torch.from_numpy(rng.normal(size=(2100, 8)).astype(np.float32))
    small = knn_classify(bank, y, q, (20, 200), 0.07, 5, backend="torch", memory_mb=1)
    big = knn_classify(bank, y, q, (20, 200), 0.07, 5, backend="torch", memory_mb=512)
    for k in (20, 200):
        torch.testing.assert_close(small[k], big[k])


def test_k_larger_than_bank_is_clamped():
    rng = np.random.default_rng(2)
    bank = torch.from_numpy(rng.normal(size=(30, 4)).astype(np.float32))
    y = torch.arange(30) % 3
    q = bank[:5].clone()
    s = knn_classify(bank, y, q, (200,), 0.07, 3, backend="torch")
    ref = reference_knn(bank.numpy(), y.numpy(), q.numpy(), 30, 0.07, 3)
    np.testing.assert_allclose(s[200].numpy(), ref, rtol=1e-4)


def test_run_knn_selects_k_on_val_and_reports_all_k():
    rng = np.random.default_rng(3)
    means = rng.normal(size=(4, 10)) * 3
    y = rng.integers(0, 4, 800)
    x = (means[y] + rng.normal(size=(800, 10))).astype(np.float16)
    yt = rng.integers(0, 4, 200)
    xt = (means[yt] + rng.normal(size=(200, 10))).astype(np.float16)
    inp = ProtocolInputs(x, y, xt, yt, np.arange(700), np.arange(700, 800), 4)
    out = run_knn(inp, KnnParams())
    assert out.details["selected_k"] in (10, 20, 100, 200)
    for k in (10, 20, 100, 200):
        assert 0.0 <= out.metrics[f"top1@k{k}"] <= 1.0
    assert out.metrics["top1"] == out.metrics[f"top1@k{out.details['selected_k']}"]
    assert out.metrics["top1"] > 0.9


BAD_PARAMS = [
    ({"ks": []}, "ks"),
    ({"ks": [10, 0]}, "ks"),
    ({"ks": [-5]}, "ks"),
    ({"temperature": 0}, "temperature"),
    ({"temperature": -0.07}, "temperature"),
    ({"backend": "annoy"}, "backend"),
    ({"select_k": "best"}, "select_k"),
    ({"select_k": "7"}, "select_k"),  # an integer, but not one of ks
    ({"select_k": 7}, "select_k"),
    ({"memory_mb": 0}, "memory_mb"),
]


@pytest.mark.parametrize("bad,param", BAD_PARAMS)
def test_bad_knn_params_fail_when_the_card_is_parsed(bad, param):
    raw = {
        "name": "mine",
        "version": 1,
        "type": "knn",
        "params": {"ks": [10, 20], "select_k": "val", **bad},
    }
    with pytest.raises(UserError, match=rf"^knn: {param} "):
        parse_card(raw, "mine.yaml")


@pytest.mark.parametrize("bad,param", BAD_PARAMS)
def test_bad_knn_override_fails_when_the_card_loads(bad, param):
    [(key, value)] = bad.items()
    with pytest.raises(UserError, match=rf"^knn: {param} "):
        load_card("knn", [f"{key}={value}"])


@pytest.mark.parametrize(
    "good",
    [
        "select_k=20",
        "select_k='200'",
        "backend=torch",
        "backend=faiss",
        "ks=[5]",
        "temperature=1",
        "memory_mb=1",
    ],
)
def test_good_knn_overrides_load(good):
    assert isinstance(
        load_card("knn", [good]).params, KnnParams
    )  # the shipped ks: 10, 20, 100, 200
