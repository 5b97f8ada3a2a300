"""Logistic regression on frozen features over DINOv2/DINOv3's C grid, warm-started along it.

The objective is scikit-learn's ``LogisticRegression(penalty="l2", solver="lbfgs")`` for
several classes (multinomial), divided by C n as scikit-learn 1.x divides it:

    f(W, b) = mean_i CE(x_i W + b, y_i) + ||W||^2 / (2 C n)       (the intercept b unpenalised)

(for two classes, with ``two_classes: logistic``, the scripts' binary logistic regression,
whose objective is the multinomial's at C / 2: ``TWO_CLASSES``).

It is strictly convex in W and its minimiser is the one a cold fit at each C reaches, so a fit
that starts from the previous C's solution ends at the same point in fewer steps: the grid is
walked from small C (strong penalty, an easy problem) to large. The solver (_lbfgs.py) is
L-BFGS written out: f and its gradient in closed form (softmax minus one-hot, one pass over
the features per evaluation: numpy in L2-cache-sized row blocks on a CPU, torch GEMMs on a
GPU), a backtracking Armijo line search, and H0 shaped by a Kronecker preconditioner (the
softmax's class covariance times the features' covariance, in centred coordinates), rebuilt
at the start of each C with a fresh memory. A fit ends when the largest gradient entry of f
is at most ``tol`` = 10 ** ``tol_log10`` (scipy's ``gtol``), f's relative decrease is at most
``tol_change`` (scipy's ``ftol``, 64 machine epsilons), the line search finds no decrease, or
after ``max_iter`` iterations. The scripts ask for ``tol=1e-12``, scipy's ``gtol``, which
float64 gradients never reach: their cold fits end on scipy's ``ftol`` (64 machine epsilons,
which scikit-learn passes) once the loss stops decreasing, or at the 1,000-iteration cap where
it still decreases (large C on nearly separable features). Here ``tol=1e-8`` ends each fit
near the minimiser: at every C of the grid the same validation top-1 as a converged
scikit-learn fit, coefficients within relative 1e-3 up to 10x the selected C
(tests/test_logreg.py).

The procedure is the official scripts' (dinov2/eval/log_regression.py,
dinov3/eval/log_regression.py): raw features, every C of the grid fitted on the training rows
and scored by top-1 on held-out rows (here ssl-eval's validation split, never test), the best C
(the smallest on ties, as their MetricTracker keeps the first best), then one final fit at that
C on train + val, which alone is scored on test. Features are held in float64 (the scripts'
``train_dtype``): 8 bytes per value, so ImageNet-size features want a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..core.errors import UserError
from ._edges import edge, grid_edges
from ._lbfgs import Memory, kron_for, make_loss, minimise, one_blas_thread
from .base import PROTOCOL_TYPES, DataShape, ProtocolInputs, ProtocolOutput, ProtocolType, topk_hits

FINAL_FITS = ("train+val", "train")
# how a two-class problem is fitted: ``softmax``, the multinomial (two weight vectors, both
# penalised; ssl-eval's objective before this param); ``logistic``, one binary logistic
# regression, as scikit-learn's LogisticRegression(lbfgs) and cuML's fit two classes (a sigmoid
# loss on x v + c, ||v||^2 / (2 C n)). Their minimisers agree at another C: at the optimum of the
# multinomial the two vectors are v / 2 and -v / 2 (the loss reads only their difference), so
# its penalty is ||v||^2 / (4 C n), the binary one's at 2C; ``logistic`` fits the multinomial
# at C / 2, whose logit difference is the binary fit's decision function.
TWO_CLASSES = ("softmax", "logistic")


@dataclass(frozen=True)
class LogregParams:
    # added after the cards' first records: at this value every fit is the one before it
    NEUTRAL: ClassVar[dict] = {"two_classes": "softmax"}
    # the grid: C = 10 ** linspace(c_exp_min, c_exp_max, c_num), computed as the scripts do
    c_exp_min: float = -6.0
    c_exp_max: float = 5.0
    c_num: int = 45
    max_iter: int = 1000  # L-BFGS iterations per C (both scripts' max_train_iters)
    # a fit ends when f's largest gradient entry is at most 10 ** tol_log10 (a log so that
    # the value round-trips through --set: YAML reads 1e-08 as a string). The scripts pass
    # tol=1e-12, which float64 never reaches: their fits end on scipy's ftol or at max_iter
    tol_log10: float = -8.0
    tol_change: float = 64 * 2.220446049250313e-16  # change of f that stops a fit (scipy's ftol)
    history_size: int = 10  # L-BFGS memory (scipy's default m)
    warm_start: bool = True  # each C starts from the previous C's solution
    final_fit: str = "train+val"  # the rows of the reported fit at the selected C
    reference: str = ""  # the official script (repository, commit, path) the card follows
    two_classes: str = "softmax"  # TWO_CLASSES: a two-class problem as a softmax or a logistic

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
        if self.two_classes not in TWO_CLASSES:
            raise UserError(
                f"logreg: two_classes is {self.two_classes!r}; use one of {', '.join(TWO_CLASSES)}"
            )

    @property
    def tol(self) -> float:
        return 10.0**self.tol_log10

    def penalty(self, C: float, n: int, num_classes: int) -> float:
        """The L2 coefficient r of f = mean CE + r ||W||^2 / 2 that fits C on ``n`` rows:
        1 / (C n), or 2 / (C n) for two classes fitted as the scripts' binary logistic."""
        binary = num_classes == 2 and self.two_classes == "logistic"
        return (2.0 if binary else 1.0) / (C * n)

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


def _fit(loss, theta, C: float, p: LogregParams, mem: Memory, moment) -> tuple[Fit, object]:
    """Minimise f_C from ``theta`` with a fresh L-BFGS memory shaped by the Kronecker
    preconditioner at ``theta`` (``moment``: the features' second moment, once per path)."""
    r = p.penalty(C, loss.n, loss.k)
    mem.precond = kron_for(loss, theta, r, moment)
    res = minimise(loss, theta, r, mem, p.tol, p.tol_change, p.max_iter)
    th = torch.as_tensor(res.theta)
    weight = th[: loss.k * loss.d].view(loss.k, loss.d).T
    fit = Fit(
        C,
        weight,
        th[loss.k * loss.d :],
        res.iterations,
        res.evaluations,
        float(abs(res.g).max()),
        res.f,
    )
    return fit, res.theta


def fit_one(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    C: float,
    p: LogregParams,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Fit:
    """Minimise f at ``C`` from ``init`` (weight (D, K), bias (K,); zeros if None) with a
    fresh L-BFGS memory. ``x`` (n, D) float64, ``y`` (n,) class indices, on one device."""
    loss = make_loss(x, y, num_classes)
    theta = loss.zeros()
    if init is not None:
        flat = torch.cat([init[0].T.reshape(-1), init[1]]).to(x.device, x.dtype)
        theta = flat.numpy().copy() if isinstance(theta, np.ndarray) else flat.clone()
    with one_blas_thread(loss):
        return _fit(loss, theta, C, p, Memory(p.history_size), loss.moment())[0]


def fit_path(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cs: list[float], p: LogregParams
) -> list[Fit]:
    """One fit per C of ``cs`` (ascending). With ``p.warm_start`` each starts from the previous
    one's solution, otherwise from zeros; each with a fresh L-BFGS memory (curvature pairs
    carried over, corrected for the new penalty, measured more iterations, not fewer)."""
    if any(b < a for a, b in zip(cs, cs[1:], strict=False)):
        raise UserError("logreg: the C grid must ascend (the path is warm-started upwards)")
    loss = make_loss(x, y, num_classes)
    fits: list[Fit] = []
    with one_blas_thread(loss):
        theta, moment = loss.zeros(), loss.moment()
        for C in cs:
            if not p.warm_start:
                theta = loss.zeros()
            fit, theta = _fit(loss, theta, C, p, Memory(p.history_size), moment)
            fits.append(fit)
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
    dev = inp.device
    if len(inp.val_idx) == 0:
        raise UserError(
            "logreg: the validation split is empty (C is chosen on it); raise --val-fraction"
        )
    # a float64 copy of its own (the cache's map is read-only: torch warned on a view of it)
    x_all = torch.from_numpy(np.array(inp.train_x, dtype=np.float64)).to(dev)
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
        init = (sel.weight, sel.bias) if p.warm_start else None  # from the selected fit
        final_fit, n_final = fit_one(x_all[rows], y_all[rows], K, sel.C, p, init), len(rows)
    else:
        final_fit, n_final = sel, len(tr)
    del x_all
    test_x = torch.from_numpy(np.array(inp.test_x, dtype=np.float64)).to(dev)  # a copy too
    test_y = torch.from_numpy(np.asarray(inp.test_y)).to(dev).long()
    hits = topk_hits(final_fit.logits(test_x), test_y)
    return ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "selected": {"C": sel.C, "C_index": best},
            **grid_edges(edge("C", cs, [sel.C], widen="c_exp_min, c_exp_max")),
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
