from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_eval.core.errors import UserError
from ssl_eval.features.stream import FeatureRows
from ssl_eval.protocols.base import ProtocolInputs
from ssl_eval.protocols.cards import load_card, parse_card
from ssl_eval.protocols.knn import KnnParams, run_knn
from ssl_eval.protocols.search.knn import knn_classify, knn_search
from ssl_eval.protocols.search.topk import _group_factors, search_plan


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


@pytest.mark.slow
def test_torch_backend_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    bank = torch.from_numpy(rng.normal(size=(3000, 8)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, 3000))
    q = torch.from_numpy(rng.normal(size=(2100, 8)).astype(np.float32))
    small = knn_classify(bank, y, q, (20, 200), 0.07, 5, backend="torch", memory_mb=1)
    big = knn_classify(bank, y, q, (20, 200), 0.07, 5, backend="torch", memory_mb=512)
    for k in (20, 200):
        torch.testing.assert_close(small[k], big[k])


@pytest.mark.parametrize(
    "n, k, levels, memory_mb",
    [
        (500, 40, 0, 512),  # a direct partition of the whole row
        (2003, 40, 1, 512),  # one group level, columns left over past the last group
        (20011, 26, 2, 512),  # two group levels, columns left over
        (20011, 26, 2, 1),  # ... in several bank chunks, merged
        (6000, 6000, 0, 512),  # k = the whole bank
        (6000, 6000, 0, 1),  # ... a query at a time: each block's result outlives the buffer
    ],
)
def test_grouped_selection_returns_exactly_the_k_best(n, k, levels, memory_mb):
    """The torch search's grouped selection (group maxima, then the members of the k best
    groups) against a plain ``torch.topk`` of the full similarity matrix: the same values,
    each index pointing at its value, no index twice. Duplicated bank rows make exact
    ties, including at the k-th place; the last bank row is the best match of one query."""
    g = torch.Generator().manual_seed(n)
    bank = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=1)
    bank[n // 2 : n // 2 + 50] = bank[:50]  # exact duplicates
    # queries: duplicated rows, the bank's last row (a column left over past the last whole
    # group: the best match of its own query), random
    rand = torch.nn.functional.normalize(torch.randn(44, 16, generator=g), dim=1)
    q = torch.cat([bank[:5], bank[-1:], rand])
    assert len(_group_factors(n, k)) == levels  # the path named in the case is the one taken
    full = q @ bank.T
    want = full.topk(k, dim=1).values
    sims, idx = knn_search(bank, q, k, "torch", memory_mb)
    # to float rounding: a chunk of one query is a matrix-vector product, summed in another order
    torch.testing.assert_close(sims, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(full.gather(1, idx), sims, rtol=0, atol=1e-6)
    assert (idx.sort(1).values.diff(1) > 0).all()


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


def _fp16_memmap(tmp_path, name, a):
    np.save(tmp_path / name, a.astype(np.float16))
    return np.load(tmp_path / name, mmap_mode="r")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_streamed_search_of_a_memmapped_bank_equals_the_in_memory_search(tmp_path, backend):
    """A float16 memmap read in chunks (bank and queries both chunked, sizes that do not divide
    N or Q) gives exactly the neighbours of one in-memory float32 block, and the same votes to
    float32 rounding (a tie may be summed in another order)."""
    rng = np.random.default_rng(4)
    N, Q, D, C = 1037, 1500, 48, 6
    bank = _fp16_memmap(tmp_path, "bank.npy", rng.normal(size=(N, D)))
    queries = _fp16_memmap(tmp_path, "q.npy", rng.normal(size=(Q, D)))
    y = torch.from_numpy(rng.integers(0, C, N))
    plan = search_plan(N, Q, D, 200, 1, itemsize=2)
    assert plan["query_chunk"] < Q and Q % plan["query_chunk"] and N % plan["bank_chunk"]
    assert plan["bank_chunk"] < N
    streamed = knn_classify(bank, y, queries, (20, 200), 0.07, C, backend, memory_mb=1)
    whole_b = torch.from_numpy(np.asarray(bank, dtype=np.float32))
    whole_q = torch.from_numpy(np.asarray(queries, dtype=np.float32))
    assert search_plan(N, Q, D, 200, 512)["bank_chunk"] == N  # one block: nothing streamed
    ref = knn_classify(whole_b, y, whole_q, (20, 200), 0.07, C, backend, memory_mb=512)
    s_s, i_s = knn_search(
        FeatureRows(bank).normalised(), FeatureRows(queries).normalised(), 200, backend, 1
    )
    s_r, i_r = knn_search(
        torch.nn.functional.normalize(whole_b, dim=1),
        torch.nn.functional.normalize(whole_q, dim=1),
        200,
        backend,
        512,
    )
    # the same similarities bit for bit and the same neighbour sets; the order of neighbours
    # with exactly equal similarity (float16 values make ties) is the only freedom
    assert torch.equal(s_s, s_r)
    assert torch.equal(i_s.sort(1).values, i_r.sort(1).values)
    assert torch.equal(s_s[i_s != i_r], s_r[i_s != i_r])
    for k in (20, 200):
        torch.testing.assert_close(streamed[k], ref[k], rtol=1e-6, atol=0)
        assert torch.equal(streamed[k].argmax(1), ref[k].argmax(1))


@pytest.mark.slow
def test_run_knn_on_a_memmap_equals_run_knn_in_memory_and_records_its_chunks(tmp_path):
    rng = np.random.default_rng(5)
    means = rng.normal(size=(5, 12)) * 2
    y, yt = rng.integers(0, 5, 1300), rng.integers(0, 5, 1100)
    x = means[y] + rng.normal(size=(1300, 12))
    xt = means[yt] + rng.normal(size=(1100, 12))
    tr, va = np.arange(0, 1300, 1)[np.arange(1300) % 7 != 3], np.arange(3, 1300, 7)
    p = KnnParams(ks=(5, 50), memory_mb=1)
    mm = ProtocolInputs(
        _fp16_memmap(tmp_path, "x.npy", x), y, _fp16_memmap(tmp_path, "xt.npy", xt), yt, tr, va, 5
    )
    mem = ProtocolInputs(
        x.astype(np.float16).astype(np.float32),
        y,
        xt.astype(np.float16).astype(np.float32),
        yt,
        tr,
        va,
        5,
    )
    a, b = run_knn(mm, p), run_knn(mem, KnnParams(ks=(5, 50), memory_mb=512))
    assert a.metrics == b.metrics and a.details["val_top1"] == b.details["val_top1"]
    for m in a.per_sample:
        assert (a.per_sample[m] == b.per_sample[m]).all()
    # and both are the straightforward k-NN on train minus val (k chosen there), then on train
    x16, xt16 = x.astype(np.float16).astype(np.float32), xt.astype(np.float16).astype(np.float32)
    for k in (5, 50):
        val_pred = reference_knn(x16[tr], y[tr], x16[va], k, 0.07, 5).argmax(1)
        assert a.details["val_top1"][str(k)] == (val_pred == y[va]).mean()
        test_pred = reference_knn(x16, y, xt16, k, 0.07, 5).argmax(1)
        assert (a.per_sample[f"top1@k{k}"] == (test_pred == yt)).all()
    chunks = a.details["chunks"]
    assert chunks["test"]["bank_chunk"] < 1300 and chunks["test"]["query_chunk"] < 1100
    assert chunks == {
        "val": search_plan(len(tr), len(va), 12, 50, 1, 2),
        "test": search_plan(1300, 1100, 12, 50, 1, 2),
    }


def _rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.slow
def test_streaming_a_memmap_releases_its_pages_past_the_budget(tmp_path, gather):
    """Reading a 64 MB float16 memmap through FeatureRows keeps at most about release_mb of it
    resident; without the release the whole file stays mapped (the defect: RSS grows with N)."""
    np.save(tmp_path / "x.npy", np.ones((32768, 1024), np.float16))

    def grow(release_mb):
        x = np.load(tmp_path / "x.npy", mmap_mode="r")
        rows = FeatureRows(x, release_mb=release_mb)
        before, peak = _rss_file_mb(), 0.0
        order = np.random.default_rng(0).permutation(len(x)) if gather else None
        for s in range(0, len(x), 128):
            rows.take(order[s : s + 128]) if gather else rows.read(s, s + 128)
            peak = max(peak, _rss_file_mb() - before)
        return peak

    assert grow(None) > 48  # never released: the whole file was mapped, the measurement sees it
    assert grow(8) < 8 + 8  # the budget plus one chunk (128 rows, at most 8 MB gathered)
