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

from ssl_eval.distributed import shard
from ssl_eval.knn_search import knn_search
from ssl_eval.protocols.knn import merge_topk

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


def _launch(prefix: list[str], out, name: str) -> subprocess.CompletedProcess:
    cmd = [*prefix, "-m", "ssl_eval", *ARGS, "--results-dir", str(out / f"r{name}")]
    cmd += ["--cache-dir", str(out / f"c{name}")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaldist")
    one = _launch([sys.executable], out, "1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    two = _launch([*torchrun, "--nproc-per-node", "2"], out, "2")
    for p in (one, two):
        assert p.returncode == 0, p.stderr[-3000:]
    return out, one, two


def _records(folder) -> dict:
    recs = {}
    for f in sorted((folder / "records").glob("*.json")):
        for r in json.loads(f.read_text())["records"]:
            recs[(r["backbone"], r["protocol"]["name"], r["metric"])] = r
    return recs


def test_two_processes_write_the_records_one_process_writes(runs):
    out, _, _ = runs
    one, two = _records(out / "r1"), _records(out / "r2")
    assert one.keys() == two.keys() and len(one) >= 2 * UNITS
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


def test_each_unit_written_once_by_rank_zero(runs):
    out, _, two = runs
    assert len(list((out / "r2" / "records").glob("*.json"))) == UNITS
    assert two.stderr.count("[done]") == UNITS
    table = [ln for ln in two.stdout.splitlines() if "\tdigits\t" in ln]
    assert len(table) == UNITS, two.stdout


def test_feature_cache_entries_equal_to_the_byte(runs):
    out, _, _ = runs
    entries = sorted(p.name for p in (out / "c1" / "features").iterdir() if p.is_dir())
    assert len(entries) == 4  # 2 backbones x (train, test)
    assert entries == sorted(p.name for p in (out / "c2" / "features").iterdir() if p.is_dir())
    for e in entries:
        for f in ("features.npy", "labels.npy"):
            a = (out / "c1" / "features" / e / f).read_bytes()
            assert (out / "c2" / "features" / e / f).read_bytes() == a, f"{e}/{f}"


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
        s, i = knn_search(bank[part], queries, k, "torch")
        sims.append(s)
        idx.append(i + part.start)
    got_s, got_i = merge_topk(sims, idx, k)
    want_s, want_i = _reference(bank, queries, k)
    assert torch.equal(got_i, want_i)
    assert torch.equal(got_s, want_s)
    assert got_i[0, :5].tolist() == [5, 170, 250, 420, 599]  # the tie: lower index first


def test_shards_cover_every_item_once_in_order():
    for n in (0, 1, 7, 600):
        for w in (1, 2, 3, 8):
            covered = np.concatenate([np.arange(n)[shard(n, r, w)] for r in range(w)])
            assert covered.tolist() == list(range(n))
