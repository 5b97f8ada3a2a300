"""``ssl-eval reproduce``: run the recipe behind a published number and print ours beside it."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import add_results_dir

NAME = "reproduce"
HELP = "run the recipe of a published number (protocols/published.yaml) and compare"
ORDER = 12


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tag", help="an official backbone tag with published numbers (dinov2_vits14)")
    p.add_argument("--dataset", required=True, help="the dataset of the published number")
    p.add_argument(
        "--recipe", help="only the entry of this recipe card (default: every published recipe)"
    )
    p.add_argument("--data-root", type=Path, help="folder holding the dataset")
    p.add_argument(
        "--download", action="store_true", help="download torchvision datasets if missing"
    )
    p.add_argument(
        "--published",
        type=Path,
        help="a published-numbers file in the shipped file's schema (default: the shipped one)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    p.add_argument("--seed", type=int, default=0, help="the protocol's seed (default 0)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        help="feature cache (default $SSL_EVAL_CACHE or ~/.cache/ssl-eval)",
    )
    p.add_argument("--num-workers", type=int, help="data-loading workers")
    p.add_argument("--offline", action="store_true", help="never download weights")
    p.add_argument("--force", action="store_true", help="redo a unit already in the results store")
    p.add_argument("--no-progress", action="store_true")
    add_results_dir(p)


def run(a: argparse.Namespace) -> int:
    from ..core.distributed import launched_main
    from ..orchestrate.reproduce import ReproduceConfig, reproduce
    from ..report.published import text_table

    comps = reproduce(
        ReproduceConfig(
            tag=a.tag,
            dataset=a.dataset,
            recipe=a.recipe,
            published=a.published,
            results_dir=a.results_dir,
            cache_dir=a.cache_dir,
            data_root=a.data_root,
            download=a.download,
            device=a.device,
            batch_size=a.batch_size,
            seed=a.seed,
            offline=a.offline,
            num_workers=a.num_workers,
            progress=not a.no_progress,
            force=a.force,
        )
    )
    if launched_main():
        print(text_table(comps))
    return 0
