"""k-NN search on a GPU: whichever of the registered searches is fastest at the size at hand,
chosen by measuring each on the real bank and a slice of the real queries, and recorded.

Candidates (``GPU_SEARCHES``):
  * ``torch``: knn_search's torch matmul + exact two-stage top-k, in float32;
  * ``torch_fp16``: the same with bank and queries in float16 (tensor cores);
  * ``faiss_gpu_fp16``: a FAISS GPU flat inner-product index storing the bank in float16
    (needs a faiss GPU build; left out, and said so, when there is none).
The float16 searches rank by float16 products: neighbours whose similarities differ by less
than float16's resolution (about 1e-3 at 1) may swap, so the choice and its precision are
returned for the protocol's details (``GpuChoice.record``), never implied.

Each candidate is timed as ``setup`` (bank to its form: a cast, an index) plus a probe search of
up to ``PROBE_QUERIES`` queries, extrapolated linearly to all queries; the fastest estimate
wins and the full search reuses the winner's prepared bank. The decision is not cached across
calls: the probe costs a few percent of a large search.

Hook (the k-NN protocol; not wired here): in ``knn_search.knn_search``, when ``backend`` is
``auto`` and the queries are on a CUDA device, call ``gpu_knn_search(bank, queries, k,
memory_mb)`` instead of resolving a backend, and pass ``choice.record()`` up into the k-NN
protocol's details (protocols/knn.py's ``details["backend"]``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .registry import Registry

PROBE_QUERIES = 2048

Searcher = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GpuSearch:
    """``prepare(bank, memory_mb)`` -> a searcher ``(queries, k) -> (sims, idx)``."""

    precision: str
    prepare: Callable[[torch.Tensor, int], Searcher]
    available: Callable[[torch.device], str | None]  # None if usable, else why not


GPU_SEARCHES: Registry[GpuSearch] = Registry("GPU k-NN search")


@dataclass
class GpuChoice:
    backend: str
    precision: str
    estimates_s: dict  # candidate -> setup + probe extrapolated to every query
    measured: dict = field(default_factory=dict)  # candidate -> {"setup_s", "probe_s"}
    unavailable: dict = field(default_factory=dict)  # candidate -> why not
    probe_queries: int = 0

    def record(self) -> dict:
        return {
            "backend": self.backend,
            "precision": self.precision,
            "chosen_by": f"fastest setup + search estimate from a {self.probe_queries}-query probe",
            "estimates_s": {k: round(v, 4) for k, v in self.estimates_s.items()},
            "unavailable": dict(self.unavailable),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def choose(
    bank: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    memory_mb: int = 512,
    names: list[str] | None = None,
) -> tuple[GpuChoice, Searcher]:
    """Measure every available candidate (``names``, default all) on ``bank`` and a probe of
    ``queries``; return the choice and the winner's prepared searcher."""
    dev = queries.device
    nq = len(queries)
    probe = queries[: min(PROBE_QUERIES, nq)]
    kk = min(k, len(bank))
    est, measured, unavailable, searchers = {}, {}, {}, {}
    for name in names or GPU_SEARCHES.names():
        cand = GPU_SEARCHES.get(name)
        why = cand.available(dev)
        if why is not None:
            unavailable[name] = why
            continue
        _sync(dev)
        t0 = time.perf_counter()
        search = cand.prepare(bank, memory_mb)
        _sync(dev)
        t1 = time.perf_counter()
        search(probe[: min(64, len(probe))], kk)  # warm-up: kernels, workspaces
        _sync(dev)
        t2 = time.perf_counter()
        search(probe, kk)
        _sync(dev)
        t3 = time.perf_counter()
        measured[name] = {"setup_s": t1 - t0, "probe_s": t3 - t2}
        est[name] = (t1 - t0) + (t3 - t2) * nq / len(probe)
        searchers[name] = search
    if not est:
        raise RuntimeError(f"no GPU k-NN search is available: {unavailable}")
    best = min(est, key=est.get)
    choice = GpuChoice(
        best, GPU_SEARCHES.get(best).precision, est, measured, unavailable, len(probe)
    )
    return choice, searchers[best]


def gpu_knn_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, memory_mb: int = 512, names=None
) -> tuple[torch.Tensor, torch.Tensor, GpuChoice]:
    """Top-``k`` cosine neighbours (inputs L2-normalised) by the fastest candidate, with the
    choice: (similarities float32 (Q, k), indices int64 (Q, k), GpuChoice)."""
    choice, search = choose(bank, queries, k, memory_mb, names)
    sims, idx = search(queries, min(k, len(bank)))
    return sims.float(), idx.long(), choice


# ---------------------------------------------------------------- candidates


def _torch(dtype: torch.dtype) -> Callable[[torch.Tensor, int], Searcher]:
    def prepare(bank: torch.Tensor, memory_mb: int) -> Searcher:
        from .knn_search import _search_torch

        b = bank.to(dtype)

        def search(q: torch.Tensor, k: int):
            return _search_torch(b, q.to(dtype), k, memory_mb)

        return search

    return prepare


def _fp16_ok(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "float16 search runs on a GPU only"


def _faiss_gpu_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "faiss GPU indexes need a CUDA device"
    try:
        import faiss
    except ImportError:
        return "faiss is not installed"
    if not hasattr(faiss, "GpuIndexFlatIP") or faiss.get_num_gpus() < 1:
        return "this faiss build has no GPU support (pip install faiss-gpu-cu12)"
    return None


def _faiss_fp16(bank: torch.Tensor, memory_mb: int) -> Searcher:
    import faiss
    import numpy as np

    dev = bank.device
    res = faiss.StandardGpuResources()
    cfg = faiss.GpuIndexFlatConfig()
    cfg.useFloat16 = True
    cfg.device = dev.index if dev.index is not None else torch.cuda.current_device()
    index = faiss.GpuIndexFlatIP(res, bank.shape[1], cfg)
    index.add(np.ascontiguousarray(bank.float().cpu().numpy()))
    chunk = max(1024, (memory_mb << 20) // (12 * 256))

    def search(q: torch.Tensor, k: int):
        sims, idx = [], []
        for s in range(0, len(q), chunk):
            d, i = index.search(np.ascontiguousarray(q[s : s + chunk].float().cpu().numpy()), k)
            sims.append(torch.from_numpy(d))
            idx.append(torch.from_numpy(i))
        return torch.cat(sims).to(q.device), torch.cat(idx).to(q.device)

    search.index = index  # keeps the GPU resources alive with the searcher
    search.res = res
    return search


GPU_SEARCHES.register(
    "torch",
    GpuSearch("float32", _torch(torch.float32), lambda d: None),
    "torch matmul + top-k, float32",
)
GPU_SEARCHES.register(
    "torch_fp16",
    GpuSearch("float16", _torch(torch.float16), _fp16_ok),
    "torch matmul + top-k, float16",
)
GPU_SEARCHES.register(
    "faiss_gpu_fp16",
    GpuSearch("float16 (bank stored in float16)", _faiss_fp16, _faiss_gpu_available),
    "FAISS GPU flat IP index, float16 storage",
)
