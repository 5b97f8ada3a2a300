"""The exact block top-k both searches run (the torch search on CPU or GPU and the GPU choice of
``gpu``): a bank chunk against a query chunk by matmul, its top-k partitioned without a full
sort, the running top-k merged chunk by chunk (``search_blocks``), with chunk sizes from a
memory budget (``search_plan``)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ...features.stream import as_rows

_POOL: list[ThreadPoolExecutor] = []


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _pool() -> ThreadPoolExecutor:
    n = _threads()
    if not _POOL or _POOL[0]._max_workers != n:
        _POOL[:] = [ThreadPoolExecutor(n, thread_name_prefix="ssl-eval-topk")]
    return _POOL[0]


def _partition(x: torch.Tensor, k: int, values: bool = True):
    """The ``k`` largest of each row of ``x`` (values, or None without ``values``; column
    indices), in no particular order; which of several equal values at the k-th place is kept
    is unspecified.

    On the CPU this is numpy's ``argpartition`` (a vectorised introselect), 2-3x faster than
    ``torch.topk`` at the widths searched here; the rows are shared out over torch's thread
    count (numpy releases the GIL). Elsewhere, ``torch.topk``."""
    n = x.shape[1]
    if k >= n:  # a copy: x may be the similarity buffer, which the next block overwrites
        return x.clone(), torch.arange(n, device=x.device).expand(len(x), n)
    if x.device.type != "cpu":
        v, idx = x.topk(k, dim=1, sorted=False)
        return (v if values else None), idx
    a = x.detach().numpy()

    def rows(r: range) -> np.ndarray:  # a copy of the k columns frees the full-width order
        return np.argpartition(a[r.start : r.stop], n - k, axis=1)[:, n - k :].copy()

    step = max(64, -(-len(a) // _threads()))
    parts = [range(s, min(len(a), s + step)) for s in range(0, len(a), step)]
    idx = np.concatenate(list(_pool().map(rows, parts))) if len(parts) > 1 else rows(parts[0])
    idx = torch.from_numpy(idx.astype(np.int64, copy=False))
    return (x.gather(1, idx) if values else None), idx


def sort_desc(s: torch.Tensor, i: torch.Tensor):
    """Rows of (similarities, indices) sorted best first (equal similarities in no set order)."""
    if s.device.type == "cpu":
        order = torch.from_numpy(np.argsort(-s.numpy(), axis=1))
    else:
        order = s.argsort(dim=1, descending=True)
    return s.gather(1, order), i.gather(1, order)


def _group_factors(n: int, k: int) -> tuple[int, ...]:
    """Group factors of the top-``k`` selection over ``n`` columns (``block_topk``).

    A selection costs about one partition step per element it looks at. Without groups it looks
    at all n; with one factor g at n / g group maxima, then the g k members of the k best groups
    (least at g = sqrt(n / k)); with two factors g1 g2 = P at n / P, then g2 k, then g1 k (least
    at P = (n / k)^(2/3), g1 = g2). Group maxima cost one cheap pass over the block."""
    r = n / k
    if r < 24:
        return ()
    if r < 96:
        return (int(math.sqrt(r)),)
    g = max(2, round(r ** (1 / 3)))
    return (g, g)


def _buffer(scratch: list, slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """``numel`` values of the reused buffer ``scratch[slot]``, grown when too small: a fresh
    buffer per block costs its page faults again."""
    while len(scratch) <= slot:
        scratch.append(None)
    b = scratch[slot]
    if b is None or b.numel() < numel or b.device != like.device:
        b = scratch[slot] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return b[:numel]


def block_topk(q: torch.Tensor, blk: torch.Tensor, k: int, scratch: list):
    """Exact top-``k`` of each row of ``q @ blk.T`` (values, column indices), in no particular
    order; the product and the group maxima are written into the reused buffers ``scratch``.

    Columns are dealt into interleaved groups (``_group_factors``): with factor g over a width
    g m, group c holds the columns c, c + m, ..., c + (g - 1) m, and a second factor groups the
    group maxima the same way. The k groups with the largest maxima are kept at each level,
    from the coarsest down. That is exact: every one of the k best entries lies in a group
    whose maximum is at least the k-th best value, and the k best groups hold at least k
    entries of at least that value. The fewer than g1 g2 columns left over past the last
    whole group are candidates of the last level as they are."""
    nq, nb = len(q), len(blk)
    s = _buffer(scratch, 0, nq * nb, q).view(nq, nb)
    torch.mm(q, blk.T, out=s)
    factors = _group_factors(nb, k)
    if not factors:
        return _partition(s, k)
    main = nb // math.prod(factors) * math.prod(factors)
    levels, free = [s[:, :main]], 0
    for g in factors:
        m = levels[-1].shape[1] // g
        out = _buffer(scratch, 1, free + nq * m, q)[free:].view(nq, m)
        free += nq * m
        levels.append(torch.amax(levels[-1].view(nq, g, m), 1, out=out))
    _, idx = _partition(levels.pop(), k, values=False)
    for g in reversed(factors):
        a = levels.pop()
        m = a.shape[1] // g
        cand = a.view(nq, g, m).gather(2, idx.unsqueeze(1).expand(nq, g, k)).view(nq, g * k)
        if not levels and main < nb:  # the last level: the left-over columns join as they are
            cand = torch.cat([cand, s[:, main:]], 1)
        vals, j = _partition(cand, k, values=not levels)  # the values of the last level only
        col = (j // k).clamp_max_(g - 1) * m + idx.gather(1, j % k)
        idx = torch.where(j >= g * k, j - g * k + main, col) if cand.shape[1] > g * k else col
    return vals, idx


def search_plan(n_bank: int, n_query: int, dim: int, k: int, memory_mb: int, itemsize: int = 4):
    """Chunk sizes of a search within ``memory_mb``: ``query_chunk`` queries against
    ``bank_chunk`` bank rows at a time. What one step holds:

    - the similarity block and the group maxima of the torch selection (at most a quarter of
      the block: ``_group_factors`` groups at least 4 columns): 5 bytes per query x bank row;
    - the selection's candidates per query: the members of the k best groups at a level (g k
      values, g the group factor, at most the cube root of bank rows / k, at least 4) with
      their orders and indices, about (20 g + 40) k bytes;
    - the query and bank blocks, per value: the stored rows gathered, their float32 copy and
      its normalised copy, 2 x 4 + ``itemsize`` bytes.

    Queries come 1,024 at a time (the GEMM runs near its peak from there) unless the budget
    needs fewer; the bank block takes the rest, at least ``k`` rows. Deterministic: a protocol
    records the same plan that ``knn_search`` uses."""
    budget = memory_mb << 20
    per_value = 8 + itemsize
    g = max(4, math.ceil((max(n_bank, k) / k) ** (1 / 3)))
    per_query = dim * per_value + (20 * g + 40) * k
    q = max(1, min(n_query, 1024))
    while q > 1 and budget - q * per_query < k * (5 * q + dim * per_value):
        q //= 2
    b = (budget - q * per_query) // (5 * q + dim * per_value)
    b = max(1, min(n_bank, max(k, b)))
    return {"query_chunk": int(q), "bank_chunk": int(b), "memory_mb": int(memory_mb)}


def search_blocks(bank, queries, k: int, memory_mb: int, block_search):
    """Exact top-``k`` by blocks: every bank chunk against every query chunk, each bank chunk
    read (and converted to float32) once, the query chunks again for each bank chunk (they are
    ``bank_chunk`` / ``query_chunk`` times fewer rows). ``block_search`` returns a block's top-k
    in any order; the running top-k of each query chunk is merged per bank chunk, and sorted
    best first at the end."""
    bank, queries = as_rows(bank), as_rows(queries)
    plan = search_plan(len(bank), len(queries), bank.dim, k, memory_mb, bank.itemsize)
    qc, bc = plan["query_chunk"], plan["bank_chunk"]
    starts = range(0, len(queries), qc)
    best: list = [None] * len(starts)
    for bs in range(0, len(bank), bc):
        blk = bank.read(bs, bs + bc)
        for c, qs in enumerate(starts):
            s, i = block_search(queries.read(qs, qs + qc), blk, min(k, len(blk)))
            if bs:
                i = i + bs
            if best[c] is not None:
                s, j = _partition(torch.cat([best[c][0], s], 1), k)
                i = torch.cat([best[c][1], i], 1).gather(1, j)
            best[c] = (s, i)
        del blk
    bank.release()
    queries.release()
    out = [sort_desc(s, i) for s, i in best]
    return torch.cat([s for s, _ in out]), torch.cat([i for _, i in out])
