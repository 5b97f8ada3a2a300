"""The linear probe and the k-NN of ImageNet, scored besides on the robustness test sets of
``imagenet-robust`` (data/imagenet.py) with the same head or bank: one unit, one setting,
one record per test set and metric (``top1`` on ImageNet's validation images,
``top1:imagenet-a`` ...).

The head is the linear protocol's (``linear._train`` with the same grid, seed and rows, the
head with the best validation top-1), the bank the k-NN's (the full train split, the k chosen
on validation by ``run_knn``): on ImageNet's own validation images both give the numbers of
``linear`` and ``knn`` exactly (tests/test_robustness.py). On a set that covers only some of
the 1,000 classes (ImageNet-A and -R, 200 each), a prediction is the best of those classes,
as their authors score their models (hendrycks/natural-adv-examples eval.py and
hendrycks/imagenet-r eval.py: ``output[:, indices_in_1k]`` before the arg max); their labels
are then positions among those classes. ImageNet-V2 and -Sketch are scored on all classes."""

from __future__ import annotations

import numpy as np
import torch

from ..core.errors import UserError
from .base import PROTOCOL_TYPES, ProtocolInputs, ProtocolOutput, ProtocolType, topk_hits
from .knn import KnnParams, preflight_knn, run_knn
from .linear import LinearParams, fit_and_select, linear_output
from .search.knn import knn_classify, resolve_backend


def restricted_hits(
    scores: torch.Tensor, labels: torch.Tensor, subset: list[int] | None
) -> dict[int, np.ndarray]:
    """Top-1/top-5 hits of ``scores`` (N, C); with ``subset``, among those classes only."""
    if subset is None:
        return topk_hits(scores, labels)
    cols = torch.as_tensor(subset, device=scores.device)
    position = torch.full((scores.shape[1],), -1, dtype=torch.long, device=scores.device)
    position[cols] = torch.arange(len(cols), device=scores.device)
    return topk_hits(scores[:, cols], position[labels])


def _with_extra(out: ProtocolOutput, inp: ProtocolInputs, score_chunks) -> ProtocolOutput:
    """``out`` with top-1/top-5 on every extra test set: ``score_chunks(x)`` yields the
    (rows, C) scores of ``x`` a chunk at a time, in order."""
    if not inp.extra_tests:
        raise UserError(
            "the robustness protocols need a dataset with robustness test sets "
            "(imagenet-robust); use linear or knn elsewhere"
        )
    for name, (x, y, subset) in inp.extra_tests.items():
        y = torch.as_tensor(np.asarray(y), dtype=torch.long, device=inp.device)
        hits, s = {1: [], 5: []}, 0
        for scores in score_chunks(x):
            h = restricted_hits(scores, y[s : s + len(scores)], subset)
            s += len(scores)
            for k in hits:
                hits[k].append(h[k])
        for k in hits:
            v = np.concatenate(hits[k])
            out.per_sample[f"top{k}:{name}"] = v
            out.metrics[f"top{k}:{name}"] = float(v.mean())
        out.details.setdefault("test_sets", {})[name] = {
            "size": len(y),
            "classes": "all" if subset is None else len(subset),
        }
    return out


def run_linear_robust(inp: ProtocolInputs, p: LinearParams) -> ProtocolOutput:
    """``run_linear`` (the same grid trained, the same head chosen on validation, the same
    numbers on ImageNet's validation images), then that head on every extra test set."""
    fit = fit_and_select(inp, p)
    return _with_extra(linear_output(inp, p, fit), inp, fit.scores)


def run_knn_robust(inp: ProtocolInputs, p: KnnParams) -> ProtocolOutput:
    """``run_knn`` on ImageNet (its k chosen on validation), then the same bank (the full
    train split) and k vote for every extra test set."""
    out = run_knn(inp, p)
    k = out.details["selected_k"]
    backend = resolve_backend(p.backend, inp.device)
    bank_y = torch.from_numpy(np.asarray(inp.train_y)).to(inp.device)

    def score_chunks(x):
        for s in range(0, len(x), 8192):
            yield knn_classify(
                inp.train_x,
                bank_y,
                x[s : s + 8192],
                [k],
                p.temperature,
                inp.num_classes,
                backend,
                p.memory_mb,
            )[k]

    return _with_extra(out, inp, score_chunks)


PROTOCOL_TYPES.register(
    "linear_robust",
    ProtocolType("linear_robust", LinearParams, run_linear_robust, extra_tests=True),
)
PROTOCOL_TYPES.register(
    "knn_robust",
    ProtocolType(
        "knn_robust",
        KnnParams,
        run_knn_robust,
        seeded=False,
        preflight=preflight_knn,
        extra_tests=True,
    ),
)
