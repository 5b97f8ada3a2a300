"""Exact k-NN on L2-normalised features (cosine similarity) and the weighted vote of Wu et al.
2018 and DINO: each of the k nearest bank examples votes for its class with weight
exp(sim / T). The k-NN protocol (protocols/knn.py) and the trainer's online monitor
(train/monitor.py) both call ``knn_classify``, so the two report the same number.

All k values are answered from ONE search for the largest k. The search runs on FAISS (a GPU
index when a GPU and a faiss GPU build are present) or on plain torch matmul + top-k, with
queries and bank chunked so memory stays bounded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .registry import Registry


def _block_topk(q: torch.Tensor, blk: torch.Tensor, k: int, buf: torch.Tensor):
    """Exact top-``k`` of each row of ``q @ blk.T`` (best first), the product written into ``buf``.

    A plain top-k over a wide row costs several times a pass over it, so wide blocks are
    searched in two stages: columns are dealt into ``g`` interleaved groups, and only the ``k``
    groups with the largest maxima are searched exactly. That is exact: each of the k best
    entries is at most its group's maximum, so its group is among the k best groups.
    """
    nq, nb = len(q), len(blk)
    s = torch.mm(q, blk.T, out=buf[: nq * nb].view(nq, nb))
    g = int(math.sqrt(nb / k))  # balances the two stages: nb / g maxima, then g * k candidates
    if g < 4:
        return s.topk(k, dim=1)
    m = (
        nb // g
    )  # group c holds columns c, c + m, ..., c + (g - 1) m; the nb - g m left over are candidates too
    main = g * m
    v = s[:, :main].view(nq, g, m)
    top_groups = v.amax(1).topk(k, dim=1, sorted=False).indices  # (nq, k)
    cand = v.gather(2, top_groups.unsqueeze(1).expand(nq, g, k)).view(nq, g * k)
    if main < nb:
        cand = torch.cat([cand, s[:, main:]], 1)
    sims, j = cand.topk(k, dim=1)
    idx = (j // k) * m + top_groups.gather(1, (j % k).clamp_max_(k - 1))
    if main < nb:
        idx = torch.where(j >= g * k, j - g * k + main, idx)
    return sims, idx


def _search_torch(bank: torch.Tensor, queries: torch.Tensor, k: int, memory_mb: int):
    q_chunk = 1024
    b_chunk = min(len(bank), max(k, (memory_mb << 20) // (4 * q_chunk)))
    # one similarity buffer for the whole search (a fresh block per chunk costs page faults)
    buf = torch.empty(
        min(q_chunk, len(queries)) * b_chunk, dtype=queries.dtype, device=queries.device
    )
    sims_out, idx_out = [], []
    for qs in range(0, len(queries), q_chunk):
        q = queries[qs : qs + q_chunk]
        best_s = best_i = None
        for bs in range(0, len(bank), b_chunk):
            blk = bank[bs : bs + b_chunk]
            s, i = _block_topk(q, blk, min(k, len(blk)), buf)
            if bs:
                i += bs
            if best_s is not None:
                s, j = torch.cat([best_s, s], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_s, best_i = s, i
        sims_out.append(best_s)
        idx_out.append(best_i)
    return torch.cat(sims_out), torch.cat(idx_out)


def _faiss_gpu_available() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _search_faiss(bank: torch.Tensor, queries: torch.Tensor, k: int, memory_mb: int):
    try:
        import faiss
    except ImportError as e:
        raise UserError(
            "k-NN backend 'faiss' needs faiss: pip install faiss-cpu (or the [gpu] extra)"
        ) from e
    b = np.ascontiguousarray(bank.cpu().numpy(), dtype=np.float32)
    if queries.device.type == "cuda" and _faiss_gpu_available():
        index = faiss.index_cpu_to_gpu(
            faiss.StandardGpuResources(), torch.cuda.current_device(), faiss.IndexFlatIP(b.shape[1])
        )
        index.add(b)
        search = index.search
    else:
        # exact search straight on the bank's memory (an IndexFlatIP would first copy the bank)
        def search(q, k):
            return faiss.knn(q, b, k, faiss.METRIC_INNER_PRODUCT)

    q_chunk = max(1024, (memory_mb << 20) // (8 * max(k, 1) * 2))
    sims, idx = [], []
    # The CPU index multiplies blocks of (query_bs x database_bs); faiss's default database
    # block (1024) leaves the GEMM well short of the machine's rate: use up to 8192 columns
    # (128 MiB with the default 4096 queries), within memory_mb. Restored afterwards.
    cv = faiss.cvar
    saved = cv.distance_compute_blas_database_bs
    cv.distance_compute_blas_database_bs = max(
        saved, min(8192, (memory_mb << 20) // (4 * max(1, cv.distance_compute_blas_query_bs)))
    )
    try:
        for qs in range(0, len(queries), q_chunk):
            q = np.ascontiguousarray(queries[qs : qs + q_chunk].cpu().numpy(), dtype=np.float32)
            s, i = search(q, k)
            sims.append(torch.from_numpy(s))
            idx.append(torch.from_numpy(i))
    finally:
        cv.distance_compute_blas_database_bs = saved
    dev = queries.device
    return torch.cat(sims).to(dev), torch.cat(idx).to(dev)


SEARCH_BACKENDS: Registry = Registry("k-NN backend")
SEARCH_BACKENDS.register("torch", _search_torch, "plain torch matmul + top-k")
SEARCH_BACKENDS.register("faiss", _search_faiss, "FAISS exact inner-product index")


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs: ``name`` itself, or for ``auto`` FAISS when it can serve
    ``device`` (a GPU build on CUDA, any build on the CPU), else torch."""
    if name != "auto":
        SEARCH_BACKENDS.get(name)
        return name
    if device.type == "cuda":
        return "faiss" if _faiss_gpu_available() else "torch"
    try:
        import faiss  # noqa: F401
    except ImportError:
        return "torch"
    return "faiss"


def knn_search(
    bank: torch.Tensor, queries: torch.Tensor, k: int, backend: str = "auto", memory_mb: int = 512
):
    """Top-``k`` cosine neighbours of every query. Inputs must be L2-normalised.
    Returns (similarities (Q, k) float32, indices (Q, k) int64), best first."""
    k = min(k, len(bank))
    name = resolve_backend(backend, queries.device)
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
    """Normalise, search once for max(ks), vote for every k. Returns {k: scores (Q, C)}."""
    bank = F.normalize(bank_x, dim=1)
    queries = F.normalize(query_x, dim=1)
    sims, idx = knn_search(bank, queries, max(ks), backend, memory_mb)
    return knn_vote(sims, idx, bank_y, ks, temperature, num_classes)
