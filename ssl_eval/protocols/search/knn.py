"""Exact k-NN on L2-normalised features (cosine similarity) and the weighted vote of Wu et al.
2018 and DINO: each of the k nearest bank examples votes for its class with weight
exp(sim / T). The k-NN protocol (protocols/knn.py) and the trainer's online monitor
(train/monitor.py) both call ``knn_classify``, so the two report the same number.

All k values are answered from ONE search for the largest k. The search runs on FAISS (a GPU
index when a GPU and a faiss GPU build are present) or on plain torch matmul + top-k. Queries
and bank are both read in chunks (``FeatureRows``: a memory-mapped float16 cache is converted
to float32 one chunk at a time), with chunk sizes from ``memory_mb`` (``search_plan``), so
memory stays bounded by the chunks, not by the bank's size.
"""

from __future__ import annotations

import torch

from ...core.errors import UserError
from ...core.registry import Registry
from ...features.stream import as_rows
from .gpu import FAISS_GPU_MAX_K
from .topk import block_topk, search_blocks, search_plan, sort_desc


def _search_torch(bank, queries, k: int, memory_mb: int):
    """Exact top-``k`` of one bank (a tensor, an array or ``FeatureRows``: one shard of a
    sharded bank is searched the same way) on torch matmul + top-k blocks."""
    scratch: list = []  # one similarity buffer for the whole search
    return search_blocks(
        bank, queries, k, memory_mb, lambda q, blk, kk: block_topk(q, blk, kk, scratch)
    )


def _faiss_gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _search_faiss(bank, queries, k: int, memory_mb: int):
    try:
        import faiss
    except ImportError as e:
        raise UserError(
            "k-NN backend 'faiss' needs faiss: pip install faiss-cpu (or the [gpu] extra)"
        ) from e
    bank, queries = as_rows(bank), as_rows(queries)
    dev = queries.device
    if dev.type == "cuda" and _faiss_gpu_available() and k > FAISS_GPU_MAX_K:
        # a FAISS GPU index returns at most 2,048 neighbours (the k-NN protocol's re-search of
        # a query with ties at the k-th place asks for the whole bank): the exact float32 torch
        # search answers instead
        return _search_torch(bank, queries, k, memory_mb)
    if dev.type == "cuda" and _faiss_gpu_available():
        # a GPU index holds the bank in GPU memory; the queries still come in chunks
        index = faiss.index_cpu_to_gpu(
            faiss.StandardGpuResources(), torch.cuda.current_device(), faiss.IndexFlatIP(bank.dim)
        )
        b = bank.read(0, len(bank)).cpu().numpy()
        index.add(b)
        del b
        sims, idx = [], []
        qc = search_plan(len(bank), len(queries), bank.dim, k, memory_mb)["query_chunk"]
        for qs in range(0, len(queries), qc):
            s, i = index.search(queries.read(qs, qs + qc).cpu().numpy(), k)
            sims.append(torch.from_numpy(s))
            idx.append(torch.from_numpy(i))
        return torch.cat(sims).to(dev), torch.cat(idx).to(dev)

    def block(q: torch.Tensor, blk: torch.Tensor, kk: int):
        # exact search straight on the block's memory (an IndexFlatIP would first copy it)
        s, i = faiss.knn(q.cpu().numpy(), blk.cpu().numpy(), kk, faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(s).to(dev), torch.from_numpy(i).to(dev)

    # faiss multiplies blocks of (query_bs x database_bs); its default database block (1024)
    # leaves the GEMM well short of the machine's rate: use up to 8192 columns within
    # memory_mb. Restored afterwards.
    cv = faiss.cvar
    saved = cv.distance_compute_blas_database_bs
    cv.distance_compute_blas_database_bs = max(
        saved, min(8192, (memory_mb << 20) // (4 * max(1, cv.distance_compute_blas_query_bs)))
    )
    try:
        return search_blocks(bank, queries, k, memory_mb, block)
    finally:
        cv.distance_compute_blas_database_bs = saved


SEARCH_BACKENDS: Registry = Registry("k-NN backend")
SEARCH_BACKENDS.register("torch", _search_torch, "plain torch matmul + top-k")
SEARCH_BACKENDS.register("faiss", _search_faiss, "FAISS exact inner-product index")


AUTO_PRECISION = {"auto": "float32", "auto_fp16": "float16"}  # the card's automatic backends


def _chooses_on(device: torch.device) -> bool:
    """Whether an automatic backend is chosen by a probe among GPU searches (knn_gpu.py) on
    ``device``: on CUDA. On the CPU ``auto`` is a fixed rule (``resolve_backend``)."""
    return device.type == "cuda"


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs: ``name`` itself; for ``auto`` on the CPU, FAISS when installed,
    else torch; ``auto`` and ``auto_fp16`` on a GPU stay automatic (the fastest GPU search of
    their precision, chosen per search and recorded). ``auto_fp16`` elsewhere is an error."""
    if name in AUTO_PRECISION:
        if _chooses_on(device):
            return name
        if name != "auto":
            raise UserError(
                f"knn: backend {name} searches in float16 on a GPU only, and this run is on "
                f"{device.type}; use backend=auto (float32)"
            )
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "torch"
        return "faiss"
    SEARCH_BACKENDS.get(name)
    return name


def knn_search(bank, queries, k: int, backend: str = "auto", memory_mb: int = 512, record=None):
    """Top-``k`` cosine neighbours of every query. Inputs must be L2-normalised: tensors, arrays
    (a memory-mapped cache is read a chunk at a time, never copied whole) or ``FeatureRows``.
    Returns (similarities (Q, k) float32, indices (Q, k) int64 into the bank), best first.
    An automatic choice among GPU searches is appended to the list ``record``, if given."""
    bank, queries = as_rows(bank), as_rows(queries)
    k = min(k, len(bank))
    name = resolve_backend(backend, queries.device)
    if name in AUTO_PRECISION:
        from .gpu import auto_search

        sims, idx = auto_search(bank, queries, k, memory_mb, AUTO_PRECISION[name], record)
        return sort_desc(sims, idx)
    return SEARCH_BACKENDS.get(name)(bank, queries, k, memory_mb)


def knn_vote(
    sims: torch.Tensor,
    idx: torch.Tensor,
    bank_labels: torch.Tensor,
    ks,
    temperature: float,
    num_classes: int,
) -> dict[int, torch.Tensor]:
    """Class scores (Q, C) for each k, from neighbours sorted best-first."""
    weights = (sims / temperature).exp()
    neighbour_labels = bank_labels[idx]
    out = {}
    for k in ks:
        kk = min(k, sims.shape[1])
        scores = torch.zeros(len(sims), num_classes, device=sims.device)
        scores.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
        out[k] = scores
    return out


def knn_classify(
    bank_x, bank_y, query_x, ks, temperature, num_classes, backend="auto", memory_mb=512
):
    """Normalise (per chunk), search once for max(ks), vote for every k. Returns {k: scores
    (Q, C)}. ``bank_x``/``query_x``: tensors, arrays or ``FeatureRows``."""
    bank = as_rows(bank_x).normalised()
    queries = as_rows(query_x).normalised()
    sims, idx = knn_search(bank, queries, max(ks), backend, memory_mb)
    return knn_vote(sims, idx, bank_y.to(idx.device), ks, temperature, num_classes)
