"""The attentive probe's poolers (protocols/attentive.py; a private module: it registers no
protocol type): a registry of pooler kinds, each a head from tokens (B, L, D) to scores (B, C).

- ``capi``: one learned query, no query projection, a key/value projection, D / 64 heads (or
  ``heads``), no output projection, then a linear classifier (facebookresearch/capi,
  eval_classification.py, AttnPoolClassifier; AIM's attentive probe is of this kind).
- ``ep``: efficient probing's M learned queries with no query or key projection (the keys are
  the tokens), one attention head scaled by D^-1/2, and a value projection without bias whose
  D channels are cut in M slices: query m reads slice m, so the pooled vector is D wide; then a
  non-affine BatchNorm (in training over each 512 rows apart, as the script's per-GPU one) and a
  linear classifier (billpsomas/efficient-probing, poolings/ep.py and probe_heads.py).
- ``vjepa2``: V-JEPA 2's attentive classifier: ``depth - 1`` pre-norm self-attention blocks over
  the tokens, then a cross-attention block whose single query attends to the normed tokens
  (query and key/value projections, no output projection) with a residual MLP, then a linear
  classifier; its init and residual rescaling as the original (facebookresearch/vjepa2,
  src/models/attentive_pooler.py and src/models/utils/modules.py).

The modules here are written from those formulas, not copied.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..core.registry import Registry


@dataclass(frozen=True)
class PoolerKind:
    build: Callable[[int, int, object], nn.Module]  # (token width D, classes, params) -> head
    describe: str


POOLERS: Registry[PoolerKind] = Registry("pooler")


def _heads(dim: int, heads: int, default_head_dim: int | None, kind: str) -> int:
    n = heads or max(1, dim // (default_head_dim or dim))
    if dim % n:
        raise UserError(
            f"the {kind} pooler splits {dim}-wide tokens into {n} heads, which does not divide; "
            "set heads= to a divisor of the width"
        )
    return n


def _trunc(t: torch.Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(t, std=std)  # cut at +-2 (absolute), as both originals


class CapiPooler(nn.Module):
    """softmax(q K^T / sqrt(d_h)) V per head, q a learned vector, [K V] = tokens W_kv + b."""

    def __init__(self, dim: int, num_classes: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.empty(dim))
        self.kv = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, num_classes)
        for w in (self.query, self.kv.weight, self.linear.weight):
            _trunc(w)
        nn.init.zeros_(self.kv.bias)
        nn.init.zeros_(self.linear.bias)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.query.view(1, h, 1, d // h).expand(b, -1, -1, -1)
        k, v = self.kv(x).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).reshape(b, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x))


# efficient probing's --batch_size, per GPU: its BatchNorm is not synchronised (main_linprobe.py
# converts no SyncBatchNorm), so in training each GPU's 512 rows are normalised apart, and the
# running statistics that score validation and test are rank 0's (DistributedDataParallel
# broadcasts rank 0's buffers before each forward): here the batch's first 512 rows'
EP_BN_ROWS = 512


class EfficientPooler(nn.Module):
    """M queries, keys = tokens, one head: pooled[m-th slice] = softmax(q_m X^T / sqrt(D)) V_m;
    then BatchNorm over groups of ``EP_BN_ROWS`` rows in training, as the script's per GPU."""

    def __init__(self, dim: int, num_classes: int, queries: int):
        super().__init__()
        if dim % queries:
            raise UserError(
                f"the ep pooler cuts {dim}-wide values into {queries} query slices, which does "
                "not divide; set queries= to a divisor of the width"
            )
        self.queries = queries
        self.query = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.v = nn.Linear(dim, dim, bias=False)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        m = self.queries
        attn = torch.softmax((self.query * d**-0.5) @ x.transpose(1, 2), dim=-1)  # (B, M, N)
        v = self.v(x).view(b, n, m, d // m).permute(0, 2, 1, 3)  # (B, M, N, D/M)
        return (attn.unsqueeze(2) @ v).reshape(b, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(x)
        if not self.training or len(z) <= EP_BN_ROWS:
            return self.linear(self.norm(z))
        first, *rest = z.split(EP_BN_ROWS)
        parts = [self.norm(first)]  # the running statistics follow these rows alone
        parts += [F.batch_norm(g, None, None, training=True, eps=self.norm.eps) for g in rest]
        return self.linear(torch.cat(parts))


class _Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class _SelfBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = _Mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class VJepa2Pooler(nn.Module):
    """V-JEPA 2's AttentiveClassifier: self-attention blocks, one cross-attention block."""

    def __init__(self, dim: int, num_classes: int, heads: int, depth: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(_SelfBlock(dim, heads) for _ in range(depth - 1))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.mlp = _Mlp(dim)
        _trunc(self.query)
        for m in self.modules():  # the pooler's init; the classifier keeps nn.Linear's
            if isinstance(m, nn.Linear):
                _trunc(m.weight)
                nn.init.zeros_(m.bias)
        layer = 0
        with torch.no_grad():
            for layer, blk in enumerate(self.blocks):
                blk.proj.weight.div_(math.sqrt(2.0 * (layer + 1)))
                blk.mlp[2].weight.div_(math.sqrt(2.0 * (layer + 1)))
            self.mlp[2].weight.div_(math.sqrt(2.0 * (layer + 1)))
        self.linear = nn.Linear(dim, num_classes)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        b, n, d = x.shape
        h = self.heads
        q = self.query.expand(b, -1, -1)
        kv = self.kv(self.norm1(x)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        qh = self.q(q).view(b, 1, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(qh, kv[0], kv[1]).transpose(1, 2).reshape(b, 1, d)
        q = q + y
        q = q + self.mlp(self.norm2(q))
        return q[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(x))


POOLERS.register(
    "capi",
    PoolerKind(
        lambda d, c, p: CapiPooler(d, c, _heads(d, p.heads, 64, "capi")),
        "one learned query, key/value projection, D/64 heads (CAPI, AIM)",
    ),
)
POOLERS.register(
    "ep",
    PoolerKind(
        lambda d, c, p: EfficientPooler(d, c, p.queries),
        "M queries, no query/key projection, value slices per query, BatchNorm (EP)",
    ),
)
POOLERS.register(
    "vjepa2",
    PoolerKind(
        lambda d, c, p: VJepa2Pooler(d, c, _heads(d, p.heads, None, "vjepa2"), p.depth),
        "depth-1 self-attention blocks + a cross-attention block (V-JEPA 2)",
    ),
)
