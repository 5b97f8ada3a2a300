"""The attentive probe's grid of heads across a torchrun world (protocols/attentive.py).

Each rank trains a contiguous share of the grid (``distributed.shard``) on every batch: a
head's initialisation is a function of (seed, lr, weight decay), its gradient is its own loss's
(the heads' losses are summed, and a sum hands each term the gradient 1), and it has its own
optimiser, whose step reads only that head's parameters and state (torch's AdamW runs its
foreach or per-tensor path one parameter group at a time, and a head's groups hold its own
parameters only). So a share trains its heads bit for bit as the whole grid does in one process;
what the ranks exchange are the results: the validation scores (gathered in grid order), the
selected head's weights (from the rank that trained it), the test logits (a share of the
batches each) and, for a saved state, every head's weights and optimiser state.

The saved state does not depend on the world size: one file, written by rank 0, holds every
head of the grid in grid order (each rank's share gathered to rank 0 first), with one optimiser
state per head; a run of any number of processes resumes it, each rank taking its share.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core import distributed
from ..core.errors import UserError
from ..core.files import DamagedFile, read_torch_checked, write_torch_checked
from ..core.runtime import warn

STATE_LAYOUT = "every head in grid order, one optimiser state each"


def share(n: int) -> slice:
    """This rank's heads of a grid of ``n`` (all of them in one process)."""
    return distributed.shard(n)


def in_grid_order(mine: list) -> list:
    """Every rank's per-head values (its share's, in order) put together in grid order."""
    return [v for part in distributed.all_gather(mine) for v in part]


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save(path: Path | None, common: dict, heads: list, opts: list) -> None:
    """The state of every head, gathered to rank 0 and written there (atomically, checked);
    a failed write stops every rank with the same line."""
    if path is None:
        return
    parts = distributed.gather(
        _cpu(([h.state_dict() for h in heads], [o.state_dict() for o in opts]))
    )
    error = None
    if distributed.is_main():
        state = common | {
            "heads": [h for hs, _ in parts for h in hs],
            "opt": [o for _, os_ in parts for o in os_],
        }
        try:
            write_torch_checked(path, state)
        except (UserError, OSError) as e:
            error = f"could not write the attentive state {path}: {str(e).splitlines()[0]}"
    distributed.agree(error)


def _read(path: Path | None, fingerprint: str, total: int, n: int) -> dict | None:
    """This run's saved state; None when there is none or it is another setting's; a damaged
    one is reported in one line, removed, and the run starts over."""
    if path is None or not path.is_file():
        return None
    try:
        st = read_torch_checked(path, "cpu")
        if not isinstance(st, dict) or st.get("fingerprint") != fingerprint:
            return None
        if not 0 < st.get("step", 0) < total or not {"heads", "opt", "generator"} <= set(st):
            raise DamagedFile("not an attentive state of the form ssl-eval writes")
        if not len(st["heads"]) == len(st["opt"]) == n:
            raise DamagedFile(f"{len(st['heads'])} heads, the grid has {n}")
    except DamagedFile as e:
        warn(f"attentive state {path} is damaged ({e}); discarding it, the unit starts over")
        path.unlink(missing_ok=True)
        return None
    return st


def load(path: Path | None, fingerprint: str, total: int, n: int) -> dict | None:
    """The saved state of a grid of ``n`` heads, read by rank 0; each rank gets the common
    fields and its share of the heads and optimiser states (None on every rank when there is
    none)."""
    W, shares, error = distributed.world(), None, None
    if distributed.is_main():
        try:
            st = _read(path, fingerprint, total, n)
        except (UserError, OSError) as e:
            st, error = None, f"cannot read the attentive state {path}: {str(e).splitlines()[0]}"
        shares = [None] * W
        if st is not None:
            for r in range(W):
                part = distributed.shard(n, r, W)
                shares[r] = st | {"heads": st["heads"][part], "opt": st["opt"][part]}
    distributed.agree(error)
    return distributed.scatter(shares)


def selected_head(best: int, n: int, mine: list, build) -> torch.nn.Module:
    """Head ``best`` of the grid on every rank: the rank that trained it keeps it, the others
    build its architecture (``build()``) and load its weights, sent by that rank."""
    part = share(n)
    if distributed.world() == 1:
        return mine[best]
    owner = next(r for r in range(distributed.world()) if best < distributed.shard(n, r).stop)
    own = part.start <= best < part.stop
    weights = distributed.broadcast(
        _cpu(mine[best - part.start].state_dict()) if own else None, src=owner
    )
    if own:
        return mine[best - part.start]
    head = build()
    head.load_state_dict(weights)
    return head.eval()


def batch_shares(score, count: int) -> torch.Tensor:
    """The rows' logits, ``score(numbers)`` (one tensor per batch asked for) run by each rank
    on its share of the ``count`` batches (r, r + W, ...: the batches one process forms), put
    together in batch order on every rank; an error on one rank stops every rank."""
    W, r = distributed.world(), distributed.rank()
    mine, error = [], None
    try:
        mine = score(range(r, count, W))
    except UserError as e:
        error = str(e)
    distributed.agree(error)
    parts = distributed.all_gather(mine)
    return torch.cat([parts[k % W][k // W] for k in range(count)])


def batch_count(rows: int, batch_size: int) -> int:
    return math.ceil(rows / batch_size)
