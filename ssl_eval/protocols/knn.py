"""The k-NN protocol: weighted k-NN on L2-normalised features (cosine similarity), as in Wu et
al. 2018 and DINO: each of the k nearest training examples votes for its class with weight
exp(sim / T). The reported k is chosen on the validation split carved from train.

The search and the vote live in ssl_eval/protocols/search/knn.py (shared with the trainer's online
monitor); this file holds the card's params, the k selection, the protocol's registration, and
the canonical order of neighbours (exact ties to the lower bank index, which the search leaves
unspecified) that makes a bank searched in shards by several processes give the same votes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core import distributed
from ..core.errors import UserError
from ..features.stream import FeatureRows
from ._edges import edge, grid_edges
from .base import (
    PROTOCOL_TYPES,
    DataShape,
    ProtocolInputs,
    ProtocolOutput,
    ProtocolType,
    topk_hits,
)
from .search.knn import (
    AUTO_PRECISION,
    SEARCH_BACKENDS,
    knn_search,
    knn_vote,
    resolve_backend,
    search_plan,
)


@dataclass(frozen=True)
class KnnParams:
    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    # auto: float32 (on the CPU FAISS if installed, else torch; on a GPU the fastest float32
    # search, chosen per search and recorded); auto_fp16: the fastest float16 search (GPU only);
    # faiss | torch: that backend, float32
    backend: str = "auto"
    select_k: str = (
        "val"  # "val": the reported k is the best on the validation split; or an int as a string
    )
    memory_mb: int = 512  # bound on the blocks a search holds at once (search_plan)

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise UserError(
                f"knn: ks must list at least one k, each at least 1, got {list(self.ks)}"
            )
        if not self.temperature > 0:
            raise UserError(f"knn: temperature must be > 0, got {self.temperature}")
        backends = (*AUTO_PRECISION, *SEARCH_BACKENDS.names())
        if self.backend not in backends:
            raise UserError(
                f"knn: backend must be one of {', '.join(backends)}, got {self.backend!r}"
            )
        if self.select_k != "val" and _as_int(self.select_k) not in self.ks:
            raise UserError(
                f"knn: select_k must be 'val' or one of ks {list(self.ks)}, got {self.select_k!r}"
            )
        if self.memory_mb < 1:
            raise UserError(f"knn: memory_mb must be at least 1, got {self.memory_mb}")


def _as_int(s: object) -> int | None:
    try:
        return int(s)
    except (TypeError, ValueError):
        return None


def preflight_knn(p: KnnParams, shape: DataShape) -> None:
    """Every k must fit in the bank it searches: train minus val while k is chosen on val, then
    the whole train split for test. Never a silent ``top1@k200`` over fewer images."""
    bank = shape.train if p.select_k == "val" else shape.train + shape.val
    too_big = [k for k in p.ks if k > bank]
    if too_big:
        fit = [k for k in p.ks if k <= bank] or [max(1, bank)]
        raise UserError(
            f"knn: k={', '.join(map(str, too_big))} exceeds the {bank} images of the bank "
            f"(train minus val); use --set ks=[{','.join(map(str, fit))}]"
        )


# ---------------------------------------------------------------- the protocol


def _hits(
    bank: FeatureRows, bank_y, queries: FeatureRows, q_y, ks, p: KnnParams, C, backend, record
):
    """Per query and k, whether the label is the top-1 / among the top-5 of the vote. One search
    for max(ks); the (Q, C) vote is formed 8,192 queries at a time."""
    bank, queries = bank.normalised(), queries.normalised()
    sims, idx = _search(bank, queries, max(ks), backend, p.memory_mb, record)
    top1 = {k: [] for k in ks}
    top5 = {k: [] for k in ks}
    for s in range(0, len(sims), 8192):
        votes = knn_vote(sims[s : s + 8192], idx[s : s + 8192], bank_y, ks, p.temperature, C)
        for k, v in votes.items():
            h = topk_hits(v, q_y[s : s + 8192])
            top1[k].append(h[1])
            top5[k].append(h[5])
    return {k: np.concatenate(v) for k, v in top1.items()}, {
        k: np.concatenate(v) for k, v in top5.items()
    }


def run_knn(inp: ProtocolInputs, p: KnnParams) -> ProtocolOutput:
    """The features are read in chunks from their (memory-mapped) arrays: no float32 copy of
    the bank or of the queries is ever made whole."""
    dev = inp.device
    ks = tuple(sorted(set(p.ks)))  # KnnParams checked them: non-empty, each >= 1
    train_y = torch.from_numpy(np.asarray(inp.train_y)).to(dev)
    test_y = torch.from_numpy(np.asarray(inp.test_y)).to(dev)
    C = inp.num_classes
    backend = resolve_backend(p.backend, dev)
    D = inp.train_x.shape[1]
    itemsize = np.dtype(inp.train_x.dtype).itemsize

    # choose k on the validation split (bank = train minus val)
    tr, va = np.asarray(inp.train_idx), np.asarray(inp.val_idx)
    val_acc, plans, searches = {}, {}, {}  # searches: automatic GPU choices, per search
    if p.select_k == "val":
        if len(va) == 0:
            raise UserError("knn: the validation split is empty; raise --val-fraction")
        bank = FeatureRows(inp.train_x, tr, dev)
        top1, _ = _hits(
            bank,
            train_y[torch.from_numpy(tr).to(dev)],
            FeatureRows(inp.train_x, va, dev),
            train_y[torch.from_numpy(va).to(dev)],
            ks,
            p,
            C,
            backend,
            searches.setdefault("val", []),
        )
        val_acc = {k: int(h.sum()) / len(va) for k, h in top1.items()}
        best_k = max(ks, key=lambda k: (val_acc[k], -k))  # ties -> smaller k
        plans["val"] = search_plan(len(tr), len(va), D, max(ks), p.memory_mb, itemsize)
    else:
        best_k = int(p.select_k)  # one of ks (KnnParams checked it)

    bank, queries = FeatureRows(inp.train_x, None, dev), FeatureRows(inp.test_x, None, dev)
    top1, top5 = _hits(
        bank, train_y, queries, test_y, ks, p, C, backend, searches.setdefault("test", [])
    )
    plans["test"] = search_plan(len(bank), len(queries), D, max(ks), p.memory_mb, itemsize)
    per_sample = {}
    for k in ks:
        per_sample[f"top1@k{k}"], per_sample[f"top5@k{k}"] = top1[k], top5[k]
    per_sample["top1"], per_sample["top5"] = top1[best_k], top5[best_k]
    metrics = {m: float(v.mean()) for m, v in per_sample.items()}
    return ProtocolOutput(
        metrics,
        {
            "selected_k": best_k,
            **(grid_edges(edge("ks", ks, [best_k], floor=1)) if p.select_k == "val" else {}),
            "val_top1": {str(k): v for k, v in val_acc.items()},
            "backend": backend,
            "bank_size": len(train_y),
            "chunks": plans,  # query/bank chunk sizes of each search, from memory_mb
        }
        | ({"searches": searches} if any(searches.values()) else {}),
        per_sample=per_sample,
    )


def _search(
    bank: FeatureRows, queries: FeatureRows, k: int, backend: str, memory_mb: int, record=None
):
    """The top ``k`` of every query, exact ties broken by the lower bank index
    (``canonical_search``); across a torchrun world, each rank searches its contiguous shard
    of the bank for every query, and the partial top-k are merged (``merge_topk``): the same
    neighbours, in the same order, so the same votes to the bit."""
    k = min(k, len(bank))
    if distributed.world() == 1:
        return canonical_search(bank, queries, k, backend, memory_mb, record)
    part = distributed.shard(len(bank))
    if part.stop > part.start:
        rows = bank.rows[part] if bank.rows is not None else np.arange(part.start, part.stop)
        shard = FeatureRows(bank.x, rows, bank.device, bank.normalise, bank._release_mb)
        sims, idx = canonical_search(shard, queries, k, backend, memory_mb, record)
        idx = idx + part.start
    else:  # more ranks than bank rows
        sims = torch.empty(len(queries), 0, device=bank.device)
        idx = torch.empty(len(queries), 0, dtype=torch.long, device=bank.device)
    parts = distributed.all_gather((sims.cpu(), idx.cpu()))
    sims, idx = merge_topk([s for s, _ in parts], [i for _, i in parts], k)
    return sims.to(bank.device), idx.to(bank.device)


def canonical_search(bank, queries, k: int, backend: str, memory_mb: int, record=None):
    """``knn_search`` for the top ``k``, exact ties broken by the lower bank index.

    A search leaves the order of equal similarities unspecified (and which of them is kept at
    the k-th place); equal similarities are common (duplicate images, saturated features). The
    search fetches a margin beyond k and sorts it canonically; a query whose k-th similarity
    still equals the last one fetched may have more equal ones left out, and is searched
    again over the whole bank (in chunks of queries within ``memory_mb``)."""
    k = min(k, len(bank))
    kk = min(len(bank), k + max(16, k // 8))
    sims, idx = knn_search(bank, queries, kk, backend, memory_mb, record)
    sims, idx = merge_topk([sims], [idx], kk)
    open_rows = (sims[:, k - 1] == sims[:, kk - 1]).nonzero().flatten() if kk < len(bank) else []
    sims, idx = sims[:, :k].contiguous(), idx[:, :k].contiguous()
    chunk = max(1, (memory_mb << 20) // (12 * len(bank)))
    for c in range(0, len(open_rows), chunk):
        rows = open_rows[c : c + chunk]
        q = queries.take(rows.cpu().numpy()) if isinstance(queries, FeatureRows) else queries[rows]
        s, i = knn_search(bank, q, len(bank), backend, memory_mb, record)
        sims[rows], idx[rows] = merge_topk([s], [i], k)
    return sims, idx


def merge_topk(sims: list[torch.Tensor], idx: list[torch.Tensor], k: int):
    """The ``k`` best of partial top-k lists (each (Q, k_i), bank indices already global):
    by similarity, best first, equal similarities by the lower bank index."""
    s, i = torch.cat(sims, 1), torch.cat(idx, 1)
    order = i.argsort(dim=1, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    order = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), i.gather(1, order)


PROTOCOL_TYPES.register(
    "knn", ProtocolType("knn", KnnParams, run_knn, seeded=False, preflight=preflight_knn)
)
