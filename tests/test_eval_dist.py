"""Evaluation by two CPU processes (``torchrun --nproc-per-node 2 -m ssl_eval run``, gloo)
against one process: the same records (value, setting, unit key, per-image correctness, every
detail but the provenance that names the processes), written once, by rank 0; feature cache
entries equal to the byte; and the k-NN merge of per-shard top-k equal to one search.

The two runs are launched once per module (process start-up dominates the cost)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssl_eval.core.distributed import shard
from ssl_eval.protocols.knn import canonical_search, merge_topk

SLOW_FIXTURES = (
    "runs",
    "finetune_runs",
)  # module fixtures that train or start processes (conftest)

ARGS = [
    "run",
    "--backbone",
    "pixels,random:resnet10t",
    "--dataset",
    "digits",
    "--image-size",
    "16",
    "--protocol",
    "knn,linear",
    "--feature-dtype",
    "float32",
    "--batch-size",
    "100",  # 13 train batches over 2 ranks: an odd count, the last one short
    "--no-progress",
    "--no-leaderboard",
]
UNITS = 4  # 2 backbones x 2 protocols


# fine-tuning: a backbone without BatchNorm (refused on CPU processes), one epoch
FINETUNE = ["run", "--backbone", "random:test_vit", "--dataset", "digits", "--image-size", "16"]
FINETUNE += ["--protocol", "finetune", "--set", "epochs=1", "--no-progress", "--no-leaderboard"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _launch(prefix: list[str], args, out, name: str, **env) -> subprocess.CompletedProcess:
    cmd = [*prefix, "-m", "ssl_eval", *args, "--results-dir", str(out / f"r{name}")]
    cmd += ["--cache-dir", str(out / f"c{name}")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | env
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaldist")
    one = _launch([sys.executable], ARGS, out, "1")
    two = _launch(TORCHRUN, ARGS, out, "2")
    return out, one, two


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetunedist")
    _launch([sys.executable], FINETUNE, out, "1", OMP_NUM_THREADS="1")  # as torchrun's workers
    _launch(TORCHRUN, FINETUNE, out, "2")
    return _records(out / "r1"), _records(out / "r2")


def _records(folder) -> dict:
    recs = {}
    for f in sorted((folder / "records").glob("*.json")):
        for r in json.loads(f.read_text())["records"]:
            recs[(r["backbone"], r["protocol"]["name"], r["metric"])] = r
    return recs


@pytest.mark.slow
def test_two_processes_write_the_records_one_process_writes(runs):
    out, _, _ = runs
    assert_same_records(_records(out / "r1"), _records(out / "r2"), 2 * UNITS)


def assert_same_records(one: dict, two: dict, at_least: int) -> None:
    """The records of 2 processes (``_records``) are one process's, but for the provenance."""
    assert one.keys() == two.keys() and len(one) >= at_least
    for what, a in one.items():
        b = two[what]
        assert b["value"] == a["value"], what
        assert b["setting"]["hash"] == a["setting"]["hash"], what
        assert b["unit"] == a["unit"], what  # the skip key holds no world size
        assert b["ci95"] == a["ci95"], what
        assert b["details"].pop("processes") == {"world_size": 2, "backend": "gloo"}
        assert "processes" not in a["details"]
        for d in (a["details"], b["details"]):
            d.pop("feature_seconds", None)  # how long extraction took: provenance
        # every k's validation score, every head's validation score, the per-image correctness
        assert b["details"] == a["details"], what


@pytest.mark.slow
def test_each_unit_written_once_by_rank_zero(runs):
    out, _, two = runs
    assert len(list((out / "r2" / "records").glob("*.json"))) == UNITS
    assert two.stderr.count("[done]") == UNITS
    table = [ln for ln in two.stdout.splitlines() if "\tdigits\t" in ln]
    assert len(table) == UNITS, two.stdout


def test_feature_cache_entries_equal_to_the_byte(runs):
    out, _, _ = runs
    assert_same_entries(out / "c1", out / "c2", 4)  # 2 backbones x (train, test)


def assert_same_entries(one, two, count: int) -> list[str]:
    """The feature cache folders ``one`` and ``two`` hold the same ``count`` entries (same
    keys), equal to the byte; their names."""
    entries = sorted(p.name for p in (one / "features").iterdir() if p.is_dir())
    assert len(entries) == count
    assert entries == sorted(p.name for p in (two / "features").iterdir() if p.is_dir())
    for e in entries:
        for f in ("features.npy", "labels.npy"):
            a = (one / "features" / e / f).read_bytes()
            assert (two / "features" / e / f).read_bytes() == a, f"{e}/{f}"
    return entries


def _reference(bank: torch.Tensor, queries: torch.Tensor, k: int):
    """Every similarity, sorted best first, equal ones by the lower bank index."""
    s = queries @ bank.T
    order = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), order


@pytest.mark.parametrize("world", [2, 3])
def test_merged_shard_top_k_is_the_one_search(world):
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(600, 16, generator=g), dim=1)
    bank[[5, 250, 420, 599]] = bank[170].clone()  # exact ties across and within shards
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    queries[:5] = bank[170] + 0.01 * queries[:5]  # the tied rows among their neighbours
    k = 20
    sims, idx = [], []
    for r in range(world):
        part = shard(len(bank), r, world)
        s, i = canonical_search(bank[part], queries, k, "torch", 64)
        sims.append(s)
        idx.append(i + part.start)
    got_s, got_i = merge_topk(sims, idx, k)
    want_s, want_i = _reference(bank, queries, k)
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_s, want_s)
    assert got_i[0, :5].tolist() == [5, 170, 250, 420, 599]  # the tie: lower index first


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_breaks_exact_ties_by_the_lower_index(backend):
    """40 copies of one row straddle the k-th place (beyond the fetched margin): the search
    keeps the lowest-indexed copies, whatever order the backend returns them in."""
    pytest.importorskip("faiss") if backend == "faiss" else None
    g = torch.Generator().manual_seed(1)
    bank = torch.nn.functional.normalize(torch.randn(500, 8, generator=g), dim=1)
    copies = torch.randperm(500, generator=g)[:40]
    bank[copies] = bank[copies[0]].clone()
    queries = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    queries[:10] = bank[copies[0]] + 0.05 * queries[:10]
    k = 20
    got_s, got_i = canonical_search(bank, queries, k, backend, 1)
    want_s, want_i = _reference(bank, queries, k)
    assert torch.equal(got_i, want_i)
    assert torch.allclose(got_s, want_s, rtol=1e-6, atol=0)  # FAISS: its own BLAS's last bits
    assert set(got_i[0].tolist()) <= set(copies.tolist())


def test_shards_cover_every_item_once_in_order():
    for n in (0, 1, 7, 600):
        for w in (1, 2, 3, 8):
            covered = np.concatenate([np.arange(n)[shard(n, r, w)] for r in range(w)])
            assert covered.tolist() == list(range(n))


@pytest.mark.slow
def test_ddp_fine_tune_trains_on_the_single_process_global_batch(finetune_runs):
    one, two = finetune_runs
    assert one.keys() == two.keys() and one
    for what, a in one.items():
        b = two[what]
        assert b["unit"] == a["unit"] and b["setting"]["hash"] == a["setting"]["hash"]
        assert b["details"]["processes"]["world_size"] == 2
        # the gradient is summed in another order (shares, then all-reduce): float precision
        la, lb = a["details"]["history"][0]["loss"], b["details"]["history"][0]["loss"]
        assert abs(la - lb) < 1e-5 * abs(la), (la, lb)
        assert b["details"]["history"][0]["val_top1"] == a["details"]["history"][0]["val_top1"]
        assert b["value"] == a["value"], what
        assert b["details"].get("per_sample_correct") == a["details"].get("per_sample_correct")


@pytest.mark.parametrize(
    "change, arch, refused",
    [
        ({"batch_size": 63}, "test_vit", "batch_size 63 does not split over 2 processes"),
        ({"mixup_alpha": 0.8}, "test_vit", "mixup, cutmix and drop path"),
        ({"drop_path": 0.1}, "test_vit", "mixup, cutmix and drop path"),
        ({}, "test_resnet", "has BatchNorm"),
    ],
)
def test_fine_tune_refuses_what_processes_would_change(monkeypatch, change, arch, refused):
    import dataclasses

    import timm

    from ssl_eval.core import distributed
    from ssl_eval.core.errors import UserError
    from ssl_eval.protocols import _finetune_dist
    from ssl_eval.protocols.finetune import FinetuneParams

    model = timm.create_model(arch, num_classes=0)
    p = dataclasses.replace(FinetuneParams(), **change)
    _finetune_dist.check(p, model, torch.device("cpu"))  # one process: all of it allowed
    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(UserError, match=refused) as e:
        _finetune_dist.check(p, model, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_ddp_batches_are_the_single_process_batches_cut_in_shares(monkeypatch):
    from torch.utils.data import DataLoader

    from ssl_eval.core import distributed
    from ssl_eval.protocols import _finetune_dist

    data = list(range(23))

    def batches(**kw):
        return [b.tolist() for b in DataLoader(data, **kw)]

    one = batches(**_finetune_dist.loader_args(data, 6, True, torch.Generator().manual_seed(3)))
    monkeypatch.setattr(distributed, "world", lambda: 2)
    shares = []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        g = torch.Generator().manual_seed(3)
        shares.append(batches(**_finetune_dist.loader_args(data, 6, True, g)))
    assert len(one) == 3 and [a + b for a, b in zip(*shares, strict=True)] == one


def test_ddp_loss_gradient_averages_to_the_global_batch_mean(monkeypatch):
    from ssl_eval.core import distributed
    from ssl_eval.protocols import _finetune_dist

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(4, generator=g, requires_grad=True), torch.randn(7, 4, generator=g)

    def per_sample(rows):
        return (x[rows] @ w) ** 2

    want = torch.autograd.grad(per_sample(slice(None)).mean(), w)[0]
    total = per_sample(slice(None)).detach().sum()
    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(_finetune_dist.dist, "all_reduce", lambda t: t.copy_(total))
    grads, values = [], []
    for rows in (slice(0, 3), slice(3, 7)):  # 7 rows over 2 ranks: unequal shares
        loss, value = _finetune_dist.batch_loss(per_sample(rows), 7)
        grads.append(torch.autograd.grad(loss, w)[0])
        values.append(value)
    ddp = (grads[0] + grads[1]) / 2  # DDP averages the ranks' gradients
    assert torch.allclose(ddp, want, rtol=1e-6, atol=0), (ddp, want)
    assert values[0] == values[1] == pytest.approx(float(total) / 7, rel=1e-6)


def _agree_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ssl_eval.core import distributed
    from ssl_eval.core.errors import UserError

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = []
    try:  # a corrupt image in rank 1's shard: every rank stops with its message
        distributed.agree("photo.jpg is not an image" if rank == 1 else None)
    except UserError as e:
        seen.append(str(e))

    def rank0_fails():
        raise UserError("disk full")

    try:  # what rank 0 alone does fails: every rank hears of it
        distributed.on_main(rank0_fails)
    except UserError as e:
        seen.append(str(e))
    seen.append(distributed.broadcast(f"from rank {rank}"))
    # in_rounds: 5 items, rank r computes r, r + 2 ...; every rank gets all of them, in order
    seen.append(list(distributed.in_rounds(5, (10 * i for i in range(rank, 5, 2)))))

    def mine():  # item 3, rank 1's second, is a corrupt image
        for i in range(rank, 5, 2):
            if i == 3:
                raise UserError("3.png is not an image")
            yield i

    got = []
    try:  # the round before it reaches every rank, then its error
        got.extend(distributed.in_rounds(5, mine()))
    except UserError as e:
        seen.append([got, str(e)])
    dist.destroy_process_group()
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(seen, f)


def spawn_two(worker, out) -> None:
    """Run ``worker(rank, port, str(out))`` in two processes that meet on a free local port
    (each joins the gloo group itself)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(out)), nprocs=2, join=True)


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    spawn_two(_agree_worker, tmp_path)
    for r in range(2):
        seen = json.loads((tmp_path / f"{r}.json").read_text())
        rounds = [[0, 10, 20, 30, 40], [[0, 1], "3.png is not an image"]]
        assert seen == ["photo.jpg is not an image", "disk full", "from rank 0", *rounds], (r, seen)
