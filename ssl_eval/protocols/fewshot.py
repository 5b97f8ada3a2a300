"""Few-shot evaluation on frozen features: two protocol types sharing the classifiers.

``fewshot``: for each K in ``shots`` and each of ``seeds`` draws, take exactly K labelled
images per class from the training rows (``train_idx``, never the validation rows), fit each
classifier (logistic regression, nearest class mean, weighted k-NN) and score it on the whole
test split; the mean and a 95% t interval over draws. Logistic regression's C (inverse L2
strength) is chosen per draw from the grid ``logreg_cs``: one fit per C on that draw's
support, scored on the validation rows (``val_idx``, disjoint from the support); the best
validation top-1 wins, ties going to the smallest C (the strongest regularisation), and only
the chosen fit is scored on test. The choice works alike at every K, K = 1 included, and the
chosen C of every draw is recorded. The validation labels serve only that one choice among
the grid; the classifier is fitted on the K shots alone. An empty ``logreg_cs`` means the
fixed ``logreg_c`` (nothing selected). Nearest class mean and k-NN have fixed settings.

``fewshot_episodic``: N-way K-shot episodes, support from train, queries from test, every
classifier with its fixed settings (logistic regression at ``logreg_c``): nothing is selected.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UserError
from ..core.registry import Registry
from ._edges import edge, grid_edges
from .base import PROTOCOL_TYPES, DataShape, ProtocolInputs, ProtocolOutput, ProtocolType

LOGREG_CS = (0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0, 31.6, 100.0)  # 10^-2 .. 10^2, half-decades


@dataclass(frozen=True)
class FewShotParams:
    """``fewshot``: K labelled training images per class, scored on the whole test split."""

    shots: tuple[int, ...] = (1, 2, 5, 10, 25)
    seeds: int = 5  # support draws per K
    classifiers: tuple[str, ...] = ("logreg", "prototype", "knn")
    logreg_c: float = 1.0  # fixed inverse L2 strength, used when logreg_cs is empty
    logreg_cs: tuple[float, ...] = (
        LOGREG_CS  # the C grid, chosen per draw on val; () = fixed logreg_c
    )
    knn_k: int = 20  # clamped to the support size
    knn_temperature: float = 0.07
    on_small_class: str = "error"  # error | cap (use all a class has; recorded)
    headline: str = "logreg@5"  # classifier@K reported as top1

    def __post_init__(self):
        _check_classifiers(self)
        if any(c <= 0 for c in self.logreg_cs) or len(set(self.logreg_cs)) != len(self.logreg_cs):
            raise UserError(
                f"few-shot: logreg_cs are distinct and > 0 (or [] for the fixed logreg_c), "
                f"not {list(self.logreg_cs)}"
            )
        if self.seeds < 1 or not self.shots or min(self.shots) < 1:
            raise UserError("few-shot: seeds and every K in shots must be at least 1")
        if self.on_small_class not in ("error", "cap"):
            raise UserError(
                f"few-shot: on_small_class must be 'error' or 'cap', not {self.on_small_class!r}"
            )
        clf, _, k = self.headline.partition("@")
        if clf not in self.classifiers or not k.isdigit() or int(k) not in self.shots:
            raise UserError(
                f"few-shot: headline {self.headline!r} names no classifier@K that is run "
                f"(classifiers {list(self.classifiers)}, shots {list(self.shots)})"
            )


@dataclass(frozen=True)
class EpisodicParams:
    """``fewshot_episodic``: ``ways``-way ``episode_shots``-shot episodes, queries from test."""

    ways: int = 5
    episode_shots: int = 5
    queries: int = 15  # per class and episode
    episodes: int = 600
    classifiers: tuple[str, ...] = ("prototype", "logreg", "knn")
    logreg_c: float = 1.0
    knn_k: int = 5  # clamped to the support size
    knn_temperature: float = 0.07
    headline: str = "prototype"  # the classifier reported as top1

    def __post_init__(self):
        _check_classifiers(self)
        if min(self.ways, self.episode_shots, self.queries, self.episodes) < 1 or self.ways < 2:
            raise UserError("few-shot: ways >= 2 and episode_shots, queries, episodes >= 1")
        if self.headline.partition("@")[0] not in self.classifiers:
            raise UserError(
                f"few-shot: headline {self.headline!r} names no classifier that is run "
                f"({list(self.classifiers)})"
            )


def _check_classifiers(p) -> None:
    if not p.classifiers:
        raise UserError("few-shot: list at least one classifier")
    for c in p.classifiers:
        CLASSIFIERS.get(c)
    if p.logreg_c <= 0 or p.knn_temperature <= 0 or p.knn_k < 1:
        raise UserError("few-shot: logreg_c and knn_temperature must be > 0, knn_k >= 1")


def sample_support(
    labels: np.ndarray, k: int, rng: np.random.Generator, classes=None, cap: bool = False
) -> tuple[np.ndarray, dict[int, int]]:
    """Exactly ``k`` indices of ``labels`` per class (sorted), drawn without replacement.
    A class with fewer than ``k``: an error, or with ``cap`` all it has (returned in the
    second value as {class: count taken})."""
    classes = np.unique(labels) if classes is None else classes
    out, capped = [], {}
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            if not cap:
                raise UserError(
                    f"few-shot: class {int(c)} has only {len(idx)} training images, fewer than "
                    f"K={k}; lower the shots or set on_small_class=cap"
                )
            capped[int(c)] = len(idx)
            out.append(idx)
        else:
            out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out)), capped


# ---------------------------------------------------------------- classifiers
# Each works on a batch of E independent problems: support xs (E, n, D) with labels ys (E, n),
# queries xq (E, q, D); returns scores (E, q, C). Features are L2-normalised.


def _fit_logreg(xs, ys, inv_reg: torch.Tensor, C: int, init=None):
    """Multinomial logistic regression, minimising sum(CE) + ||W||^2 / (2 c) (the objective of
    scikit-learn's LogisticRegression, bias unpenalised), for E problems at once with L-BFGS,
    problem e at c = ``inv_reg[e]``: the problems are independent, so the sum's minimiser is
    each one's. ``init``: a previous fit's (W, b, mask) to start from (the objective is
    strictly convex, so the start changes only the path to its one minimiser). Returns the
    fitted (W, b, mask), mask being -inf on classes absent from a support."""
    E, n, D = xs.shape
    if init is None:
        W = torch.zeros(E, D, C, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(E, 1, C, dtype=torch.float64, requires_grad=True)
    else:
        W, b = (t.detach().clone().requires_grad_(True) for t in init[:2])
    x64, y = xs.double(), ys.long()
    half_inv_c = 0.5 / inv_reg.double().view(E, 1, 1)
    present = torch.zeros(E, 1, C, dtype=torch.bool)
    present.scatter_(2, y.unsqueeze(1), True)
    mask = torch.where(present, 0.0, -torch.inf).double()  # absent classes never predicted
    opt = torch.optim.LBFGS(
        [W, b],
        lr=1,
        max_iter=500,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        logits = torch.bmm(x64, W) + b + mask.clamp_min(-1e9)
        loss = (
            F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction="sum")
            + (half_inv_c * W**2).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach(), mask


def _logreg(xs, ys, xq, p, C: int) -> torch.Tensor:
    """Logistic regression at the fixed ``p.logreg_c``."""
    W, b, mask = _fit_logreg(xs, ys, torch.full((xs.shape[0],), p.logreg_c), C)
    return (torch.bmm(xq.double(), W) + b + mask).float()


def _prototype(xs, ys, xq, p: FewShotParams, C: int) -> torch.Tensor:
    E, n, D = xs.shape
    sums = torch.zeros(E, C, D).scatter_add_(1, ys.long().unsqueeze(2).expand(E, n, D), xs)
    counts = torch.zeros(E, C).scatter_add_(1, ys.long(), torch.ones(E, n))
    protos = F.normalize(sums / counts.clamp_min(1).unsqueeze(2), dim=2)
    scores = torch.bmm(xq, protos.transpose(1, 2))
    return scores.masked_fill((counts == 0).unsqueeze(1), -torch.inf)


def _knn(xs, ys, xq, p: FewShotParams, C: int) -> torch.Tensor:
    """Weighted k-NN (exp(sim / T) votes), k clamped to the support size."""
    E, n, _ = xs.shape
    k = min(p.knn_k, n)
    sims, idx = torch.bmm(xq, xs.transpose(1, 2)).topk(k, dim=2)
    labels = ys.long().gather(1, idx.view(E, -1)).view_as(idx)
    return torch.zeros(E, xq.shape[1], C).scatter_add_(2, labels, (sims / p.knn_temperature).exp())


CLASSIFIERS: Registry = Registry("few-shot classifier")
CLASSIFIERS.register("logreg", _logreg, "multinomial logistic regression (L-BFGS)")
CLASSIFIERS.register("prototype", _prototype, "nearest class mean, cosine")
CLASSIFIERS.register("knn", _knn, "weighted k-NN")


# ---------------------------------------------------------------- the protocol


def _normalised(inp: ProtocolInputs) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    train_x = F.normalize(torch.from_numpy(np.asarray(inp.train_x, dtype=np.float32)), dim=1)
    test_x = F.normalize(torch.from_numpy(np.asarray(inp.test_x, dtype=np.float32)), dim=1)
    return train_x, np.asarray(inp.train_y), test_x, np.asarray(inp.test_y)


def _chosen_logreg(xs, ys, xv, yv, xt, cs: tuple[float, ...], C: int) -> tuple[list, list, list]:
    """For each of the E supports in ``xs``: fit every C in ``cs`` (one batched L-BFGS per C,
    over the E draws, along the ascending path), keep the C with the best top-1 on the validation rows ``xv`` (the
    smallest C on ties) and score only that fit on the test rows ``xt``. Returns (test scores
    per draw, chosen C per draw, validation top-1 per draw and C)."""
    fits = []
    for c in cs:  # ascending C, each fit started from the previous one's minimiser (fewer steps)
        fits.append(
            _fit_logreg(xs, ys, torch.full((xs.shape[0],), c), C, init=fits[-1] if fits else None)
        )
    xv, xt = xv.double(), xt.double()

    def score(fit, e, x):
        W, b, mask = fit
        return x @ W[e] + b[e] + mask[e]

    scores, chosen, val = [], [], []
    for e in range(xs.shape[0]):
        acc = [float((score(f, e, xv).argmax(1) == yv).double().mean()) for f in fits]
        g = acc.index(max(acc))  # cs is sorted: the first of the best is the smallest C
        scores.append(score(fits[g], e, xt).float())
        chosen.append(cs[g])
        val.append(acc)
    return scores, chosen, val


def run_fewshot(inp: ProtocolInputs, p: FewShotParams) -> ProtocolOutput:
    train_x, train_y, test_x, test_y = _normalised(inp)
    test_y = torch.from_numpy(test_y)
    pool = np.asarray(inp.train_idx)  # the support never comes from the validation rows
    select = "logreg" in p.classifiers and bool(p.logreg_cs)
    cs = tuple(sorted(p.logreg_cs))
    if select:
        val_idx = np.asarray(inp.val_idx)
        if len(val_idx) == 0:
            raise UserError(
                "few-shot: choosing logistic regression's C needs a validation split; "
                "set logreg_cs=[] to use the fixed logreg_c"
            )
        xv, yv = train_x[val_idx], torch.from_numpy(train_y[val_idx])
    spread: dict[str, list[float]] = {}
    capped_all, chosen, val_top1 = {}, {}, {}
    for k in p.shots:
        supports = []
        for s in range(p.seeds):
            rng = np.random.default_rng([inp.seed, k, s])
            idx, capped = sample_support(train_y[pool], k, rng, cap=p.on_small_class == "cap")
            if capped:
                capped_all[f"K={k}"] = capped
            supports.append(pool[idx])
        xs_all, ys_all = train_x[np.stack(supports)], torch.from_numpy(train_y[np.stack(supports)])
        for name in p.classifiers:
            if name == "logreg" and select:
                scores, chosen[f"K={k}"], v = _chosen_logreg(
                    xs_all, ys_all, xv, yv, test_x, cs, inp.num_classes
                )
                val_top1[f"K={k}"] = [
                    float(m) for m in np.mean(v, axis=0)
                ]  # per C, mean over draws
            else:
                fn = CLASSIFIERS.get(name)
                scores = [
                    fn(xs_all[s : s + 1], ys_all[s : s + 1], test_x[None], p, inp.num_classes)[0]
                    for s in range(p.seeds)
                ]
            spread[f"top1@{name}/{k}shot"] = [_accuracy(scores[s], test_y) for s in range(p.seeds)]
    clf, _, k = p.headline.partition("@")
    head = f"top1@{clf}/{k}shot"
    spread["top1"] = spread[head]
    metrics = {m: float(np.mean(v)) for m, v in spread.items()}
    details = {
        "spread_over": "t-seeds",
        "capped_classes": capped_all,
        "headline": p.headline,
        "support_from": "train_idx",
    }
    if "logreg" in p.classifiers:
        details["logreg_c"] = (
            {"selected_on": "val", "grid": list(cs), "chosen": chosen, "val_top1_mean": val_top1}
            if select
            else {"fixed": p.logreg_c}
        )
        if select:  # every draw's C at every K
            details |= grid_edges(edge("logreg_cs", cs, [c for v in chosen.values() for c in v]))
    return ProtocolOutput(metrics, details, spread=spread)


def run_episodic(inp: ProtocolInputs, p: EpisodicParams) -> ProtocolOutput:
    train_x, train_y, test_x, test_y = _normalised(inp)
    eligible = [
        c
        for c in np.unique(train_y)
        if (train_y == c).sum() >= p.episode_shots and (test_y == c).sum() >= p.queries
    ]
    if len(eligible) < p.ways:
        raise UserError(
            f"few-shot: only {len(eligible)} classes have {p.episode_shots} training and "
            f"{p.queries} test images; need {p.ways} for {p.ways}-way episodes"
        )
    rng = np.random.default_rng([inp.seed, 7919])
    by_class_test = {c: np.flatnonzero(test_y == c) for c in eligible}
    s_all, q_all = [], []
    for _ in range(p.episodes):
        classes = rng.choice(eligible, size=p.ways, replace=False)
        s_idx, _ = sample_support(train_y, p.episode_shots, rng, classes=classes)
        s_all.append(s_idx)
        q_all.append(
            np.concatenate(
                [rng.choice(by_class_test[c], p.queries, replace=False) for c in classes]
            )
        )
    s_all, q_all = np.stack(s_all), np.stack(q_all)  # (E, ways*K), (E, ways*Q)

    # episode-local labels 0..ways-1, by rank of the class within its episode
    def local(y):
        return torch.from_numpy(np.stack([np.unique(r, return_inverse=True)[1] for r in y]))

    ys, yq = local(train_y[s_all]), local(test_y[q_all])
    xs, xq = train_x[torch.from_numpy(s_all)], test_x[torch.from_numpy(q_all)]
    spread: dict[str, list[float]] = {}
    tag = f"{p.ways}way{p.episode_shots}shot"
    for name in p.classifiers:
        scores = CLASSIFIERS.get(name)(xs, ys, xq, p, p.ways)
        spread[f"top1@{name}/{tag}"] = (scores.argmax(2) == yq).float().mean(1).tolist()
    head = f"top1@{p.headline.partition('@')[0]}/{tag}"
    spread["top1"] = spread[head]
    metrics = {m: float(np.mean(v)) for m, v in spread.items()}
    return ProtocolOutput(metrics, {"spread_over": "t-episodes", "headline": head}, spread=spread)


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).float().mean())


def preflight_fewshot(p: FewShotParams, shape: DataShape) -> None:
    """Before any feature is extracted: every K fits in the smallest class of the training rows
    (unless capped), and a C grid has validation rows to be chosen on."""
    if p.on_small_class == "error" and max(p.shots) > shape.min_class_train:
        fit = [k for k in p.shots if k <= shape.min_class_train] or [1]
        raise UserError(
            f"few-shot: K={max(p.shots)} exceeds the {shape.min_class_train} training images "
            f"(train minus val) of the smallest class; use --set shots=[{','.join(map(str, fit))}] "
            "or on_small_class=cap"
        )
    if "logreg" in p.classifiers and p.logreg_cs and shape.val == 0:
        raise UserError(
            "few-shot: choosing logistic regression's C needs a validation split; "
            "set logreg_cs=[] to use the fixed logreg_c"
        )


PROTOCOL_TYPES.register(
    "fewshot", ProtocolType("fewshot", FewShotParams, run_fewshot, preflight=preflight_fewshot)
)
PROTOCOL_TYPES.register(
    "fewshot_episodic", ProtocolType("fewshot_episodic", EpisodicParams, run_episodic)
)
