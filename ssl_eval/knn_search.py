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

import math

import torch

from .errors import UserError
from .feature_stream import as_rows
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


def search_plan(n_bank: int, n_query: int, dim: int, k: int, memory_mb: int, itemsize: int = 4):
    """Chunk sizes of a search within ``memory_mb``: ``query_chunk`` queries against
    ``bank_chunk`` bank rows at a time. What one step holds: the similarity block (4 bytes per
    query x bank row) and the query and bank blocks (per value: the stored rows gathered, their
    float32 copy and its normalised copy, 2 x 4 + ``itemsize`` bytes). Queries come 1,024 at a
    time (the GEMM runs near its peak from there) unless the budget needs fewer; the bank block
    takes the rest, at least ``k`` rows. Deterministic: a protocol records the same plan that
    ``knn_search`` uses."""
    budget = memory_mb << 20
    per_value = 8 + itemsize
    q = max(1, min(n_query, 1024))
    while q > 1 and budget - q * dim * per_value < k * (4 * q + dim * per_value):
        q //= 2
    b = (budget - q * dim * per_value) // (4 * q + dim * per_value)
    b = max(1, min(n_bank, max(k, b)))
    return {"query_chunk": int(q), "bank_chunk": int(b), "memory_mb": int(memory_mb)}


def _search_blocks(bank, queries, k: int, memory_mb: int, block_search):
    """Exact top-``k`` by blocks: every query chunk against every bank chunk, each read (and
    converted to float32) only while it is searched; the running top-k is merged per block."""
    bank, queries = as_rows(bank), as_rows(queries)
    plan = search_plan(len(bank), len(queries), bank.dim, k, memory_mb, bank.itemsize)
    qc, bc = plan["query_chunk"], plan["bank_chunk"]
    sims_out, idx_out = [], []
    for qs in range(0, len(queries), qc):
        q = queries.read(qs, qs + qc)
        best_s = best_i = None
        for bs in range(0, len(bank), bc):
            blk = bank.read(bs, bs + bc)
            s, i = block_search(q, blk, min(k, len(blk)))
            if bs:
                i += bs
            if best_s is not None:
                s, j = torch.cat([best_s, s], 1).topk(k, dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_s, best_i = s, i
            del blk
        sims_out.append(best_s)
        idx_out.append(best_i)
    bank.release()
    queries.release()
    return torch.cat(sims_out), torch.cat(idx_out)


def _search_torch(bank, queries, k: int, memory_mb: int):
    """Exact top-``k`` of one bank (a tensor, an array or ``FeatureRows``: one shard of a
    sharded bank is searched the same way) on torch matmul + top-k blocks."""
    buf = []  # one similarity buffer for the whole search (a fresh block per chunk costs page faults)

    def block(q: torch.Tensor, blk: torch.Tensor, kk: int):
        need = len(q) * len(blk)
        if not buf or buf[0].numel() < need or buf[0].device != q.device:
            buf[:] = [torch.empty(need, dtype=q.dtype, device=q.device)]
        return _block_topk(q, blk, kk, buf[0])

    return _search_blocks(bank, queries, k, memory_mb, block)


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
        return _search_blocks(bank, queries, k, memory_mb, block)
    finally:
        cv.distance_compute_blas_database_bs = saved


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


def knn_search(bank, queries, k: int, backend: str = "auto", memory_mb: int = 512):
    """Top-``k`` cosine neighbours of every query. Inputs must be L2-normalised: tensors, arrays
    (a memory-mapped cache is read a chunk at a time, never copied whole) or ``FeatureRows``.
    Returns (similarities (Q, k) float32, indices (Q, k) int64 into the bank), best first."""
    bank, queries = as_rows(bank), as_rows(queries)
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
    """Normalise (per chunk), search once for max(ks), vote for every k. Returns {k: scores
    (Q, C)}. ``bank_x``/``query_x``: tensors, arrays or ``FeatureRows``."""
    bank = as_rows(bank_x).normalised()
    queries = as_rows(query_x).normalised()
    sims, idx = knn_search(bank, queries, max(ks), backend, memory_mb)
    return knn_vote(sims, idx, bank_y.to(idx.device), ks, temperature, num_classes)
