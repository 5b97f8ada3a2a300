"""The extraction speed options under torchrun (2 gloo CPU processes) against one process with
the same options: ``--decode-cache`` (the decode cache entry built once, by rank 0; every rank
reads its single-process batches from the map) and ``--channels-last --pin-memory`` (pinned
memory does nothing on the CPU; channels-last runs other kernels, and changes the features'
last bits here, so an entry embedded without it is told apart by its bytes). The feature
cache entries must be the single process's to the byte, under the same key, and the records
equal. ``--compile`` is not run here: one process alone spends about 40 s in inductor on this
CPU (a manual check of 2 processes against 1 gave the same bytes)."""

import json
import sys

import numpy as np
import pytest
import torch
from test_eval_dist import (
    TORCHRUN,
    _launch,
    _records,
    assert_same_entries,
    assert_same_records,
    spawn_two,
)

from ssl_eval.features.decode_cache import DecodedSplit

SLOW_FIXTURES = ("runs",)  # module fixtures that train or start processes (conftest)

ARGS = ["run", "--backbone", "random:resnet10t", "--dataset", "digits", "--image-size", "16"]
ARGS += ["--protocol", "knn", "--feature-dtype", "float32", "--no-progress", "--no-leaderboard"]
ARGS += ["--batch-size", "100"]  # 13 train batches over 2 ranks: an odd count, the last one short
OPTIONS = {"decode": ["--decode-cache"], "channels_last": ["--channels-last", "--pin-memory"]}


@pytest.fixture(scope="module", params=list(OPTIONS))
def runs(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"accel-{request.param}")
    args = ARGS + OPTIONS[request.param]
    one = _launch([sys.executable], args, out, "1")
    two = _launch(TORCHRUN, args, out, "2")
    return request.param, out, one, two


@pytest.mark.slow
def test_feature_entries_equal_to_the_single_process_bytes(runs):
    what, out, _, _ = runs
    entries = assert_same_entries(out / "c1", out / "c2", 2)  # (train, test)
    for e in entries:
        key = json.loads((out / "c2" / "features" / e / "meta.json").read_text())["key"]
        if what == "channels_last":  # keyed as channels-last features, as one process keys them
            assert key["accel"] == {"channels_last": True}, key


@pytest.mark.slow
def test_records_equal_to_the_single_process_records(runs):
    what, out, _, _ = runs
    one, two = _records(out / "r1"), _records(out / "r2")
    assert_same_records(one, two, 2)  # knn: top1, top5
    details = next(iter(_records(out / "r2").values()))["details"]
    assert details["decode_cache"] is (what == "decode")
    assert details["accel"]["channels_last"] is (what == "channels_last")


@pytest.mark.parametrize("runs", ["decode"], indirect=True)
def test_decode_cache_entry_built_once_by_rank_zero(runs):
    _, out, _, two = runs
    folder = out / "c2" / "decoded"
    names = sorted(p.name for p in folder.iterdir())  # no temporary folders, no lock files
    assert names == sorted(p.name for p in (out / "c1" / "decoded").iterdir())
    assert len(names) == 2 and not any(n.startswith(".") for n in names), names
    for split in ("train", "test"):  # one build per split, logged by the builder
        assert two.stderr.count(f"[decode] decoded digits/{split} ") == 1, two.stderr
    assert "reusing decoded" not in two.stderr and "waiting for" not in two.stderr, two.stderr
    for n in names:
        meta = json.loads((folder / n / "meta.json").read_text())
        want = json.loads((out / "c1" / "decoded" / n / "meta.json").read_text())
        assert meta["checksums"] == want["checksums"]


def test_decoded_batches_by_number_are_the_single_process_batches(tmp_path):
    g = np.random.default_rng(0)
    images = g.integers(0, 256, size=(23, 4, 5, 3), dtype=np.uint8)
    src = DecodedSplit(images, np.zeros(23, dtype=np.int64), "k", tmp_path, cache_hit=True)
    for channels_last in (False, True):
        every = list(src.batches(5, channels_last))
        assert [len(b) for b in every] == [5, 5, 5, 5, 3]
        for world in (1, 2, 3):
            for r in range(world):
                share = list(src.batches(5, channels_last, numbers=range(r, 5, world)))
                assert len(share) == len(every[r::world])
                for got, want in zip(share, every[r::world], strict=True):
                    assert torch.equal(got, want)
                    assert got.is_contiguous(
                        memory_format=torch.channels_last
                        if channels_last
                        else torch.contiguous_format
                    )
    assert list(src.batches(5, numbers=[])) == []
    with pytest.raises(ValueError, match="beyond 23 images"):
        list(src.batches(5, numbers=[5]))


def _decode_worker(rank: int, port: int, out: str) -> None:
    from pathlib import Path

    import torch.distributed as dist

    from ssl_eval.core.errors import UserError
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.data.transforms import Preprocessing
    from ssl_eval.features import decode_cache

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bundle, pre, out = get_dataset("digits", DatasetOptions()), Preprocessing(), Path(out)
    seen = []
    try:  # a cache folder on each node's own disk: rank 1 cannot see what rank 0 built
        decode_cache.decoded_in_world(bundle, "test", pre, out / f"node{rank}", 0, False)
        seen.append(None)
    except UserError as e:
        seen.append(str(e))
    if rank == 0:  # rank 0's build fails: every rank stops with its message, none builds

        def full(*args):
            raise UserError("no room for the decode cache entry")

        decode_cache._build = full
    try:
        decode_cache.decoded_in_world(bundle, "train", pre, out / "shared", 0, False)
        seen.append(None)
    except UserError as e:
        seen.append(str(e))
    dist.destroy_process_group()
    (out / f"{rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
def test_decode_cache_failures_stop_every_rank_with_one_line(tmp_path):
    spawn_two(_decode_worker, tmp_path)
    for r in range(2):
        unseen, full = json.loads((tmp_path / f"{r}.json").read_text())
        assert unseen.startswith("rank 1 cannot read the decode cache entry "), (r, unseen)
        assert unseen.endswith("; put --cache-dir on a filesystem every node shares")
        assert "\n" not in unseen
        assert full == "no room for the decode cache entry", (r, full)
    assert len(list((tmp_path / "node0" / "decoded").iterdir())) == 1
    assert not list((tmp_path / "node1" / "decoded").iterdir())  # rank 1 built none of its own
    assert not list((tmp_path / "shared" / "decoded").iterdir())  # nor after rank 0 failed
