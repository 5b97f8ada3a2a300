"""Multi-label classification on frozen features: one linear SVM per class, VOC2007's 11-point
mAP on test (protocols/_metrics.py).

The recipe is the VOC07 SVM benchmark of Goyal et al. 2019 (facebookresearch/
fair_self_supervision_benchmark, tools/svm/train_svm_kfold.py and svm_helper.py at commit
275d104a997181a5252796579f730ec574964ebd): features L2-normalised (norm + 1e-5), for each class
a scikit-learn ``LinearSVC`` (squared hinge, L2, dual, class_weight {1: 2, -1: 1}, tol 1e-4,
max_iter 2000) at every cost of the grid 0.01, 0.1 and 0.5 ** 4 ... 0.5 ** 19, the cost with
the best AP kept per class, then one fit at that cost on all training images scored on test.
What differs: the cost is chosen on ssl-eval's validation split (the AP of a fit on train minus
val), not by 3-fold cross-validation, and that AP is the 11-point one reported on test;
images with only difficult objects of a class (target 0) are left out of that class's training
and of its AP, as the devkit leaves them out of the AP (the script trains on them as
negatives)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..core.errors import UserError
from ._metrics import ap11, map11
from .base import PROTOCOL_TYPES, ProtocolInputs, ProtocolOutput, ProtocolType

FAIR_COSTS = (0.01, 0.1, *(0.5**k for k in range(4, 20)))


@dataclass(frozen=True)
class MultilabelParams:
    costs: tuple[float, ...] = FAIR_COSTS
    positive_weight: float = 2.0  # class_weight of the positives (negatives: 1)
    max_iter: int = 2000
    tol: float = 1e-4
    reference: str = ""

    def __post_init__(self):
        if not self.costs or any(not (c > 0) for c in self.costs):
            raise UserError("multilabel: costs must be a non-empty list of positive numbers")
        if not self.positive_weight > 0 or self.max_iter < 1 or not self.tol > 0:
            raise UserError("multilabel: need positive_weight > 0, max_iter >= 1 and tol > 0")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1) + 1e-5)[:, None]


def _fit(x, y, cost: float, p: MultilabelParams, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    clf = LinearSVC(
        C=cost,
        class_weight={1: p.positive_weight, -1: 1.0},
        penalty="l2",
        loss="squared_hinge",
        dual=True,
        tol=p.tol,
        max_iter=p.max_iter,
        random_state=seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    return clf, any(issubclass(w.category, ConvergenceWarning) for w in caught)


def run_multilabel(inp: ProtocolInputs, p: MultilabelParams) -> ProtocolOutput:
    if inp.train_targets is None or inp.test_targets is None:
        raise UserError(
            "multilabel applies to multi-label datasets (voc2007); evaluate single-label "
            "datasets with knn, linear or logreg"
        )
    x, xt = _normalise(inp.train_x), _normalise(inp.test_x)
    t, tt = np.asarray(inp.train_targets), np.asarray(inp.test_targets)
    tr, va = np.asarray(inp.train_idx), np.asarray(inp.val_idx)
    if len(va) == 0:
        raise UserError("multilabel: the validation split is empty; raise --val-fraction")
    every = np.arange(len(x))
    scores = np.zeros(tt.shape, dtype=np.float64)
    selected, val_ap, not_converged = [], [], 0
    for c in range(t.shape[1]):
        rows = tr[t[tr, c] != 0]  # difficult-only images: not trained on
        if len(np.unique(t[rows, c])) < 2 or not (t[va, c] > 0).any():
            raise UserError(
                f"multilabel: class {c} needs positive and negative images in train minus val "
                "and a positive in val; a larger dataset or another --val-fraction"
            )
        aps = []
        for cost in p.costs:
            clf, warned = _fit(x[rows], t[rows, c], cost, p, inp.seed)
            not_converged += warned
            aps.append(ap11(clf.decision_function(x[va]), t[va, c]))
        best = int(np.argmax(aps))  # the first best in grid order on ties
        final_rows = every[t[:, c] != 0]
        clf, warned = _fit(x[final_rows], t[final_rows, c], p.costs[best], p, inp.seed)
        not_converged += warned
        scores[:, c] = clf.decision_function(xt)
        selected.append(p.costs[best])
        val_ap.append(aps)
    value, per_class = map11(scores, tt)
    return ProtocolOutput(
        {"map11": value},
        {
            "selected_cost": selected,
            "val_ap11": val_ap,  # per class, per cost of the grid
            "test_ap11": per_class,
            "train_size": len(tr),
            "val_size": len(va),
            "final_fit": "train+val",
            "not_converged": not_converged,
        },
        resampled={"map11": lambda idx: map11(scores[idx], tt[idx])[0]},
    )


PROTOCOL_TYPES.register(
    "multilabel", ProtocolType("multilabel", MultilabelParams, run_multilabel, labels="multi")
)
