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
from ..features.stream import FeatureRows
from .base import PROTOCOL_TYPES, ProtocolInputs, ProtocolOutput, ProtocolType, topk_hits
from .knn import KnnParams, preflight_knn, run_knn
from .linear import LinearParams, _train, linear_chunks
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
    """``run_linear``'s head (same training, same selection on validation), scored on
    ImageNet's validation images and on every extra test set."""
    dev, C = inp.device, inp.num_classes
    torch.manual_seed(inp.seed)
    train = FeatureRows(inp.train_x, device=dev)
    y_all = torch.from_numpy(np.asarray(inp.train_y)).to(dev)
    tr, va = torch.from_numpy(inp.train_idx).to(dev), torch.from_numpy(inp.val_idx).to(dev)
    if len(va) == 0:
        raise UserError("linear: the validation split is empty; raise --val-fraction")
    chunks = linear_chunks(train.dim, len(p.lrs) * len(p.weight_decays), C)
    heads = _train(train, y_all, C, p, inp.seed, tr, chunks["stats"])
    val_acc = heads.top1_per_head(
        FeatureRows(inp.train_x, inp.val_idx, dev), y_all[va], chunks["eval"]
    )
    sel = val_acc
    if heads.diverged_mask is not None:
        sel = torch.where(heads.diverged_mask.to(val_acc.device), -1.0, val_acc)
    best = int(torch.argmax(sel))

    def score_chunks(x):
        rows = FeatureRows(x, device=dev)
        for s in range(0, len(rows), chunks["eval"]):
            yield heads.logits(rows.read(s, s + chunks["eval"]), head=best)
        rows.release()

    test_y = torch.from_numpy(np.asarray(inp.test_y)).to(dev)
    hits, s = {1: [], 5: []}, 0
    for scores in score_chunks(inp.test_x):
        h = topk_hits(scores, test_y[s : s + len(scores)])
        s += len(scores)
        for k in hits:
            hits[k].append(h[k])
    hits = {k: np.concatenate(v) for k, v in hits.items()}
    lr, wd = heads.settings[best]
    out = ProtocolOutput(
        {"top1": float(hits[1].mean()), "top5": float(hits[5].mean())},
        {
            "selected": {"lr": lr, "weight_decay": wd},
            "val_top1": {
                f"lr={a},wd={b}": float(v)
                for (a, b), v in zip(heads.settings, val_acc, strict=False)
            },
            "epochs_run": heads.epochs,
            "diverged_heads": heads.diverged,
        },
        per_sample={"top1": hits[1], "top5": hits[5]},
    )
    return _with_extra(out, inp, score_chunks)


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
