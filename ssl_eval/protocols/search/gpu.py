"""k-NN search on a GPU: whichever registered search of the asked precision is fastest at the
size at hand, chosen by measuring each on the real bank and a slice of the real queries, and
recorded.

Candidates (``GPU_SEARCHES``), by precision:
  * float32: ``torch`` (knn_search's torch matmul + grouped top-k) and ``faiss_gpu`` (a FAISS
    GPU flat inner-product index, float32 storage). Both are exact float32 searches: they differ
    only in the summation order of the dot products (float rounding), and exact ties are then
    ordered canonically by the k-NN protocol;
  * float16: ``torch_fp16`` (bank and queries rounded to float16, float16 products) and
    ``faiss_gpu_fp16`` (bank stored in float16). Neighbours whose similarities differ by less
    than float16's resolution (about 1e-3 at 1) may swap against a float32 search.

Precision is never chosen by timing: the k-NN card's ``backend`` asks for it (``auto``:
float32, ``auto_fp16``: float16, which is then part of the record's setting), and only the
searches of that precision compete. A search that cannot return k neighbours (FAISS GPU
indexes stop at k = 2,048) is left out for that k, and said so.

Each candidate is timed as ``setup`` (bank to its form: a cast, an index) plus a probe search of
up to ``PROBE_QUERIES`` queries, extrapolated linearly to all queries; the fastest estimate
wins and the full search reuses the winner's prepared bank. Across a torchrun world the ranks
must search alike, so there the torch search of the asked precision runs without a probe
(recorded as such). The choice (``GpuChoice.record``) goes into the k-NN protocol's details.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...core.registry import Registry
from .topk import block_topk, search_blocks

FAISS_GPU_MAX_K = 2048  # the most neighbours a FAISS GPU flat index returns

PROBE_QUERIES = 2048

Searcher = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GpuSearch:
    """``prepare(bank, memory_mb)`` -> a searcher ``(queries, k) -> (sims, idx)``."""

    precision: str
    prepare: Callable[[torch.Tensor, int], Searcher]
    available: Callable[[torch.device], str | None]  # None if usable, else why not
    max_k: int | None = None  # the most neighbours one search returns (None: any)

    @property
    def family(self) -> str:
        """``float32`` or ``float16``: what the k-NN card's backend asks for."""
        return self.precision.split()[0]


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
        if why is None and cand.max_k is not None and kk > cand.max_k:
            why = f"returns at most {cand.max_k} neighbours, {kk} asked"
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
    """knn_search's torch search with every block's products in ``dtype``: the streamed
    chunks arrive in float32 and are rounded to ``dtype`` before the matmul."""

    def prepare(bank: torch.Tensor, memory_mb: int) -> Searcher:
        b = bank.to(dtype)

        def search(q: torch.Tensor, k: int):
            scratch: list = []

            def block(qc, blk, kk):
                return block_topk(qc.to(dtype), blk.to(dtype), kk, scratch)

            s, i = search_blocks(b, q.to(dtype), k, memory_mb, block)
            return s.float(), i

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


def _faiss_gpu(float16: bool) -> Callable[[torch.Tensor, int], Searcher]:
    def prepare(bank: torch.Tensor, memory_mb: int) -> Searcher:
        import faiss
        import numpy as np

        dev = bank.device
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = float16
        cfg.device = dev.index if dev.index is not None else torch.cuda.current_device()
        index = faiss.GpuIndexFlatIP(res, bank.shape[1], cfg)
        index.add(np.ascontiguousarray(bank.float().cpu().numpy()))
        chunk = max(1024, (memory_mb << 20) // (12 * 256))

        def search(q: torch.Tensor, k: int):
            sims, idx = [], []
            for s in range(0, len(q), chunk):
                part = np.ascontiguousarray(q[s : s + chunk].float().cpu().numpy())
                d, i = index.search(part, k)
                sims.append(torch.from_numpy(d))
                idx.append(torch.from_numpy(i))
            return torch.cat(sims).to(q.device), torch.cat(idx).to(q.device)

        search.index = index  # keeps the GPU resources alive with the searcher
        search.res = res
        return search

    return prepare


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
    "faiss_gpu",
    GpuSearch("float32", _faiss_gpu(False), _faiss_gpu_available, FAISS_GPU_MAX_K),
    "FAISS GPU flat IP index, float32",
)
GPU_SEARCHES.register(
    "faiss_gpu_fp16",
    GpuSearch(
        "float16 (bank stored in float16)", _faiss_gpu(True), _faiss_gpu_available, FAISS_GPU_MAX_K
    ),
    "FAISS GPU flat IP index, float16 storage",
)


def auto_search(bank, queries, k: int, memory_mb: int, precision: str, record: list | None):
    """The protocol's entry: the top ``k`` of ``queries`` (L2-normalised ``FeatureRows``,
    tensors or arrays) in ``bank`` by the fastest search of ``precision`` (``float32`` or
    ``float16``), the choice appended to ``record``."""
    from ...core import distributed
    from ...features.stream import as_rows

    b, q = as_rows(bank), as_rows(queries)
    b_t, q_t = b.read(0, len(b)), q.read(0, len(q))
    names = [n for n in GPU_SEARCHES.names() if GPU_SEARCHES.get(n).family == precision]
    if distributed.world() > 1:  # every rank must run the same search: no per-rank probe
        names = ["torch" if precision == "float32" else "torch_fp16"]
    sims, idx, choice = gpu_knn_search(b_t, q_t, k, memory_mb, names)
    if record is not None:
        rec = choice.record()
        if distributed.world() > 1:
            rec["chosen_by"] = "fixed under torchrun (every rank searches alike)"
        record.append(rec | {"k": min(k, len(b)), "queries": len(q)})
    return sims, idx
