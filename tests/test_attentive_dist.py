"""The attentive probe under torchrun (protocols/_grid_share.py, features/tokens.py): two CPU
processes give one process's records, and a two-process run killed after a state is written
resumes, under torchrun, to them.

One module fixture launches the runs once: one process (in this process), then
``torchrun --nproc-per-node 2`` killed by rank 0 right after its first state write, then the
same command again. Two units: attentive@capi on cached tokens (its training views set to
none; the token entries are built by both ranks and written by rank 0) and attentive@vjepa2 on
its card's training views (crop, flip, AutoAugment, random erasing: each batch's views
embedded by one rank and gathered to both) and streamed validation and test tokens (budget
0), each a grid of 3 heads (shares of 1 and 2 heads). The killed run dies in the capi unit, which the rerun resumes; the vjepa2 unit
then runs whole under torchrun."""

import json
import os
import signal
import subprocess
from subprocess import PIPE

import numpy as np
import pytest
import torch
from test_eval_dist import TORCHRUN, _records, assert_same_records, spawn_two

from ssl_eval.cli import main
from ssl_eval.core.files import read_torch_checked

SLOW_FIXTURES = ("runs",)  # module fixtures that train or start processes (conftest)

ARGS = ["run", "--backbone", "random:test_vit", "--dataset", "digits", "--image-size", "16"]
ARGS += ["--protocol", "attentive@capi,attentive@vjepa2", "--no-progress", "--no-leaderboard"]
SETS = ["epochs=0", "iterations=6", "warmup=1", "batch_size=512", "lrs=[0.01,0.1,0.3]"]
SETS += ["weight_decays=[0.0]", "attentive@vjepa2.depth=1", "attentive@vjepa2.token_budget_gb=0"]
SETS += ["attentive@capi.train_crop=none", "attentive@capi.hflip=false"]
SETS += ["attentive@capi.crop_interpolation=backbone"]
ARGS += [a for s in SETS for a in ("--set", s)]
# 1132 training rows, batches of 512: 2 steps an epoch for capi, a state after steps 2 and 4
# of 6; 3 for vjepa2 (drop_last false: the last of 108 rows), a state after step 3


def _dirs(out, name: str) -> list[str]:
    return ["--results-dir", str(out / f"r{name}"), "--cache-dir", str(out / f"c{name}")]


def _torchrun(out, **env) -> subprocess.CompletedProcess:
    """The torchrun launch; on a hang (ranks out of step in a collective) its workers are
    killed with it, and the test fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | env
    cmd = [*TORCHRUN, "-m", "ssl_eval", *ARGS, *_dirs(out, "2")]
    p = subprocess.Popen(cmd, stdout=PIPE, stderr=PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail("torchrun did not end in 300 s")
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("attdist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (two threads on a busy machine crawl)
    try:
        assert main([*ARGS, *_dirs(out, "1")]) == 0
    finally:
        torch.set_num_threads(threads)
    killed = _torchrun(out, SSL_EVAL_TEST_KILL_AT="after-write:state.pt#1")
    killed.records = list((out / "r2" / "records").glob("*.json"))
    (state,) = (out / "c2" / "train_state").glob("*/state.pt")
    saved = read_torch_checked(state, "cpu")
    rerun = _torchrun(out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    return out, killed, saved, rerun


@pytest.mark.slow
def test_two_processes_resumed_write_the_records_one_process_writes(runs):
    out, killed, saved, rerun = runs
    assert killed.returncode != 0 and "Signal 9" in killed.stderr and not killed.records
    # the state rank 0 wrote holds every rank's heads, in grid order
    assert saved["step"] == 2 and len(saved["heads"]) == len(saved["opt"]) == 3
    assert "[resume] attentive from step 2 of 6" in rerun.stdout, rerun.stdout
    assert rerun.stdout.count("[resume]") == 1  # said once, by rank 0
    # value, setting, unit, interval, every head's validation score, the selected head,
    # per-image correctness: the single process's
    one, two = _records(out / "r1"), _records(out / "r2")
    assert_same_records(one, two, 4)
    details = {
        p: two[("random:test_vit", f"attentive@{p}", "top1")]["details"] for p in ("capi", "vjepa2")
    }
    assert [d["tokens_train"]["tokens"] for d in details.values()] == [
        "cached",
        "augmented online",
    ]
    assert details["vjepa2"]["tokens_val"]["tokens"] == "streamed"
    assert all(len(d["grid"]) == 3 for d in details.values())
    # nothing left behind: no temporary file, no lock, the state folder removed
    left = [p for p in (out / "c2").rglob("*") if p.name.endswith((".tmp", ".lock"))]
    assert not left and not list((out / "c2" / "train_state").iterdir())


@pytest.mark.slow
def test_token_entries_written_by_rank_zero_equal_one_process_to_the_byte(runs):
    out, *_ = runs
    entries = sorted(p.name for p in (out / "c1" / "tokens").iterdir() if p.is_dir())
    assert len(entries) == 2  # capi's train and test tokens; vjepa2 streams
    assert entries == sorted(p.name for p in (out / "c2" / "tokens").iterdir() if p.is_dir())
    for e in entries:
        for f in ("tokens.npy", "prefix.npy", "rows.npy"):
            a = (out / "c1" / "tokens" / e / f).read_bytes()
            assert (out / "c2" / "tokens" / e / f).read_bytes() == a, f"{e}/{f}"


def _tokens_worker(rank: int, port: int, out: str) -> None:
    from pathlib import Path

    import torch.distributed as dist
    from test_token_source import _backbone, _bundle

    from ssl_eval.core.errors import UserError
    from ssl_eval.features import tokens
    from ssl_eval.protocols.attentive import AttentiveParams, run_attentive
    from ssl_eval.protocols.base import ImageInputs

    torch.set_num_threads(1)
    bb, ds, out = _backbone(), _bundle(n=11), Path(out)
    cpu = torch.device("cpu")
    # a grid of one head over two ranks (rank 0's share is empty), streamed tokens, 4 test
    # batches: first in one process (before the group exists), then across the two
    p = AttentiveParams(
        iterations=3, batch_size=4, eval_batch_size=3, lrs=(0.05,), token_budget_gb=0.0
    )

    def attentive(name):
        inp = ImageInputs(bb, ds, np.arange(8), np.arange(8, 11), cpu, 0, out / name, 0, out)
        got = run_attentive(inp, p)
        return got.details, got.per_sample["top1"].tolist()

    one = attentive(f"one{rank}")  # each rank a world of one, its own state folder
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    two = attentive("two")

    def source(folder, budget=10**8, **kw):
        return tokens.token_source(
            bb, ds, "train", budget_bytes=budget, device=cpu, batch_size=3, cache_dir=folder, **kw
        )

    seen = {"one head": [two[0] == one[0], two[1] == one[1], one[0]["steps"]]}
    # streamed, shared: every rank gets every batch, the bits of the unshared batches
    src = source(out, budget=0)
    order = np.random.default_rng(0).permutation(11)
    got = list(src.batches(order, 4, shared=True))
    want = list(src.batches(order, 4))
    seen["shared"] = [
        (a[0].tolist() == b[0].tolist(), torch.equal(a[1], b[1]))
        for a, b in zip(got, want, strict=True)
    ] + [len(got)]
    # a cache folder on each node's own disk: rank 1 cannot see what rank 0 wrote
    try:
        source(out / f"node{rank}")
        seen["unseen"] = None
    except UserError as e:
        seen["unseen"] = str(e)
    # a batch that fails on rank 1, then rank 0's write failing: every rank stops with its line
    real = tokens._image_batches

    def failing(src, cuts):  # the entry's batches of 3 rows (the size probe's one row passes)
        if max(map(len, cuts), default=0) > 1:
            raise UserError("photo.jpg is not an image")
        yield from real(src, cuts)

    if rank == 1:
        tokens._image_batches = failing
    for what in ("batch", "write"):
        try:
            source(out / what)
            seen[what] = None
        except UserError as e:
            seen[what] = str(e)
        tokens._image_batches = real
        if rank == 0:

            def full(*args):
                raise OSError(28, "No space left on device")

            tokens._Bank.add = full
    dist.destroy_process_group()
    (out / f"{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
def test_token_sharing_and_its_failures_across_two_processes(tmp_path):
    spawn_two(_tokens_worker, tmp_path)
    for r in range(2):
        seen = json.loads((tmp_path / f"{r}.json").read_text())
        assert seen["one head"] == [True, True, 3], (r, seen)
        assert seen["shared"] == [[True, True]] * 3 + [3], (r, seen)
        assert seen["unseen"].startswith("rank 1 cannot read the token cache entry "), (r, seen)
        assert seen["unseen"].endswith("; put --cache-dir on a filesystem every node shares")
        assert seen["batch"] == "photo.jpg is not an image", (r, seen)
        assert seen["write"].startswith("could not write ") and "No space left" in seen["write"]
        assert all("\n" not in v for v in (seen["unseen"], seen["batch"], seen["write"]))
    assert len(list((tmp_path / "node0" / "tokens").iterdir())) == 1  # rank 0's entry
    assert not (tmp_path / "node1" / "tokens").exists()  # rank 1 wrote none of its own
    for what in ("batch", "write"):  # no entry, no temporary folder, no lock left
        assert list((tmp_path / what / "tokens").iterdir()) == []
