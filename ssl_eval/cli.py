"""The ``ssl-eval`` command. argparse lives here only: each subcommand builds a config and
calls the library; no Namespace travels further."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e


def _add_results_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results"),
        help="where result records and leaderboards live (default: results/)",
    )


def cmd_run(a: argparse.Namespace) -> int:
    from .config import RunConfig
    from .data.datasets import DEFAULT_DATASET
    from .evaluate import run
    from .protocols.cards import load_cards

    names = list(a.protocol or ())
    if a.suite:
        from .protocols.cards import load_suite

        names += [p for p in load_suite(a.suite).protocols if p not in names]
    if not names:
        names = ["knn", "linear"]
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
        feature_dtype=a.feature_dtype,
        val_fraction=a.val_fraction,
        split_seed=a.split_seed,
        force=a.force,
        offline=a.offline,
        num_workers=a.num_workers,
        progress=not a.no_progress,
    )
    outcomes = run(cfg)
    done = [o for o in outcomes if o.status == "done"]
    for o in done:
        shown = "\t".join(f"{m}={o.metrics[m]:.4f}" for m in ("top1", "top5") if m in o.metrics)
        print(f"{o.backbone}\t{o.dataset}\t{o.protocol}\t{shown}")
    skipped = len(outcomes) - len(done)
    if skipped:
        print(f"({skipped} unit(s) already in {cfg.results_dir}, skipped; --force redoes them)")
    if not a.no_leaderboard:
        from .leaderboard import write_leaderboard

        csv_path, md_path = write_leaderboard(cfg.results_dir)
        print(f"leaderboard: {md_path}")
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    what = a.what
    if what in ("backbones", "all"):
        from .backbones import list_backbones

        print("backbones (name, weights, description):")
        for name, status, desc in list_backbones():
            print(f"  {name:28s} {status:34s} {desc}")
    if what in ("datasets", "all"):
        from .data.datasets import DATASETS, DEFAULT_DATASET

        print("datasets:")
        for e in DATASETS.entries():
            mark = " (default)" if e.name == DEFAULT_DATASET else ""
            print(f"  {e.name:28s} {e.obj.description}{mark}")
        for e in DATASETS.prefixes():
            print(f"  {e.name + ':<...>':28s} {e.help}")
    if what in ("protocols", "all"):
        from .protocols.cards import load_card, shipped_cards

        print("protocols (shipped cards):")
        for name in shipped_cards():
            c = load_card(name)
            print(f"  {name:28s} type={c.type} version={c.version}")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from .protocols.cards import load_card, validate_all

    for line in validate_all():
        print(line)
    for path in a.cards or ():
        c = load_card(path)
        print(f"card  {path}: ok (type={c.type}, version={c.version})")
    return 0


def cmd_suite(a: argparse.Namespace) -> int:
    from .protocols.cards import load_suite, shipped_suites

    for name in [a.name] if a.name else shipped_suites():
        s = load_suite(name)
        print(
            f"{s.name}: {', '.join(s.protocols)}"
            + (f"  - {s.description}" if s.description else "")
        )
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .leaderboard import compare

    rows = compare(
        a.results_dir, a.a, a.b, seed=a.seed, allow_different_settings=a.allow_different_settings
    )
    print(f"top-1 of {a.b} minus {a.a} (percentage points), paired on the same test images")
    for r in rows:
        seed = (
            "every seed: the setting does not depend on it"
            if r["seed"] is None
            else f"seed {r['seed']}"
        )
        line = f"{r['column']} ({seed}): {100 * r['a']:.2f} -> {100 * r['b']:.2f}, diff {100 * r['diff']:+.2f}"
        if r.get("settings_differ"):
            line += f" [SETTINGS DIFFER, paired under --allow-different-settings: {a.b} has {r['settings_differ']}]"
        if "paired_bootstrap" in r:
            pb, mc = r["paired_bootstrap"], r["mcnemar"]
            lo, hi = pb["ci95"]
            verdict = "significant" if mc["p_value"] < 0.05 else "not significant"
            line += (
                f", 95% CI [{100 * lo:+.2f}, {100 * hi:+.2f}], paired-bootstrap p={pb['p_value']:.3g}, "
                f"McNemar p={mc['p_value']:.3g} ({mc['a_only']} vs {mc['b_only']} discordant): {verdict}"
            )
        else:
            line += " (no per-image results to pair: protocol reports a spread over seeds/episodes)"
        print(line)
    return 0


def cmd_leaderboard(a: argparse.Namespace) -> int:
    from .leaderboard import write_leaderboard

    csv_path, md_path = write_leaderboard(a.results_dir, a.metric)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .train.loop import train
    from .train.resolve import dump_yaml, resolve_config

    settings = {
        "arch": a.arch,
        "dataset": a.dataset,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "seed": a.seed,
        "train_subset": a.train_subset,
        "device": a.device,
        "data_root": str(a.data_root) if a.data_root else None,
    }
    if a.lr is not None:
        settings["optim"] = {"base_lr": a.lr}
    cfg = resolve_config(a.method, a.image_size, a.config, settings, a.set or [])
    if a.print_config:
        print(dump_yaml(cfg))
        return 0
    side = train(cfg, a.out, resume=a.resume)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the first process reports
        return 0
    d = side.get("final_diagnostics", {})
    flag = "  (COLLAPSED)" if side.get("collapsed") else ""
    print(
        f"{a.out}: {cfg.method} {side['architecture']['name']} {side['epochs_done']} epochs, "
        f"loss={d.get('loss', float('nan')):.4f} knn_top1={d.get('knn_top1', float('nan')):.4f}{flag}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ssl-eval", description="Evaluate vision representations honestly."
    )
    parser.add_argument("--version", action="version", version=f"ssl-eval {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="evaluate backbones on datasets under protocols")
    r.add_argument("--backbone", type=_csv, required=True, help="comma-separated backbone names")
    r.add_argument(
        "--protocol",
        type=_csv,
        default=None,
        help="comma-separated protocol card names or YAML paths (default: knn,linear)",
    )
    r.add_argument("--suite", help="a named collection of protocols (e.g. standard, frozen)")
    r.add_argument(
        "--dataset", type=_csv, default=None, help="comma-separated datasets (default: shapes)"
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
        type=_ints,
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
    r.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])
    r.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of train held out for selection"
    )
    r.add_argument("--split-seed", type=int, default=0)
    r.add_argument(
        "--cache-dir",
        type=Path,
        help="feature cache (default $SSL_EVAL_CACHE or ~/.cache/ssl-eval)",
    )
    r.add_argument("--force", action="store_true", help="redo units already in the results store")
    r.add_argument("--offline", action="store_true", help="never download weights")
    r.add_argument("--num-workers", type=int, help="data-loading workers")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument(
        "--no-leaderboard", action="store_true", help="do not rebuild the leaderboard afterwards"
    )
    _add_results_dir(r)
    r.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list backbones, datasets or protocols")
    lst.add_argument(
        "what", nargs="?", default="all", choices=["backbones", "datasets", "protocols", "all"]
    )
    _add_results_dir(lst)
    lst.set_defaults(func=cmd_list)

    lb = sub.add_parser(
        "leaderboard", help="build leaderboard.csv and leaderboard.md from the records"
    )
    lb.add_argument("--metric", default="top1")
    _add_results_dir(lb)
    lb.set_defaults(func=cmd_leaderboard)
    v = sub.add_parser(
        "validate", help="check every shipped protocol card and suite (and given cards)"
    )
    v.add_argument("cards", nargs="*", help="extra card files to check")
    _add_results_dir(v)
    v.set_defaults(func=cmd_validate)

    su = sub.add_parser("suite", help="show the shipped suites (named collections of protocols)")
    su.add_argument("name", nargs="?")
    _add_results_dir(su)
    su.set_defaults(func=cmd_suite)

    cp = sub.add_parser(
        "compare", help="difference and paired significance test between two backbones"
    )
    cp.add_argument("a")
    cp.add_argument("b")
    cp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cp.add_argument(
        "--allow-different-settings",
        action="store_true",
        help="pair records of one protocol run under different settings (said in the output)",
    )
    _add_results_dir(cp)
    cp.set_defaults(func=cmd_compare)

    t = sub.add_parser("train", help="train a backbone with a self-supervised method")
    t.add_argument(
        "--method",
        required=True,
        help="simclr, mocov3, byol, simsiam, barlowtwins, swav, mae, dino",
    )
    t.add_argument(
        "--arch", help="architecture (default per method: cifar_resnet18 or vit_tiny_p4 at 32x32)"
    )
    t.add_argument("--dataset", help="training dataset (default shapes)")
    t.add_argument("--data-root", type=Path, help="root folder of torchvision datasets")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int, help="global batch size, split across processes")
    t.add_argument("--lr", type=float, help="base learning rate (scaled by batch/256)")
    t.add_argument("--seed", type=int)
    t.add_argument("--image-size", type=int, default=32)
    t.add_argument("--train-subset", type=int, help="train on a seeded subset of N images")
    t.add_argument("--device", help="auto, cpu, cuda (default auto)")
    t.add_argument(
        "--config", type=Path, help="YAML training config (method defaults fill the rest)"
    )
    t.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. method_cfg.temperature=0.5 or aug.local_views=4",
    )
    t.add_argument(
        "--out", type=Path, required=True, help="output folder (checkpoint + sidecar + state)"
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    t.set_defaults(func=cmd_train)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"ssl-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "ssl-eval: interrupted; completed results and cache entries are kept", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
