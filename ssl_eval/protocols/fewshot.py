"""Few-shot evaluation on frozen features: two protocol types sharing the classifiers.

``fewshot``: for each K in ``shots`` and each of ``seeds`` draws, take exactly K labelled
training images per class, fit each classifier (logistic regression, nearest class mean,
weighted k-NN) and score it on the whole test split. ``fewshot_episodic``: N-way K-shot
episodes, support from train, queries from test. Either way: the mean and a 95% t interval
over draws or episodes. Nothing is selected: the classifiers' settings are fixed in the card, so the
test split only reports, and the support is sampled from the train split only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..registry import Registry
from .base import PROTOCOL_TYPES, ProtocolInputs, ProtocolOutput, ProtocolType


@dataclass(frozen=True)
class FewShotParams:
    """``fewshot``: K labelled training images per class, scored on the whole test split."""

    shots: tuple[int, ...] = (1, 2, 5, 10, 25)
    seeds: int = 5  # support draws per K
    classifiers: tuple[str, ...] = ("logreg", "prototype", "knn")
    logreg_c: float = 1.0  # inverse L2 strength of logistic regression on L2-normalised features
    knn_k: int = 20  # clamped to the support size
    knn_temperature: float = 0.07
    on_small_class: str = "error"  # error | cap (use all a class has; recorded)
    headline: str = "logreg@5"  # classifier@K reported as top1

    def __post_init__(self):
        _check_classifiers(self)
        if self.seeds < 1 or not self.shots or min(self.shots) < 1:
            raise UserError("few-shot: seeds and every K in shots must be at least 1")
        if self.on_small_class not in ("error", "cap"):
            raise UserError(f"few-shot: on_small_class must be 'error' or 'cap', not {self.on_small_class!r}")
        clf, _, k = self.headline.partition("@")
        if clf not in self.classifiers or not k.isdigit() or int(k) not in self.shots:
            raise UserError(f"few-shot: headline {self.headline!r} names no classifier@K that is run "
                            f"(classifiers {list(self.classifiers)}, shots {list(self.shots)})")


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
            raise UserError(f"few-shot: headline {self.headline!r} names no classifier that is run "
                            f"({list(self.classifiers)})")


def _check_classifiers(p) -> None:
    if not p.classifiers:
        raise UserError("few-shot: list at least one classifier")
    for c in p.classifiers:
        CLASSIFIERS.get(c)
    if p.logreg_c <= 0 or p.knn_temperature <= 0 or p.knn_k < 1:
        raise UserError("few-shot: logreg_c and knn_temperature must be > 0, knn_k >= 1")


def sample_support(labels: np.ndarray, k: int, rng: np.random.Generator, classes=None,
                   cap: bool = False) -> tuple[np.ndarray, dict[int, int]]:
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


def _logreg(xs, ys, xq, p: FewShotParams, C: int) -> torch.Tensor:
    """Multinomial logistic regression, minimising sum(CE) + ||W||^2 / (2 logreg_c) (the
    objective of scikit-learn's LogisticRegression, bias unpenalised), for all E problems at
    once with L-BFGS: the problems are independent, so the sum's minimiser is each one's."""
    E, n, D = xs.shape
    W = torch.zeros(E, D, C, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(E, 1, C, dtype=torch.float64, requires_grad=True)
    x64, y = xs.double(), ys.long()
    present = torch.zeros(E, 1, C, dtype=torch.bool)
    present.scatter_(2, y.unsqueeze(1), True)
    mask = torch.where(present, 0.0, -torch.inf).double()  # absent classes never predicted
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=500, tolerance_grad=1e-7, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = torch.bmm(x64, W) + b + mask.clamp_min(-1e9)
        loss = F.cross_entropy(logits.view(-1, C), y.view(-1), reduction="sum") + (W**2).sum() / (2 * p.logreg_c)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
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


def run_fewshot(inp: ProtocolInputs, p: FewShotParams) -> ProtocolOutput:
    train_x, train_y, test_x, test_y = _normalised(inp)
    test_y = torch.from_numpy(test_y)
    spread: dict[str, list[float]] = {}
    capped_all = {}
    for k in p.shots:
        for s in range(p.seeds):
            rng = np.random.default_rng([inp.seed, k, s])
            idx, capped = sample_support(train_y, k, rng, cap=p.on_small_class == "cap")
            if capped:
                capped_all[f"K={k}"] = capped
            xs, ys = train_x[idx][None], torch.from_numpy(train_y[idx])[None]
            for name in p.classifiers:
                scores = CLASSIFIERS.get(name)(xs, ys, test_x[None], p, inp.num_classes)[0]
                spread.setdefault(f"top1@{name}/{k}shot", []).append(_accuracy(scores, test_y))
    clf, _, k = p.headline.partition("@")
    head = f"top1@{clf}/{k}shot"
    spread["top1"] = spread[head]
    metrics = {m: float(np.mean(v)) for m, v in spread.items()}
    return ProtocolOutput(metrics, {"spread_over": "t-seeds", "capped_classes": capped_all,
                                    "headline": p.headline}, spread=spread)


def run_episodic(inp: ProtocolInputs, p: EpisodicParams) -> ProtocolOutput:
    train_x, train_y, test_x, test_y = _normalised(inp)
    eligible = [c for c in np.unique(train_y)
                if (train_y == c).sum() >= p.episode_shots and (test_y == c).sum() >= p.queries]
    if len(eligible) < p.ways:
        raise UserError(f"few-shot: only {len(eligible)} classes have {p.episode_shots} training and "
                        f"{p.queries} test images; need {p.ways} for {p.ways}-way episodes")
    rng = np.random.default_rng([inp.seed, 7919])
    by_class_test = {c: np.flatnonzero(test_y == c) for c in eligible}
    s_all, q_all = [], []
    for _ in range(p.episodes):
        classes = rng.choice(eligible, size=p.ways, replace=False)
        s_idx, _ = sample_support(train_y, p.episode_shots, rng, classes=classes)
        s_all.append(s_idx)
        q_all.append(np.concatenate([rng.choice(by_class_test[c], p.queries, replace=False) for c in classes]))
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


PROTOCOL_TYPES.register("fewshot", ProtocolType("fewshot", FewShotParams, run_fewshot))
PROTOCOL_TYPES.register("fewshot_episodic", ProtocolType("fewshot_episodic", EpisodicParams, run_episodic))
