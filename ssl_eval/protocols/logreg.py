"""Logistic regression on frozen features over DINOv2/DINOv3's C grid, warm-started along it.

The objective is scikit-learn's ``LogisticRegression(penalty="l2", solver="lbfgs")`` for
several classes (multinomial), divided by C n as scikit-learn 1.x divides it:

    f(W, b) = mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C n)       (the intercept b unpenalised)

It is strictly convex in W and its minimiser is the one a cold fit at each C reaches, so a fit
that starts from the previous C's solution ends at the same point in fewer steps: the grid is
walked from small C (strong penalty, an easy problem) to large. Each C gets a fresh
``torch.optim.LBFGS`` (strong-Wolfe line search, float64): curvature pairs of the previous C's
objective would describe another function. A fit ends when
the largest gradient entry of f is at most ``tol`` = 10 ** ``tol_log10`` (scipy's ``gtol``),
f changes by at most ``tol_change`` (scipy's ``ftol``, 64 machine epsilons), or after
``max_iter`` iterations. The scripts ask for ``tol=1e-12``, which float64 gradients never
reach, so their cold fits mostly run to the 1,000-iteration cap; here ``tol=1e-8`` ends each
fit near the minimiser (coefficients within relative 1e-3 of a converged scikit-learn fit up
to 10x the selected C, tests/test_logreg.py).

The procedure is the official scripts' (dinov2/eval/log_regression.py,
dinov3/eval/log_regression.py): raw features, every C of the grid fitted on the training rows
and scored by top-1 on held-out rows (here ssl-eval's validation split, never test), the best C
(the smallest on ties, as their MetricTracker keeps the first best), then one final fit at that
C on train + val, which alone is scored on test. The gradient is written out (softmax minus
one-hot, two GEMMs), no autograd. Features are held in float64 on the device (the scripts'
``train_dtype``): 8 bytes per value, so ImageNet-size features want a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import UserError
from .base import PROTOCOL_TYPES, DataShape, ProtocolInputs, ProtocolOutput, ProtocolType, topk_hits

FINAL_FITS = ("train+val", "train")


@dataclass(frozen=True)
class LogregParams:
    # the grid: C = 10 ** linspace(c_exp_min, c_exp_max, c_num), computed as the scripts do
    c_exp_min: float = -6.0
    c_exp_max: float = 5.0
    c_num: int = 45
    max_iter: int = 1000  # L-BFGS iterations per C (both scripts' max_train_iters)
    # a fit ends when f's largest gradient entry is at most 10 ** tol_log10 (a log so that
    # the value round-trips through --set: YAML reads 1e-08 as a string). The scripts pass
    # tol=1e-12, which float64 never reaches: their fits end at max_iter or on scipy's ftol
    tol_log10: float = -8.0
    tol_change: float = 64 * 2.220446049250313e-16  # change of f that stops a fit (scipy's ftol)
    history_size: int = 10  # L-BFGS memory (scipy's default m)
    warm_start: bool = True  # each C starts from the previous C's solution
    final_fit: str = "train+val"  # the rows of the reported fit at the selected C
    reference: str = ""  # the official script (repository, commit, path) the card follows

    def __post_init__(self):
        if self.c_num < 1 or self.max_iter < 1 or self.history_size < 1:
            raise UserError("logreg: c_num, max_iter and history_size must each be at least 1")
        if self.c_exp_max < self.c_exp_min or not -30 <= self.c_exp_min <= self.c_exp_max <= 30:
            raise UserError(
                "logreg: need -30 <= c_exp_min <= c_exp_max <= 30 (C from 10**c_exp_min to "
                "10**c_exp_max)"
            )
        if not -20 <= self.tol_log10 <= 0 or not 0 <= self.tol_change < 1:
            raise UserError("logreg: need -20 <= tol_log10 <= 0 and 0 <= tol_change < 1")
        if self.final_fit not in FINAL_FITS:
            raise UserError(
                f"logreg: final_fit is {self.final_fit!r}; use one of {', '.join(FINAL_FITS)}"
            )

    @property
    def tol(self) -> float:
        return 10.0**self.tol_log10

    def grid(self) -> list[float]:
        """The C values, ascending. ``10 ** torch.linspace(lo, hi, n)`` in float32, then as Python
        floats: the official scripts' exact values (``C_POWER_RANGE``, ``ALL_C[i].item()``)."""
        return (10 ** torch.linspace(self.c_exp_min, self.c_exp_max, self.c_num)).tolist()


@dataclass
class Fit:
    """One fitted model: weight (D, K), intercept (K,), and how the fit ended."""

    C: float
    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int
    evaluations: int
    grad_max: float  # largest gradient entry of f at the returned point
    loss: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


def _objective(x: torch.Tensor, onehot: torch.Tensor, Wt, b, inv_cn: float):
    """f and its gradient at (Wt, b), ``Wt`` the (K, D) weight: mean cross-entropy +
    ||W||^2 inv_cn / 2. The weight gradient is formed as g^T x (K x D), not x^T g: on a CPU the
    transposed product of a tall matrix runs ~3x slower."""
    z = torch.addmm(b, x, Wt.T)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    n = x.shape[0]
    loss = (lse.sum() - (z * onehot).sum()) / n + 0.5 * inv_cn * Wt.pow(2).sum()
    g = torch.exp(z.sub_(lse)).sub_(onehot).div_(n)  # (softmax - onehot) / n
    gW = torch.addmm(Wt, g.T, x, beta=inv_cn)
    return loss, gW, g.sum(0)


def fit_one(
    x: torch.Tensor,
    onehot: torch.Tensor,
    C: float,
    p: LogregParams,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Fit:
    """Minimise f at ``C`` from ``init`` (zeros if None) with a fresh L-BFGS. ``x`` (n, D) and
    ``onehot`` (n, K) float64 on one device."""
    D, K = x.shape[1], onehot.shape[1]
    if init is None:
        W = torch.zeros(K, D, dtype=x.dtype, device=x.device)
        b = torch.zeros(K, dtype=x.dtype, device=x.device)
    else:
        W, b = init[0].T.clone(memory_format=torch.contiguous_format), init[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    inv_cn = 1.0 / (C * x.shape[0])
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=p.max_iter,
        max_eval=max(p.max_iter * 15, 15000),  # scipy's maxfun is 15,000
        tolerance_grad=p.tol,
        tolerance_change=p.tol_change,
        history_size=p.history_size,
        line_search_fn="strong_wolfe",
    )
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        with torch.no_grad():
            loss, gW, gb = _objective(x, onehot, W, b, inv_cn)
        W.grad, b.grad = gW, gb
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    with torch.no_grad():
        loss, gW, gb = _objective(x, onehot, W, b, inv_cn)
    gmax = float(torch.maximum(gW.abs().max(), gb.abs().max()))
    n_iter = int(state.get("n_iter", 0))
    return Fit(C, W.detach().T, b.detach(), n_iter, evals, gmax, float(loss))


def fit_path(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cs: list[float], p: LogregParams
) -> list[Fit]:
    """One fit per C of ``cs`` (ascending), each started from the previous one's solution
    when ``p.warm_start`` (from zeros otherwise)."""
    if any(b < a for a, b in zip(cs, cs[1:], strict=False)):
        raise UserError("logreg: the C grid must ascend (the path is warm-started upwards)")
    onehot = torch.zeros(len(y), num_classes, dtype=x.dtype, device=x.device)
    onehot.scatter_(1, y.view(-1, 1).long(), 1.0)
    fits: list[Fit] = []
    for C in cs:
        init = (fits[-1].weight, fits[-1].bias) if (fits and p.warm_start) else None
        fits.append(fit_one(x, onehot, C, p, init))
    return fits


def preflight_logreg(p: LogregParams, shape: DataShape) -> None:
    if shape.val == 0:
        raise UserError(
            "logreg: the validation split is empty (C is chosen on it); raise --val-fraction"
        )


def _top1(fit: Fit, x: torch.Tensor, y: torch.Tensor, chunk: int = 65536) -> float:
    hit = sum(
        int((fit.logits(x[s : s + chunk]).argmax(1) == y[s : s + chunk]).sum())
        for s in range(0, len(x), chunk)
    )
    return hit / max(len(x), 1)


def run_logreg(inp: ProtocolInputs, p: LogregParams) -> ProtocolOutput:
    dev, f64 = inp.device, torch.float64
    if len(inp.val_idx) == 0:
        raise UserError(
            "logreg: the validation split is empty (C is chosen on it); raise --val-fraction"
        )
    x_all = torch.from_numpy(np.asarray(inp.train_x)).to(dev, f64)
    y_all = torch.from_numpy(np.asarray(inp.train_y)).to(dev).long()
    tr = torch.from_numpy(np.asarray(inp.train_idx)).to(dev).long()
    va = torch.from_numpy(np.asarray(inp.val_idx)).to(dev).long()
    K = inp.num_classes
    cs = p.grid()
    fits = fit_path(x_all[tr], y_all[tr], K, cs, p)
    xv, yv = x_all[va], y_all[va]
    val_top1 = [_top1(f, xv, yv) for f in fits]
    best = int(np.argmax(val_top1))  # the first best: the smallest C on ties
    sel = fits[best]
    if p.final_fit == "train+val":
        rows = torch.cat([tr, va])
        onehot = torch.zeros(len(rows), K, dtype=f64, device=dev)
        onehot.scatter_(1, y_all[rows].view(-1, 1), 1.0)
        init = (sel.weight, sel.bias) if p.warm_start else None  # from the selected fit
        final_fit, n_final = fit_one(x_all[rows], onehot, sel.C, p, init), len(rows)
    else:
        final_fit, n_final = sel, len(tr)
    del x_all
    test_x = torch.from_numpy(np.asarray(inp.test_x)).to(dev, f64)
    test_y = torch.from_numpy(np.asarray(inp.test_y)).to(dev).long()
    hits = topk_hits(final_fit.logits(test_x), test_y)
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "selected": {"C": sel.C, "C_index": best},
            "val_top1": {f"C={c:.6g}": v for c, v in zip(cs, val_top1, strict=True)},
            "iterations": [f.iterations for f in fits],
            "grad_max": [f.grad_max for f in fits],
            "final": {
                "rows": p.final_fit,
                "size": n_final,
                "iterations": final_fit.iterations,
                "grad_max": final_fit.grad_max,
            },
            "train_size": len(tr),
            "val_size": len(va),
            "not_converged": sum(f.iterations >= p.max_iter for f in fits),
            "device": str(dev),
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )


PROTOCOL_TYPES.register(
    "logreg",
    ProtocolType("logreg", LogregParams, run_logreg, seeded=False, preflight=preflight_logreg),
)
