"""The dense probes under torchrun (two gloo processes against one): the same metrics,
intervals, details and per-image scores, with the work shared out rather than repeated. Test
images go to the ranks by chunks (rank r slides over chunks r, r + W ...; each chunk batched
as one process batches it); streamed training tokens are computed one batch per rank and
round and gathered (``TokenSource.batches(shared=True)``); augmented training views (augment
dinov3) are drawn by every rank and embedded one batch per rank and round
(``OnlineViews.batches``)."""

import json

import numpy as np
import pytest
import torch
from test_eval_dist import spawn_two

SLOW_FIXTURES = ()
UNITS = ("linseg", "linseg-whole", "knnseg", "lindepth", "linseg-aug", "lindepth-aug")


def _worker(rank: int, port: int, out: str) -> None:
    from dataclasses import replace
    from pathlib import Path

    import torch.distributed as dist
    from test_dense_probes import _bundle, _inputs, _pixels, _tiny_vit

    from ssl_eval.features import tokens
    from ssl_eval.protocols.dense import augment, common
    from ssl_eval.protocols.dense_knn import KnnsegParams, run_knnseg
    from ssl_eval.protocols.dense_seg import LinsegParams, run_linseg
    from ssl_eval.protocols.depth import LindepthParams, run_lindepth

    torch.set_num_threads(1)
    out = Path(out)
    slid, loaded = [], []  # the test rows this process slid over; training rows it embedded
    embedded = []  # the augmented views this process embedded, a batch's count each
    slide, batches, embed = common.slide_predict, tokens._image_batches, augment.OnlineViews._embed

    def slide_spy(backbone, split, rows, **kw):
        slid.extend(int(r) for r in rows)
        yield from slide(backbone, split, rows, **kw)

    def batches_spy(src, cuts):
        loaded.extend(int(r) for c in cuts for r in c)
        yield from batches(src, cuts)

    def embed_spy(self, x):
        embedded.append(len(x))
        return embed(self, x)

    common.slide_predict, tokens._image_batches = slide_spy, batches_spy
    augment.OnlineViews._embed = embed_spy
    # 7 test images in chunks of 3 (batch_size 3): [0-2], [3-5], [6], an odd count
    seg, depth = _bundle(n_test=7), _bundle("depth", n_test=7)
    linseg = LinsegParams(size=0, crop=0, stride=0, samples=60, batch_size=6, warmup_samples=6,
                          examples=2, token_budget_mb=0)  # fmt: skip
    # windows (the tiny ViT takes 16x16 inputs only), with the flip averaging of the card
    lindepth = LindepthParams(size=0, mode="slide", samples=60, batch_size=6, warmup_samples=6,
                              bins=8, max_depth=4.0, sigloss_warmup_samples=6,
                              token_budget_mb=0)  # fmt: skip
    units = {
        "linseg": lambda d: run_linseg(_inp(_tiny_vit(), seg, d), linseg),
        # one batch a pass: rank 1 loads nothing, and its dropout must draw as rank 0's
        "linseg-whole": lambda d: run_linseg(
            _inp(_tiny_vit(), seg, d), replace(linseg, batch_size=24, warmup_samples=24)
        ),
        "knnseg": lambda d: run_knnseg(_inp(_pixels(), seg, d), KnnsegParams(ks=(1, 3))),
        "lindepth": lambda d: run_lindepth(_inp(_tiny_vit(), depth, d), lindepth),
        # DINOv3's training views drawn online: the ViT's class token gathered beside the grid
        "linseg-aug": lambda d: run_linseg(
            _inp(_tiny_vit(), seg, d), replace(linseg, augment="dinov3")
        ),
        # NYU's views on pixel tokens (the NYU box leaves less than the ViT's 16 px)
        "lindepth-aug": lambda d: run_lindepth(
            _inp(_pixels(), depth, d), replace(lindepth, augment="dinov3", train_crop=(12, 12))
        ),
    }

    def _inp(bb, bundle, d):
        inp = _inputs(bb, bundle, d)
        inp.batch_size = 3
        return inp

    def run(world: str) -> dict:
        got = {}
        for name, unit in units.items():
            slid.clear(), loaded.clear(), embedded.clear()
            o = unit(out / f"{world}{rank if world == 'one' else ''}" / name)
            got[name] = {
                "metrics": o.metrics,
                "intervals": {k: list(v) for k, v in (o.intervals or {}).items()},
                "details": o.details,
                "per_sample": {k: np.asarray(v).tolist() for k, v in (o.per_sample or {}).items()},
                "slid": sorted(slid),
                "loaded": len(loaded),
                "embedded": sum(embedded),
            }
        return got

    one = run("one")  # each rank a world of one
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    two = run("two")
    dist.destroy_process_group()
    (out / f"{rank}.json").write_text(json.dumps({"one": one, "two": two}, default=float))


@pytest.mark.slow
def test_two_processes_score_as_one_with_the_work_shared(tmp_path):
    spawn_two(_worker, tmp_path)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        one, two = seen[r]["one"], seen[r]["two"]
        for unit in UNITS:
            a, b = one[unit], two[unit]
            for key in ("metrics", "intervals", "details", "per_sample"):
                assert a[key] == b[key], (r, unit, key)
            assert a["slid"] == list(range(7)), (r, unit)
            # rank 0: chunks 0 and 2, rank 1: chunk 1, each image slid over once
            assert b["slid"] == ([0, 1, 2, 6] if r == 0 else [3, 4, 5]), (r, unit, b["slid"])
        assert one["linseg"]["details"]["tokens"] == "streamed"
        assert one["lindepth"]["details"]["tokens"] == "streamed"
        # streamed: every training row (24: nothing is held out), 60 samples in batches of 6,
        # passes of 4, 4 and 2 batches (+ 1 row, the size probe); across two ranks rank 0
        # embeds batches 0 and 2 of each pass, rank 1 batches 1 and 3: 30 rows each
        for unit in ("linseg", "lindepth"):
            assert one[unit]["loaded"] == 1 + 60, (r, unit)
            assert two[unit]["loaded"] == 1 + 30, (r, unit)
        # augmented: every rank draws the 60 views, each embeds its batches alone (as above)
        for unit in ("linseg-aug", "lindepth-aug"):
            assert one[unit]["details"]["tokens"] == "online", (r, unit)
            assert one[unit]["embedded"] == 60, (r, unit)
            assert two[unit]["embedded"] == 30, (r, unit)
    for unit in UNITS:  # every rank ends with the same output
        for key in ("metrics", "intervals", "details", "per_sample"):
            assert seen[0]["two"][unit][key] == seen[1]["two"][unit][key], (unit, key)
    assert len(seen[0]["two"]["linseg"]["details"]["examples"]) == 2
