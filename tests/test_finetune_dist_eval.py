"""Fine-tune validation and test evaluation across a torchrun world: each rank passes only its
share of one process's evaluation batches through the model, and every rank gets back the
per-image results of one process, in its order.

The real ``finetune._evaluate`` runs in a fake world of W threads (``distributed.rank`` is the
thread's, ``all_gather`` meets the other threads at a barrier), so the test sees which images
each rank puts through the model. The end-to-end check, two gloo processes against one with the
records compared (validation score, value, per-image correctness), is
``test_ddp_fine_tune_trains_on_the_single_process_global_batch`` in test_eval_dist.py: there the
test set's three batches are shared out (one to rank 0, two to rank 1) and the one
validation batch goes to rank 1."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ssl_eval.core import distributed
from ssl_eval.core.errors import UserError
from ssl_eval.data.datasets import ImageSplit
from ssl_eval.data.transforms import Preprocessing
from ssl_eval.protocols import finetune

PRE, CPU = Preprocessing(), torch.device("cpu")  # no resize, no crop: the 8x8 images as they are


def _fake_world(monkeypatch, w: int):
    """``run(fn)``: ``fn()`` on each of ``w`` threads, thread r being rank r of a world of w;
    the ranks' results in rank order."""
    local, barrier, slots = threading.local(), threading.Barrier(w, timeout=60), [None] * w

    def all_gather(obj):
        slots[local.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()  # every rank has read the slots before any rank's next gather
        return out

    monkeypatch.setattr(distributed, "world", lambda: w)
    monkeypatch.setattr(distributed, "rank", lambda: local.rank)
    monkeypatch.setattr(distributed, "all_gather", all_gather)

    def as_rank(r, fn):
        local.rank = r
        return fn()

    def run(fn):
        with ThreadPoolExecutor(w) as pool:
            futures = [pool.submit(as_rank, r, fn) for r in range(w)]
            return [f.result() for f in futures]

    return run


def _classifier() -> finetune._Classifier:
    """A small classifier with BatchNorm (eval mode: running statistics) and a head whose
    logits are far from ties."""
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU())
    enc[2].running_mean.normal_()
    enc[2].running_var.uniform_(0.5, 2.0)
    clf = finetune._Classifier(enc, lambda e, x: e(x), 16, 3)
    nn.init.normal_(clf.head.weight)
    return clf


@pytest.mark.parametrize("n, w", [(23, 2), (23, 3), (3, 2)])  # (3, 2): one batch, rank 0 idle
def test_each_rank_evaluates_its_share_and_gathers_one_process_results(monkeypatch, n, w):
    rng = np.random.default_rng(0)
    split = ImageSplit(
        labels=rng.integers(0, 3, n + 5), images=rng.integers(0, 256, (n + 5, 8, 8, 3), np.uint8)
    )
    idx = rng.permutation(n + 5)[:n]  # an unsorted subset: its order is the results' order
    p = finetune.FinetuneParams(eval_batch_size=4)
    clf, seen = _classifier(), []
    clf.register_forward_hook(
        lambda m, args, out: seen.append((distributed.rank(), args[0].clone(), out.clone()))
    )

    def evaluate():
        return finetune._evaluate(clf, split, idx, PRE, p, CPU, False, 0)

    want_correct, want_hits = evaluate()  # one process
    one = [(x, out) for _, x, out in seen]
    assert len(want_correct) == n and [len(x) for x, _ in one][0] == min(n, 4)
    if n > 4:  # correct and wrong predictions, so that a misplaced share shows
        assert 0 < int(want_correct.sum()) < n and 0 < int(want_hits[1].sum()) < n

    seen.clear()
    for correct, hits in _fake_world(monkeypatch, w)(evaluate):  # every rank: the whole, in order
        assert torch.equal(correct, want_correct)
        assert hits.keys() == want_hits.keys()
        assert all(np.array_equal(hits[k], want_hits[k]) for k in hits)
    mine = [[(x, out) for rank, x, out in seen if rank == r] for r in range(w)]
    # each rank put only its contiguous run of one process's batches through the model ...
    batches = math.ceil(n / p.eval_batch_size)
    want_counts = [len(range(batches)[distributed.shard(batches, r, w)]) for r in range(w)]
    assert [len(m) for m in mine] == want_counts
    # ... the very batches one process forms (same images, same size), so the same logits
    shares = [b for m in mine for b in m]
    assert len(shares) == len(one)
    for (x, out), (x1, out1) in zip(shares, one, strict=True):
        assert torch.equal(x, x1) and torch.equal(out, out1)


def test_an_image_that_fails_in_one_ranks_share_stops_every_rank_with_its_message(
    monkeypatch, tmp_path
):
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    paths[5].write_bytes(b"not an image")  # batches [0 1] | [2 3] [4 5]: rank 1's share
    split = ImageSplit(labels=np.zeros(6, np.int64), paths=paths)
    p, clf = finetune.FinetuneParams(eval_batch_size=2), _classifier()

    def evaluate():
        try:
            finetune._evaluate(clf, split, np.arange(6), PRE, p, CPU, False, 0)
        except UserError as e:
            return str(e)

    messages = _fake_world(monkeypatch, 2)(evaluate)
    assert messages[0] == messages[1], messages  # rank 0's share decoded, but it stops too
    assert messages[0].startswith(f"cannot read image {paths[5]}") and "\n" not in messages[0]
