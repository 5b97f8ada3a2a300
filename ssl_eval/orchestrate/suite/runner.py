"""Run a job suite: train (or reuse) every model, evaluate every backbone under every protocol,
then write the leaderboard and the report, and check against a reference baseline.

Resumable at every level: a trained model's folder is keyed by its full resolved training
config, the trainer's own source code and the library versions that train
(``train.fingerprint``): a changed recipe or a changed loss trains into a new folder, a killed
training resumes from its last epoch; evaluation units already in the results store are
skipped by the orchestrator.

``train_seeds`` N trains every model N times (training seeds seed, seed+1, ...): the runs of
one recipe share the model's label, the leaderboard shows their mean with the t interval over
runs, and a baseline written from them knows the recipe's retraining noise."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...core.errors import UserError
from ...core.files import atomic_write_text, ensure_writable_dir, sha256_json
from ...core.runtime import log
from .spec import JobSuite


@dataclass
class SuiteOptions:
    results_dir: Path
    cache_dir: Path | None = None
    device: str = "auto"
    force: bool = False
    progress: bool = True
    report: bool = True
    retrain: bool = False
    train_seeds: int = 1  # training runs per model (seeds seed, seed+1, ...)
    deterministic: bool = False  # pinned CPU kernels (train/determinism.py)
    cluster: object | None = None  # sweep.ClusterOptions: evaluate as submitit jobs (waits)


@dataclass
class SuiteOutcome:
    results_dir: Path
    timings: dict = field(default_factory=dict)
    checkpoints: dict = field(default_factory=dict)
    trained: list = field(default_factory=list)  # models trained (not reused) by this run
    units_done: int = 0
    units_skipped: int = 0
    inapplicable: list = field(default_factory=list)  # (backbone x protocol) not run, and why
    arch_protocols: dict = field(default_factory=dict)  # model -> the arch protocols it gets
    train_seeds: int = 1
    deterministic: bool = False


def _resolved_train_config(
    suite: JobSuite, model, device: str, run: int = 0, deterministic: bool = False
):
    """The model's training config for its ``run``-th training run (seed + run)."""
    from ...core.config import deep_update
    from ...train.resolve import resolve_config

    settings = deep_update(dict(suite.train_defaults), dict(model.config))
    settings.setdefault("image_size", suite.image_size)
    settings["device"] = device
    if deterministic:
        settings["deterministic"] = True
    if run:
        settings["seed"] = int(settings.get("seed", 0)) + run
    image_size = int(settings.pop("image_size"))
    return resolve_config(model.method, image_size, None, settings, [])


def _complete(folder: Path, cfg_dict: dict, trainer: dict) -> bool:
    from ...backbones.trained_format import SIDECAR

    try:
        side = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return False
    return (
        bool(side.get("complete"))
        and side.get("train_config") == cfg_dict
        and side.get("trainer") == trainer
    )


def train_models(suite: JobSuite, opt: SuiteOptions, out: SuiteOutcome) -> dict[str, list[Path]]:
    """Each model's checkpoint folders (one per training run), training those not complete
    yet. A folder's name holds the hash of the resolved config and of the trainer's
    fingerprint (its source code and library versions): what trained the weights decides
    whether they are reused, not only the recipe."""
    from ...train.checkpoint import STATE
    from ...train.fingerprint import trainer_fingerprint
    from ...train.loop import train

    if opt.train_seeds < 1:
        raise UserError(f"--train-seeds {opt.train_seeds}: train each model at least once")
    root = ensure_writable_dir(opt.results_dir / "checkpoints", "checkpoint folder")
    trainer = _sidecar_config(trainer_fingerprint())
    folders: dict[str, list[Path]] = {m.name: [] for m in suite.models}
    # resolve every config first: a bad model config fails before any training starts
    runs = [
        (m, _resolved_train_config(suite, m, opt.device, r, opt.deterministic))
        for m in suite.models
        for r in range(opt.train_seeds)
    ]
    for i, (m, cfg) in enumerate(runs, 1):
        cfg_dict = cfg.to_dict()
        key = sha256_json({"config": cfg_dict, "trainer": trainer})[:10]
        folder = root / f"{m.name}-s{cfg.seed}-{key}"
        folders[m.name].append(folder)
        if _complete(folder, _sidecar_config(cfg_dict), trainer) and not opt.retrain:
            log(f"[skip] {m.name} (seed {cfg.seed}): trained already in {folder}", "suite")
            continue
        if opt.retrain and folder.exists():
            import shutil

            shutil.rmtree(folder)
        resume = (folder / STATE).exists()
        log(
            f"training {i}/{len(runs)} {m.name} ({m.method}, seed {cfg.seed}, {cfg.epochs} epochs)"
            + (" - resuming" if resume else ""),
            "suite",
        )
        t0 = time.perf_counter()
        train(cfg, folder, resume=resume, log=lambda s, n=m.name: log(s, f"train {n}"))
        out.timings[f"train {m.name} s{cfg.seed}"] = round(time.perf_counter() - t0, 1)
        out.trained.append(f"{m.name} (seed {cfg.seed})")
    return folders


def _sidecar_config(cfg_dict: dict) -> dict:
    """The config as the sidecar stores it (JSON round trip: tuples become lists)."""
    return json.loads(json.dumps(cfg_dict))


def run_suite(suite: JobSuite, opt: SuiteOptions) -> SuiteOutcome:
    from ...core.config import RunConfig
    from ...protocols.cards import load_cards
    from ...report.leaderboard import write_leaderboard
    from ..evaluate import run

    t_all = time.perf_counter()
    if opt.cluster is not None and not opt.cluster.wait:
        raise UserError("a suite builds its tables from the evaluation's records: drop --no-wait")
    results = ensure_writable_dir(Path(opt.results_dir), "results folder")
    out = SuiteOutcome(results, train_seeds=opt.train_seeds, deterministic=opt.deterministic)
    # every card, the arch protocols' too, loaded with the suite's overrides: bad cards fail
    # before training
    names = suite.all_protocols()
    by_name = dict(zip(names, load_cards(list(names), list(suite.set)), strict=True))
    extra = _arch_extra(suite, opt.device)
    out.arch_protocols = {m: list(c) for m, c in extra.items() if c}
    t0 = time.perf_counter()
    folders = train_models(suite, opt, out)
    out.timings["training"] = round(time.perf_counter() - t0, 1)
    out.checkpoints = {k: [str(f) for f in v] for k, v in folders.items()}
    ckpts = {m.name: [f"{m.name}=ckpt:{f}" for f in folders[m.name]] for m in suite.models}
    runs = _evaluation_runs(suite, ckpts, extra)
    arch_only = suite.arch_only()
    out.inapplicable += [
        f"{b} x {p} (arch protocol; not a trained model)"
        for b in suite.baselines
        for p in arch_only
    ]
    for m, protos in extra.items():
        out.inapplicable += [
            f"{m} x {p} (arch protocol; {m}'s arch does not match {_patterns(suite, p)})"
            for p in arch_only
            if p not in protos
        ]
    t_eval = time.perf_counter()
    for label, backbones, protos, datasets in runs:
        cfg = RunConfig(
            backbones=tuple(backbones),
            datasets=datasets,
            protocols=tuple(by_name[p] for p in protos),
            results_dir=results,
            cache_dir=opt.cache_dir,
            device=opt.device,
            seeds=suite.seeds,
            image_size=suite.image_size,
            force=opt.force,
            progress=opt.progress,
            skip_inapplicable=True,
        )
        t0 = time.perf_counter()
        if opt.cluster is not None:
            _evaluate_as_sweep(cfg, opt.cluster, out)
        else:
            outcomes = run(cfg)
            out.units_done += sum(o.status == "done" for o in outcomes)
            out.units_skipped += sum(o.status == "skipped" for o in outcomes)
            out.inapplicable += [
                f"{o.backbone} x {o.protocol}" for o in outcomes if o.status == "n/a"
            ]
        out.timings[label] = round(time.perf_counter() - t0, 1)
    if len(runs) > 1:
        out.timings["evaluation, all"] = round(time.perf_counter() - t_eval, 1)
    t0 = time.perf_counter()
    # the report's findings read this run's groups from suite.json: written before the report
    # (its timings so far), and again below with the tables' and report's time
    _write_manifest(suite, out)
    write_leaderboard(results)
    if opt.report:
        try:
            from ...report import write_report
        except ImportError:  # the report package is optional in a minimal install
            write_report = None
        if write_report is not None:
            write_report(results, cache_dir=opt.cache_dir)
    out.timings["tables and report"] = round(time.perf_counter() - t0, 1)
    out.timings["total"] = round(time.perf_counter() - t_all, 1)
    _write_manifest(suite, out)
    return out


def _arch_extra(suite: JobSuite, device: str) -> dict[str, tuple[str, ...]]:
    """Each trained model's arch protocols: those whose pattern matches its resolved arch."""
    return {
        m.name: suite.arch_extra(str(_resolved_train_config(suite, m, device).arch))
        for m in suite.models
    }


def _evaluation_runs(
    suite: JobSuite, ckpts: dict[str, list[str]], extra: dict[str, tuple[str, ...]]
) -> list[tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]]:
    """(timing label, backbones, protocols, datasets) of each evaluation run: the suite-wide
    protocols on every backbone (baselines and trained models), then each distinct set of arch
    protocols on the trained models whose arch matched it, and on no other backbone, then each
    dataset of ``dataset_protocols`` under its own protocols on every backbone."""
    every = (*suite.baselines, *(b for m in suite.models for b in ckpts[m.name]))
    runs = [("evaluation", every, tuple(suite.protocols), tuple(suite.datasets))]
    for protos in dict.fromkeys(c for c in extra.values() if c):
        models = [m.name for m in suite.models if extra[m.name] == protos]
        backbones = tuple(b for m in models for b in ckpts[m])
        runs.append((f"evaluation {', '.join(protos)}", backbones, protos, suite.datasets))
    for ds, protos in suite.dataset_protocols.items():
        runs.append((f"evaluation {ds}", every, tuple(protos), (ds,)))
    return runs


def _patterns(suite: JobSuite, protocol: str) -> str:
    return " or ".join(repr(k) for k, v in suite.arch_protocols.items() if protocol in v)


def _evaluate_as_sweep(cfg, cluster, out: SuiteOutcome) -> None:
    """The evaluation as a sweep of submitit jobs (ssl_eval/orchestrate/sweep/), waited for."""
    from ..sweep import submit_sweep
    from ..sweep.status import counts

    sweep = submit_sweep(cfg, cluster)
    c = counts(sweep.states)
    if c["failed"]:
        raise UserError(
            f"{c['failed']} unit(s) of the suite failed in their jobs: `ssl-eval status "
            f"--results-dir {cfg.results_dir}` shows why; run the suite again to resubmit only "
            "the missing units"
        )
    out.units_skipped += sweep.recorded
    out.units_done += c["done"] - sweep.recorded
    out.inapplicable += sweep.inapplicable


def _write_manifest(suite: JobSuite, out: SuiteOutcome) -> None:
    """``suite.json``: which suite (and version) produced this folder, its checkpoints and the
    wall times of this run (provenance; the numbers live in the records)."""
    from dataclasses import asdict

    from ...core.provenance import code_version, device_name, machine_info

    try:
        import torch

        dev = device_name(torch.device("cpu"))
    except Exception:  # pragma: no cover - provenance only
        dev = "unknown"
    doc = {
        "suite": asdict(suite),
        "code_version": code_version(),
        "device": dev,
        "machine": machine_info(),
        "train_seeds": out.train_seeds,
        "deterministic": out.deterministic,
        "checkpoints": out.checkpoints,
        "arch_protocols": out.arch_protocols,
        "trained_this_run": out.trained,
        "units": {
            "done": out.units_done,
            "skipped": out.units_skipped,
            "not_applicable": out.inapplicable,
        },
        "timings_s": out.timings,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        atomic_write_text(out.results_dir / "suite.json", json.dumps(doc, indent=1, default=str))
    except OSError as e:
        raise UserError(f"cannot write {out.results_dir / 'suite.json'}: {e}") from e
