"""Choices at the edge of their grid: a hyperparameter chosen on validation that is the
smallest or largest value its grid holds may have its best beyond the grid, so the number is
"the best of this grid", not "the best this probe can do". The protocols that choose on a grid
record such choices in ``details["grid_edges"]`` (nothing when every choice is inside); the run
prints a line for each and the leaderboard lists them under its table.

An edge the parameter cannot pass is no edge: k = 1 neighbour, a weight decay of 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def edge(
    param: str,
    grid: Sequence[float],
    chosen: Iterable[float],
    floor: float | None = None,
    widen: str = "",
) -> dict | None:
    """``{"param", "grid": [lowest, highest], "lowest": n, "highest": n, "choices": n,
    "widen"}`` when some of ``chosen`` (one value, or one per draw) sit at the grid's lowest or
    highest value (the lowest not counted where it is ``floor``); None when none do or the grid
    has one value. ``widen``: the card's params that set the grid (default ``param``)."""
    values = sorted({float(v) for v in grid})
    chosen = [float(c) for c in chosen]
    if len(values) < 2 or not chosen:
        return None
    lo, hi = values[0], values[-1]
    n_lo = 0 if floor is not None and lo <= floor else sum(c == lo for c in chosen)
    n_hi = sum(c == hi for c in chosen)
    if not n_lo and not n_hi:
        return None
    return {"param": param, "grid": [lo, hi], "lowest": n_lo, "highest": n_hi,
            "choices": len(chosen), "widen": widen or param}  # fmt: skip


def grid_edges(*found: dict | None) -> dict:
    """``{"grid_edges": [...]}`` of the edges found, or ``{}``: what a protocol adds to its
    details."""
    edges = [e for e in found if e is not None]
    return {"grid_edges": edges} if edges else {}


def describe(e: dict) -> str:
    """One edge in words: ``lrs: 0.1, the highest of the grid [0.003 .. 0.1]`` (with how many
    of the choices sat there, where there are several)."""
    parts = []
    for side in ("lowest", "highest"):
        n = e.get(side, 0)
        if n:
            value = e["grid"][0 if side == "lowest" else 1]
            share = f" ({n} of {e['choices']} choices)" if e.get("choices", 1) > 1 else ""
            parts.append(f"{value:g}, the {side} of the grid [{e['grid'][0]:g} .. "
                         f"{e['grid'][1]:g}]{share}")  # fmt: skip
    return f"{e['param']}: " + "; ".join(parts)
