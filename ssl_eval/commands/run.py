"""``ssl-eval run``: evaluate backbones on datasets under protocols."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.config import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION
from ._args import add_cluster_options, add_results_dir, cluster_options, csv_list, int_list

NAME = "run"
HELP = "evaluate backbones on datasets under protocols"
ORDER = 10


def add_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument(
        "--backbone", type=csv_list, required=True, help="comma-separated backbone names"
    )
    r.add_argument(
        "--protocol",
        type=csv_list,
        default=None,
        help="comma-separated protocol card names or YAML paths (default: knn,linear)",
    )
    r.add_argument("--suite", help="a named collection of protocols (e.g. standard, frozen)")
    r.add_argument(
        "--dataset", type=csv_list, default=None, help="comma-separated datasets (default: shapes)"
    )
    r.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a protocol param (recorded)"
    )
    r.add_argument("--weights", type=Path, help="weights file for the (single) backbone")
    r.add_argument("--data-root", type=Path, help="root folder of torchvision datasets")
    r.add_argument(
        "--download", action="store_true", help="download torchvision datasets if missing"
    )
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    r.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    r.add_argument(
        "--seed",
        type=int_list,
        default=(0,),
        help="seed, or comma-separated seeds to run each (default 0)",
    )
    r.add_argument(
        "--image-size", type=int, help="evaluate at this resolution instead of the backbone's"
    )
    r.add_argument(
        "--feature-kind",
        help="override the backbone's feature kind (cls, avgpool, cls+avgpool, last:4, model)",
    )
    r.add_argument(
        "--family", help="checkpoint family for ckpt:PATH when detection should be overridden"
    )
    r.add_argument(
        "--arch",
        help="architecture of a ckpt:PATH file in its authors' own name (MoCo v3 vit_small, "
        "MAE vit_base_patch16, DINO vit_small, solo-learn resnet18 ...), for what the file does not "
        "declare; must agree with what it does (refused with tags)",
    )
    r.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="evaluate ckpt:DIR of an unfinished `ssl-eval train` run (refused otherwise; "
        "the records say so)",
    )
    r.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])
    r.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="share of train held out for selection",
    )
    r.add_argument("--split-seed", type=int, default=DEFAULT_SPLIT_SEED)
    r.add_argument(
        "--cache-dir",
        type=Path,
        help="feature cache (default $SSL_EVAL_CACHE or ~/.cache/ssl-eval)",
    )
    r.add_argument("--force", action="store_true", help="redo units already in the results store")
    r.add_argument("--offline", action="store_true", help="never download weights")
    r.add_argument("--num-workers", type=int, help="data-loading workers")
    r.add_argument(
        "--decode-cache",
        action="store_true",
        help="decode and resize each dataset split once into a uint8 memory map in the cache, "
        "shared by every backbone with the same resize/crop (same features, faster reruns)",
    )
    r.add_argument(
        "--channels-last", action="store_true", help="run extraction in channels-last layout"
    )
    r.add_argument("--compile", action="store_true", help="torch.compile the extraction forward")
    r.add_argument("--pin-memory", action="store_true", help="pinned host batches for GPU copies")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument(
        "--no-leaderboard", action="store_true", help="do not rebuild the leaderboard afterwards"
    )
    add_results_dir(r)
    add_cluster_options(r)


def run(a: argparse.Namespace) -> int:
    from ..core.config import RunConfig
    from ..core.distributed import launched_main
    from ..data.datasets import DEFAULT_DATASET
    from ..orchestrate.evaluate import run as run_units
    from ..protocols.cards import load_cards

    names = list(a.protocol or ())
    if a.suite:
        from ..protocols.cards import load_suite

        names += [p for p in load_suite(a.suite).protocols if p not in names]
    if not names:
        names = ["knn", "linear"]
    cluster = cluster_options(a)
    cards = load_cards(names, a.set or [])
    cfg = RunConfig(
        backbones=a.backbone,
        datasets=a.dataset or (DEFAULT_DATASET,),
        protocols=cards,
        results_dir=a.results_dir,
        cache_dir=a.cache_dir,
        weights=a.weights,
        data_root=a.data_root,
        download=a.download,
        device=a.device,
        batch_size=a.batch_size,
        seeds=a.seed,
        image_size=a.image_size,
        feature_kind=a.feature_kind,
        family=a.family,
        arch=a.arch,
        allow_incomplete=a.allow_incomplete,
        feature_dtype=a.feature_dtype,
        val_fraction=a.val_fraction,
        split_seed=a.split_seed,
        force=a.force,
        offline=a.offline,
        num_workers=a.num_workers,
        progress=not a.no_progress,
        decode_cache=a.decode_cache,
        channels_last=a.channels_last,
        compile=a.compile,
        pin_memory=a.pin_memory,
    )
    if cluster is not None:
        return _sweep(cfg, cluster, a.no_leaderboard)
    outcomes = run_units(cfg)
    if not launched_main():  # torchrun: rank 0 reports and builds the leaderboard
        return 0
    done = [o for o in outcomes if o.status == "done"]
    for o in done:
        shown = "\t".join(
            f"{m}={o.metrics[m]:.4f}" for m in ("top1", "top5", "miou", "rmse") if m in o.metrics
        )
        print(f"{o.backbone}\t{o.dataset}\t{o.protocol}\t{shown}")
    skipped = len(outcomes) - len(done)
    if skipped:
        print(f"({skipped} unit(s) already in {cfg.results_dir}, skipped; --force redoes them)")
    if not a.no_leaderboard:
        from ..report.leaderboard import write_leaderboard

        csv_path, md_path = write_leaderboard(cfg.results_dir)
        print(f"leaderboard: {md_path}")
    return 0


def _sweep(cfg, cluster, no_leaderboard: bool) -> int:
    """The units of ``cfg`` as jobs through ``cluster.executor`` (ssl_eval/orchestrate/sweep/)."""
    from ..orchestrate.sweep import submit_sweep
    from ..orchestrate.sweep.status import counts, format_counts, format_table

    out = submit_sweep(cfg, cluster)
    print(
        f"sweep {out.sweep}: {out.planned} unit(s) planned on {out.device}, "
        f"{len(out.submitted)} job(s) submitted"
        + (f", {len(out.busy)} earlier job(s) still queued or running" if out.busy else "")
    )
    if not cluster.wait:
        print(f"follow it with: ssl-eval status --results-dir {cfg.results_dir}")
        return 0
    print(format_table(out.states))
    print(format_counts(out.states))
    if not no_leaderboard:
        from ..report.leaderboard import write_leaderboard

        csv_path, md_path = write_leaderboard(cfg.results_dir)
        print(f"leaderboard: {md_path}")
    if counts(out.states)["failed"]:
        print(
            f"some units failed: ssl-eval status --results-dir {cfg.results_dir} shows why; "
            "the same command resubmits only the missing units"
        )
        return 1
    return 0
