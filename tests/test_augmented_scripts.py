"""linear_aug against the scripts' own data rules, written out here (not ssl-eval's functions):

* ``stream`` with ``iterations`` (linear_aug@dinov2, @dinov3): facebookresearch/dinov2
  dinov2/data/samplers.py (ShardedInfiniteSampler, the sampler dinov2/eval/linear.py asks for)
  and facebookresearch/dinov3 dinov3/data/samplers.py (InfiniteSampler): on one process, an
  endless sequence of permutations of the training rows, one drawn per pass, read through by a
  DataLoader in batches of ``batch`` (drop_last never bites: the sequence has no end), for
  epochs x epoch_length iterations; CosineAnnealingLR(max_iter) stepped after each iteration;
  the heads scored every eval_period_iterations (``(iteration + 1) % eval_period == 0``, not
  on the last) and after the loop.
"""

import dataclasses

import pytest
import torch
from test_augmented_recipes import EPOCHWISE, _stream_run

from ssl_eval.core.errors import UserError
from ssl_eval.protocols import augmented
from ssl_eval.protocols.augmented import AugmentedParams

# ------------------------------------------------------------- DINOv2's / DINOv3's sampler


def infinite_sampler_batches(perms: list[list[int]], batch: int, max_iter: int) -> list:
    """The script's first ``max_iter`` batches: the permutations of the passes one after
    another (InfiniteSampler's ``while True: yield from randperm``), cut every ``batch`` rows
    whatever pass they come from; each row as (pass, index)."""
    sequence = [(q, i) for q, perm in enumerate(perms) for i in perm]
    assert len(sequence) >= batch * max_iter
    return [sequence[k * batch : (k + 1) * batch] for k in range(max_iter)]


def script_eval_points(max_iter: int, eval_period: int) -> list[int]:
    """The iterations done when dinov2/eval/linear.py (and dinov3's) scores the heads: inside
    the loop after iteration i when (i + 1) % eval_period == 0 and i != max_iter - 1, then
    once after the loop."""
    inside = [
        i + 1
        for i in range(max_iter)
        if eval_period > 0 and (i + 1) % eval_period == 0 and i != max_iter - 1
    ]
    return inside + [max_iter]


def script_lrs(peak: float, max_iter: int) -> list[float]:
    """The lr of each iteration: SGD at ``peak``, CosineAnnealingLR(optimizer, max_iter,
    eta_min=0), scheduler.step() after every optimizer.step()."""
    head = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(head.parameters(), peak, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_iter, eta_min=0)
    out = []
    for _ in range(max_iter):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# 96 training rows, batches of 40: 7 iterations read 280 rows, the end of pass 2
DINO_STREAM = dataclasses.replace(
    EPOCHWISE,
    stream=True,
    iterations=7,
    eval_period=3,
    lr_update="step",
    drop_last=True,
    forward_batch=40,
)


@pytest.fixture(scope="module")
def dino_stream_run(tmp_path_factory):
    return _stream_run(tmp_path_factory.mktemp("dino_stream"), DINO_STREAM)


SLOW_FIXTURES = ("dino_stream_run",)


def test_stream_with_iterations_is_the_infinite_samplers_batches(dino_stream_run):
    rows, lrs, out = dino_stream_run
    n, batch, max_iter = 96, 40, 7
    perms = [augmented.pass_order(0, q, n) for q in range(3)]  # a new permutation each pass
    theirs = infinite_sampler_batches(perms, batch, max_iter)
    assert rows == [list(b) for b in theirs]
    assert {q for q, _ in rows[2]} == {0, 1} and {q for q, _ in rows[4]} == {1, 2}  # crossing
    assert out.details["steps"] == max_iter == len(lrs)
    assert out.details["stream"] == {"passes": 3, "scored_at": [3, 6, 7]}


def test_stream_with_iterations_steps_torchs_cosine_every_iteration(dino_stream_run):
    _, lrs, _ = dino_stream_run
    for h, (base, _) in enumerate(DINO_STREAM.settings()):
        want = script_lrs(base * 40 / 256, 7)
        got = [float(lr[h]) for lr in lrs]
        assert got == pytest.approx(want, rel=1e-6), h


def test_stream_heads_scored_at_the_scripts_eval_points(dino_stream_run):
    _, _, out = dino_stream_run
    history = out.details["history"]
    assert [e["steps_done"] for e in history] == script_eval_points(7, 3) == [3, 6, 7]


@pytest.mark.parametrize(
    ("iterations", "period", "ends"),
    [
        (12_500, 1250, [1250 * k for k in range(1, 11)]),  # the scripts' defaults
        (12_500, 0, None),  # eval_period 0: a scoring when each pass's last batch is done
        (10, 4, [4, 8, 10]),
        (3, 1250, [3]),  # fewer iterations than the period: scored at the end only
    ],
)
def test_scoring_points_of_a_stream(iterations, period, ends):
    from ssl_eval.protocols._aug_grid import schedule, stream_ends

    p = AugmentedParams(
        stream=True,
        iterations=iterations,
        eval_period=period,
        warmup_epochs=0.0,
        optimizer="sgd",
    )
    n, batch = 1_281_167, 1024
    got = stream_ends(p, n, batch)
    if ends is None:  # after the batch holding each pass's last row, the last at 12,500
        ends = [(q + 1) * n // batch for q in range(9)] + [12_500]  # pass 10 cut short
        assert ends[:3] == [1251, 2502, 3753]
    else:
        assert ends == script_eval_points(iterations, period)
    assert got == ends
    assert schedule(n // batch, p, n, batch) == (len(ends), iterations)


def test_a_stream_fills_every_batch_on_fewer_rows_than_a_batch(tmp_path):
    """InfiniteSampler fills the script's 1024 rows whatever the dataset's size: a batch larger
    than the 96 training rows spans passes, and the lr scales with the full batch."""
    p = dataclasses.replace(
        DINO_STREAM, batch_size=200, forward_batch=200, iterations=2, eval_period=0
    )
    rows, lrs, out = _stream_run(tmp_path, p)
    perms = [augmented.pass_order(0, q, 96) for q in range(5)]
    assert rows == [list(b) for b in infinite_sampler_batches(perms, 200, 2)]
    assert out.details["batch"] == 200 and {q for q, _ in rows[1]} == {2, 3, 4}
    assert float(lrs[0][0]) == pytest.approx(p.base_lrs[0] * 200 / 256, rel=1e-6)
    # one scoring where a batch ends two passes (pass ends after steps 0, 0, 1, 1, 2 -> 1, 2)
    assert out.details["stream"]["scored_at"] == [1, 2]


def test_eval_period_needs_a_stream():
    with pytest.raises(UserError, match="eval_period"):
        AugmentedParams(eval_period=10)
    with pytest.raises(UserError, match="eval_period"):
        AugmentedParams(stream=True, warmup_epochs=0.0, optimizer="sgd", eval_period=-1)
    # a stream with a fixed iteration count is the DINO scripts' sampler: accepted
    AugmentedParams(stream=True, iterations=10, warmup_epochs=0.0, optimizer="sgd")
