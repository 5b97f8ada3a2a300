#!/usr/bin/env python
"""The suite's sizing, from commands: what each model and protocol costs, and how far each
trained model stands from the baselines on the VALIDATION split (test never read).

    python benchmarks/suite_sizing.py                                   # the default reference
    python benchmarks/suite_sizing.py --results results/reference/quick --name quick
    python benchmarks/suite_sizing.py --finetune-epochs 3,5             # + fine-tuning measured
    python benchmarks/suite_sizing.py --sweep                           # the recipe's variants

Part 1 reads a suite's results folder (records + suite.json, e.g. the committed reference):

* cost: each model's training seconds (suite.json ``timings_s``, per training run) and each
  unit's evaluation seconds (the records' ``wall_time_s``), summed per model and per protocol;
* separation on validation: for k-NN the best validation top-1 over k
  (``details.val_top1.<k>``), for linear and fine-tuning the selected head's or epoch's
  validation top-1 (``details.best_val_top1``), per model (the mean over its training runs),
  and its gap to each baseline's.

Part 2 (``--finetune-epochs 3,5``) fine-tunes the suite's SimCLR checkpoint and the random
network at each number of epochs (the suite's fine-tune card, its other overrides kept) and
reports the selected epoch's validation top-1: the suite's fine-tune budget measured at the
value it uses, not inferred from a shorter run.

Writes results/sizing/<name>.json and .md (generated: do not edit by hand).

Part 3 (``--sweep``, alone; writes results/sizing/sweep.json and .md) trains variants of the
default suite's own recipes, each changing one thing, and scores each with the suite's k-NN
card on the VALIDATION split only (train features alone are extracted: the bank is train
minus val, the queries val; the best top-1 over k, as ``_val_top1`` reads it from records):
the data generator (v1 against v2: pixels, SimCLR, supervised), the resolution (16 against 32,
with the time of one training step at each, measured in the same run), the width, SimCLR's
crop scale, learning rate, temperature, batch and epochs, BYOL and MoCo v3 with their trainer
defaults against the suite's settings, and pixels and the random network as the floor. What
each variant changed is the difference between the resolved config the trainer received
(read back from the checkpoint's sidecar) and the suite's own. ``--sweep-smoke`` runs a few
variants at tiny sizes (tests/test_sizing_sweep.py).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _val_top1(r) -> float | None:
    """The validation top-1 the protocol selected on (None where it records none)."""
    v = r.get("details.best_val_top1")
    if v is not None and v == v:
        return float(v)
    ks = [c for c in r.index if c.startswith("details.val_top1.") and c.rsplit(".", 1)[1].isdigit()]
    vals = [float(r[c]) for c in ks if r[c] == r[c]]
    return max(vals) if vals else None


def sizing(results: Path) -> dict:
    from ssl_eval.records.frame import load_frame

    f = load_frame(results)
    manifest = json.loads((results / "suite.json").read_text())
    timings = manifest.get("timings_s", {})
    train_s: dict[str, float] = {}
    for k, v in timings.items():
        if k.startswith("train "):
            name = re.sub(r" s\d+$", "", k[len("train ") :])  # "train simclr s1": run of seed 1
            train_s[name] = train_s.get(name, 0.0) + float(v)
    eval_s = f.groupby(["backbone", "protocol"])["wall_time_s"].sum()
    val: dict[str, dict[str, list[float]]] = {}
    for _, r in f.iterrows():
        if r["protocol"] in ("knn", "linear", "finetune"):
            v = _val_top1(r)
            if v is not None:
                val.setdefault(r["backbone"], {}).setdefault(r["protocol"], []).append(v)
    trained = (
        sorted(
            {
                b
                for b in f["backbone"]
                if (f[f.backbone == b]["load_report.training.recipe"].notna().any())
            }
        )
        if "load_report.training.recipe" in f.columns
        else []
    )
    baselines = sorted(set(f["backbone"]) - set(trained))
    models = {}
    for b in sorted(set(f["backbone"])):
        per = {p: sum(vs) / len(vs) for p, vs in val.get(b, {}).items()}
        gaps = {
            p: {
                base: round(100 * (per[p] - sum(val[base][p]) / len(val[base][p])), 2)
                for base in baselines
                if p in val.get(base, {})
            }
            for p in per
        }
        models[b] = {
            "trained": b in trained,
            "training_runs": int(f[f.backbone == b]["setting.row.weights"].nunique()),
            "train_s": round(train_s.get(b, 0.0), 1),
            "eval_s": {p: round(float(s), 1) for (bb, p), s in eval_s.items() if bb == b},
            "val_top1": {p: round(100 * v, 2) for p, v in per.items()},
            "val_gap_to_baselines": gaps,
        }
    per_protocol = {
        p: round(float(s), 1) for p, s in f.groupby("protocol")["wall_time_s"].sum().items()
    }
    return {
        "results": str(
            results.resolve().relative_to(ROOT)
            if results.resolve().is_relative_to(ROOT)
            else results
        ),
        "suite": manifest.get("suite", {}).get("name"),
        "suite_version": manifest.get("suite", {}).get("version"),
        "machine": manifest.get("machine"),
        "timings_s": {k: v for k, v in timings.items() if not k.startswith("train ")},
        "eval_s_per_protocol": per_protocol,
        "baselines": baselines,
        "models": models,
    }


def finetune_epochs(results: Path, epochs: list[int], cache: Path) -> list[dict]:
    """Fine-tune SimCLR (the first training run) and the random network at each E."""
    from ssl_eval.cli import main
    from ssl_eval.orchestrate.suite import load_job_suite
    from ssl_eval.records.frame import load_frame

    manifest = json.loads((results / "suite.json").read_text())
    suite = load_job_suite(manifest["suite"]["name"])
    ckpt = manifest["checkpoints"]["simclr"]
    ckpt = ckpt[0] if isinstance(ckpt, list) else ckpt
    keep = [
        s for s in suite.set if s.startswith("finetune.") and not s.startswith("finetune.epochs")
    ]
    random = next(b for b in suite.baselines if b.startswith("random:"))
    out = []
    for e in epochs:
        r = cache / f"ft{e}"
        args = ["run", "--backbone", f"simclr=ckpt:{ckpt},{random}", "--dataset", "shapes"]
        args += ["--protocol", "finetune", "--image-size", str(suite.image_size)]
        for s in (*keep, f"finetune.epochs={e}"):
            args += ["--set", s]
        args += ["--results-dir", str(r), "--cache-dir", str(cache / "cache"), "--no-progress"]
        t0 = time.perf_counter()
        if main(args) != 0:
            raise SystemExit(f"fine-tuning at {e} epochs failed")
        f = load_frame(r)
        row = {"epochs": e, "seconds": round(time.perf_counter() - t0, 1)}
        for _, x in f.iterrows():
            row[x["backbone"]] = round(100 * float(x["details.best_val_top1"]), 2)
        out.append(row)
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"] or {}
    lines = [
        f"# Sizing of suite `{doc['suite']}` v{doc['suite_version']} (generated by "
        "`python benchmarks/suite_sizing.py`; do not edit)",
        "",
        f"From `{doc['results']}`, run on {m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} CPUs, "
        f"{m.get('cpu_capability', '?')}); wall times {doc['timings_s']}.",
        "",
        "Evaluation seconds per protocol (all units): "
        + ", ".join(f"{p} {s}" for p, s in doc["eval_s_per_protocol"].items()),
        "",
        "Validation top-1 (%), the mean over training runs, and the gap to each baseline "
        "(points); test is not read.",
        "",
        "| model | runs | train s | eval s | knn | linear | finetune | gap knn | gap linear | gap finetune |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for b, x in doc["models"].items():
        v, g = x["val_top1"], x["val_gap_to_baselines"]
        gap = lambda p, g=g: " / ".join(f"{d:+.1f}" for d in g.get(p, {}).values())  # noqa: E731
        lines.append(
            f"| {b} | {x['training_runs']} | {x['train_s']} | {sum(x['eval_s'].values()):.1f} | "
            f"{v.get('knn', '')} | {v.get('linear', '')} | {v.get('finetune', '')} | "
            f"{gap('knn')} | {gap('linear')} | {gap('finetune')} |"
        )
    lines += ["", f"Gaps are against {' / '.join(doc['baselines'])}, in that order."]
    if doc.get("finetune_epochs"):
        lines += [
            "",
            "Fine-tuning measured at each number of epochs (validation top-1 of the selected epoch, %):",
            "",
            "| epochs | seconds | "
            + " | ".join(k for k in doc["finetune_epochs"][0] if k not in ("epochs", "seconds"))
            + " |",
            "|---:|---:|" + "---:|" * (len(doc["finetune_epochs"][0]) - 2),
        ]
        for row in doc["finetune_epochs"]:
            vals = [str(v) for k, v in row.items() if k not in ("epochs", "seconds")]
            lines.append(f"| {row['epochs']} | {row['seconds']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- Part 3: the sweep

SUITE = "default"
V1 = "shapes_v1"  # shapes by generator v1, registered by this script only (register_shapes)
SMOKE_DATA = "shapes_smoke"  # --sweep-smoke: 1,500 train images of generator v2


def register_shapes(name: str, generator: int, train: int | None = None, test: int | None = None):
    """Register ``name``: the ``shapes`` dataset (its seeds and label set; its sizes unless
    given) rendered by ``generator``. The fingerprint carries the generator version and the
    sizes, and the name differs from ``shapes``: no feature, unit or checkpoint of it can be
    taken for one of ``shapes``."""
    import functools

    from ssl_eval.data import datasets as D
    from ssl_eval.data import shapes as G

    if name in D.DATASETS:
        return name
    sizes = [train or D.SHAPES_TRAIN, test or D.SHAPES_TEST]

    @functools.lru_cache(maxsize=2)
    def arrays(n: int, seed: int):
        return G.generate(n, D.SHAPES_SIZE, seed, generator=generator)

    def load(_):
        tr_img, tr_lab = arrays(sizes[0], D.SHAPES_SEED)
        te_img, te_lab = arrays(sizes[1], D.SHAPES_SEED + 1)
        return D.DatasetBundle(
            name=name,
            classes=list(G.LABEL_SETS["shape"]),
            train=D.ImageSplit(tr_lab["shape"], tr_img),
            test=D.ImageSplit(te_lab["shape"], te_img),
            fingerprint={
                "generator_version": generator,
                "sizes": sizes,
                "image_size": D.SHAPES_SIZE,
                "seeds": [D.SHAPES_SEED, D.SHAPES_SEED + 1],
                "label_set": "shape",
            },
            factors={"train": dict(tr_lab), "test": dict(te_lab)},
        )

    D.DATASETS.register(name, D.DatasetSpec(name, load, f"shapes, generator v{generator}"))
    return name


def _views(d: dict, **kw) -> dict:
    """``d`` with every global view's fields in ``kw`` replaced."""
    d["aug"]["global_views"] = [{**v, **kw} for v in d["aug"]["global_views"]]
    return d


def _set(d: dict, path: str, value) -> dict:
    *head, last = path.split(".")
    node = d
    for k in head:
        node = node[k]
    node[last] = value
    return d


def _at_size(size: int):
    return lambda d: _views(_set(d, "image_size", size), size=size)


# (name, question, suite model, how the resolved config changes; None: the model as the suite
# trains it). A variant of ``"<model>:defaults"`` drops the model's own config in the suite
# (the suite's shared train_defaults and the method's trainer defaults remain).
VARIANTS = [
    ("simclr", "suite", "simclr", None),
    ("supervised", "suite", "supervised", None),
    ("simclr v1", "generator", "simclr", lambda d: _set(d, "dataset", V1)),
    ("supervised v1", "generator", "supervised", lambda d: _set(d, "dataset", V1)),
    ("simclr 32px", "resolution", "simclr", _at_size(32)),
    (
        "simclr 2x wide",
        "width",
        "simclr",
        lambda d: _set(d, "arch_kwargs", {"widths": [16, 32, 64]}),
    ),
    ("simclr crop 0.2", "simclr recipe", "simclr", lambda d: _views(d, crop_scale=[0.2, 1.0])),
    ("simclr crop 0.5", "simclr recipe", "simclr", lambda d: _views(d, crop_scale=[0.5, 1.0])),
    ("simclr lr 1e-3", "simclr recipe", "simclr", lambda d: _set(d, "optim.base_lr", 1e-3)),
    ("simclr T 0.5", "simclr recipe", "simclr", lambda d: _set(d, "method_cfg.temperature", 0.5)),
    ("simclr batch 128", "simclr recipe", "simclr", lambda d: _set(d, "batch_size", 128)),
    ("simclr 3x epochs", "simclr recipe", "simclr", lambda d: _set(d, "epochs", 3 * d["epochs"])),
    ("byol", "other methods", "byol", None),
    ("byol defaults", "other methods", "byol:defaults", None),
    ("mocov3", "other methods", "mocov3", None),
    ("mocov3 defaults", "other methods", "mocov3:defaults", None),
]
BASELINES = [  # (name, question, backbone, dataset)
    ("pixels", "floor", "pixels", "shapes"),
    ("random network", "floor", "random:cifar_resnet_tiny", "shapes"),
    ("pixels v1", "generator", "pixels", V1),
    ("random network v1", "generator", "random:cifar_resnet_tiny", V1),
]
SMOKE = ["simclr", "simclr crop 0.2", "pixels", "random network"]


def _suite_config(model: str, device: str = "cpu") -> dict:
    """The resolved training config the default suite gives ``model`` (``name:defaults``: the
    model with its own config dropped), as a plain dict."""
    from dataclasses import replace

    from ssl_eval.orchestrate.suite import load_job_suite
    from ssl_eval.orchestrate.suite.runner import _resolved_train_config

    suite = load_job_suite(SUITE)
    name, _, how = model.partition(":")
    m = next(x for x in suite.models if x.name == name)
    if how == "defaults":
        m = replace(m, config={})
    return json.loads(json.dumps(_resolved_train_config(suite, m, device).to_dict()))


def _train_config(d: dict):
    """A TrainConfig from a config dict, checked as every training config is."""
    from ssl_eval.core.config import from_mapping, refuse_non_finite
    from ssl_eval.train.config import TrainConfig
    from ssl_eval.train.resolve import get_method

    cfg = from_mapping(TrainConfig, d, "sweep train config")
    refuse_non_finite(cfg, "sweep train config")
    get_method(cfg.method).make_config(cfg.method_cfg)
    return cfg


def _flat(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        return {k: v for key, x in d.items() for k, v in _flat(x, f"{prefix}{key}.").items()}
    if isinstance(d, list) and d and isinstance(d[0], dict):
        return {k: v for i, x in enumerate(d) for k, v in _flat(x, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): d}


def config_diff(base: dict, other: dict) -> list[str]:
    """``path: old -> new`` for each leaf that differs (views' identical changes merged)."""
    a, b = _flat(base), _flat(other)
    seen: dict[str, str] = {}
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            key = re.sub(r"\.\d+\.", ".*.", k)  # aug.global_views.0.size -> aug.global_views.*.size
            seen.setdefault(f"{key}: {a.get(k)} -> {b.get(k)}", k)
    return list(seen)


def val_knn(backbone: str, dataset: str, image_size: int, cache: Path) -> dict:
    """The suite's k-NN card (its ``set`` overrides applied) on the validation split only:
    features of the train split alone; bank = train minus val, queries = val; the best
    top-1 over the card's k. The test split is never extracted nor scored."""
    import numpy as np
    import torch

    from ssl_eval.backbones.base import BuildOptions
    from ssl_eval.backbones.catalog import build_backbone
    from ssl_eval.core.config import DEFAULT_SPLIT_SEED, DEFAULT_VAL_FRACTION
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.data.splits import stratified_val_split
    from ssl_eval.features.extraction import extract
    from ssl_eval.features.stream import FeatureRows
    from ssl_eval.orchestrate.suite import load_job_suite
    from ssl_eval.protocols import knn as K
    from ssl_eval.protocols.cards import load_cards

    suite = load_job_suite(SUITE)
    card = load_cards(["knn"], [s for s in suite.set if s.startswith("knn.")])[0]
    bundle = get_dataset(dataset, DatasetOptions())
    tr, va = stratified_val_split(bundle.train.labels, DEFAULT_VAL_FRACTION, DEFAULT_SPLIT_SEED)
    bb = build_backbone(backbone, BuildOptions(image_size=image_size, seed=suite.seeds[0]))
    fs = extract(bb, bundle, "train", cache_dir=cache, device=torch.device("cpu"), progress=False)
    # run_knn's own selection step (its bank, vote and search kernel), without the test pass
    p, dev = card.params, torch.device("cpu")
    ks = tuple(sorted(set(p.ks)))
    y = torch.from_numpy(np.asarray(fs.labels))
    top1, _ = K._hits(
        FeatureRows(fs.features, tr, dev),
        y[torch.from_numpy(tr)],
        FeatureRows(fs.features, va, dev),
        y[torch.from_numpy(va)],
        ks,
        p,
        bundle.num_classes,
        K.resolve_backend(p.backend, dev),
        [],
    )
    val = {k: round(100 * int(h.sum()) / len(va), 2) for k, h in top1.items()}
    return {"val_top1": max(val.values()), "val_top1_by_k": val, "val_images": len(va)}


def time_steps(cfgs: dict, steps: int = 20, warmup: int = 3) -> dict:
    """Median wall time of one training step (views, forward, backward, optimiser step, as the
    loop does) of each config, after ``warmup`` steps; configs interleaved step by step, so a
    change of load hits all alike."""
    import statistics

    import numpy as np
    import torch

    from ssl_eval.backbones.archs import build_arch
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from ssl_eval.train.augment import make_views, step_generator
    from ssl_eval.train.data import _stack
    from ssl_eval.train.methods import METHODS
    from ssl_eval.train.optim import build_optimizer

    runs = {}
    for name, d in cfgs.items():
        cfg = _train_config(d)
        spec = METHODS.get(cfg.method)
        torch.manual_seed(cfg.seed)
        m = spec.cls(
            build_arch(cfg.arch or spec.default_arch, cfg.arch_kwargs),
            spec.make_config(cfg.method_cfg),
        )
        b = get_dataset(cfg.dataset, DatasetOptions())
        x = _stack(b.train, np.arange(cfg.batch_size), cfg.image_size)
        runs[name] = (cfg, m.train(), build_optimizer(m, cfg.optim), x, [])
    for i in range(warmup + steps):
        for cfg, m, opt, x, times in runs.values():
            t0 = time.perf_counter()
            views = make_views(
                x, cfg.aug, step_generator(cfg.seed, 0, i), IMAGENET_MEAN, IMAGENET_STD
            )
            m.rng = step_generator(cfg.seed, 0, i, stream=1)
            loss = m(views, 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            m.before_step(0.0)
            opt.step()
            m.after_step(0.0)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    out = {}
    for name, (cfg, *_, times) in runs.items():
        ms = 1000 * statistics.median(times)
        out[name] = {
            "image_size": cfg.image_size,
            "batch_size": cfg.batch_size,
            "steps": len(times),
            "ms_per_step": round(ms, 1),
            "images_per_s": round(cfg.batch_size / ms * 1000),
        }
    return out


def _machine(t: str) -> dict:
    import os

    import torch

    from ssl_eval.core.provenance import cpu_model

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        f"loadavg_{t}": os.getloadavg(),
    }


def sweep(work: Path, smoke: bool = False, only: list[str] | None = None, threads: int = 0) -> dict:
    """Train and score every variant (``smoke``: SMOKE only, at tiny sizes) with ``threads``
    torch threads (0: torch's default, as the suite runs)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _sweep(work, smoke, only)
    finally:
        torch.set_num_threads(before)


def _sweep(work: Path, smoke: bool, only: list[str] | None) -> dict:
    import os
    import shutil

    from ssl_eval.core.provenance import code_version
    from ssl_eval.data.datasets import DatasetOptions, get_dataset
    from ssl_eval.train.loop import train

    t_all = time.perf_counter()
    register_shapes(V1, 1)
    machine = _machine("start")
    names = only or (SMOKE if smoke else None)
    todo = [v for v in VARIANTS if names is None or v[0] in names]
    bases = [b for b in BASELINES if names is None or b[0] in names]
    shrink = {}
    if smoke:
        shrink = {"dataset": register_shapes(SMOKE_DATA, 2, 1500, 10), "train_subset": 512}
        shrink |= {"epochs": 1, "batch_size": 128}
        bases = [(n, q, b, SMOKE_DATA if ds == "shapes" else ds) for n, q, b, ds in bases]
    cache = work / "cache"
    for ds in {shrink.get("dataset", "shapes"), *(b[3] for b in bases)} | (
        {V1} if any(" v1" in v[0] for v in todo) else set()
    ):
        get_dataset(ds, DatasetOptions())  # generated once, before any training is timed
    rows = []
    resolved = {}
    for name, question, model, change in todo:
        ref = {**_suite_config(model.partition(":")[0]), **shrink}
        d = {**_suite_config(model), **shrink}
        d = change(json.loads(json.dumps(d))) if change else d
        cfg = _train_config(d)
        folder = work / "checkpoints" / re.sub(r"[^a-z0-9]+", "-", name)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"[sweep] training {name} ({cfg.method}, {cfg.epochs} epochs)", flush=True)
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        side = train(cfg, folder, log=lambda s: None)
        secs = round(time.perf_counter() - t0, 1)
        load = [round(load0, 2), round(os.getloadavg()[0], 2)]
        got = json.loads(json.dumps(side["train_config"]))
        resolved[name] = got
        score = val_knn(f"ckpt:{folder}", cfg.dataset, cfg.image_size, cache)
        rows.append(
            {
                "variant": name,
                "question": question,
                "method": cfg.method,
                "dataset": cfg.dataset,
                "image_size": cfg.image_size,
                "changed": config_diff(ref, got) or ["none: the suite's recipe"],
                "train_s": secs,
                "loadavg_1m": load,  # at the training's start and end: was the CPU shared?
                **score,
            }
        )
        print(f"[sweep] {name}: {secs} s, val top-1 {score['val_top1']}", flush=True)
    suite_size = _suite_config("simclr")["image_size"]
    for name, question, backbone, dataset in bases:
        score = val_knn(backbone, dataset, suite_size, cache)
        rows.append(
            {
                "variant": name,
                "question": question,
                "method": backbone,
                "dataset": dataset,
                "image_size": suite_size,
                "changed": ["no training"],
                "train_s": 0.0,
                **score,
            }
        )
        print(f"[sweep] {name}: val top-1 {score['val_top1']}", flush=True)
    base = {**_suite_config("simclr"), **shrink}
    timing = time_steps(
        {f"{s}px": _at_size(s)(json.loads(json.dumps(base))) for s in (16, 32)},
        steps=3 if smoke else 20,
        warmup=1 if smoke else 3,
    )
    machine.update(_machine("end"))
    return {
        "suite": SUITE,
        "smoke": smoke,
        "code_version": code_version(),
        "machine": machine,
        "wall_s": round(time.perf_counter() - t_all, 1),
        "split": "validation (train minus val is the bank; test never read)",
        "rows": rows,
        "step_time": timing,
        "resolved_configs": resolved,
    }


def sweep_markdown(doc: dict) -> str:
    m = doc["machine"]
    cmd = doc.get("command") or "python benchmarks/suite_sizing.py --sweep" + (
        "-smoke" if doc["smoke"] else ""
    )
    lines = [
        f"# Sizing sweep of suite `{doc['suite']}` (generated by `{cmd}`; do not edit)",
        "",
        f"Run on {m['cpu_model']} ({m['cores']} cores; torch threads: {m['torch_threads']}), load average (1, 5, 15 min) "
        f"{tuple(round(x, 2) for x in m['loadavg_start'])} at start and "
        f"{tuple(round(x, 2) for x in m['loadavg_end'])} at end; code {doc['code_version']}; "
        f"{doc['wall_s']} s in all.",
        "",
        "Each variant trains the suite's own recipe with one change (read back from the "
        "checkpoint's resolved config, against the suite's config of that model) and is scored "
        "by the suite's k-NN card on the **validation** split "
        f"({doc['rows'][0]['val_images']:,} images carved from train; bank = train minus val; "
        "best top-1 over k); test is never read. One training run per variant (the suite's "
        "seed): a difference of a few points may be retraining noise; train seconds and step "
        "times depend on the load average recorded beside them.",
        "",
        "| variant | question | data | px | what changed | train s | load (1 min) | "
        "val k-NN top-1 (%) |",
        "|---|---|---|---:|---|---:|---|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['variant']} | {r['question']} | {r['dataset']} | {r['image_size']} | "
            f"{'; '.join(r['changed'])} | {r['train_s']} | "
            f"{' -> '.join(map(str, r.get('loadavg_1m', []))) or '-'} | {r['val_top1']} |"
        )
    lines += [
        "",
        "One SimCLR training step (the suite's recipe, at each size; median of "
        f"{next(iter(doc['step_time'].values()))['steps']} steps after warm-up, interleaved, "
        "same run):",
        "",
        "| size | batch | ms / step | images / s |",
        "|---|---:|---:|---:|",
    ]
    for k, t in doc["step_time"].items():
        lines.append(f"| {k} | {t['batch_size']} | {t['ms_per_step']} | {t['images_per_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=ROOT / "results/reference/default")
    ap.add_argument("--name", default="default")
    ap.add_argument("--finetune-epochs", default="", help="e.g. 3,5: measure fine-tuning at each")
    ap.add_argument("--work", type=Path, default=Path("/tmp/suite-sizing"))
    ap.add_argument("--sweep", action="store_true", help="Part 3: train the recipe's variants")
    ap.add_argument("--sweep-smoke", action="store_true", help="Part 3 at tiny sizes (tests)")
    ap.add_argument("--only", default="", help="comma-separated variant names (sweep)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "sizing")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the sweep (default: torch's own, as the suite; 1 with "
        "--sweep-smoke: on a busy 2-core machine two threads can run ten times slower)",
    )
    a = ap.parse_args()
    if a.sweep or a.sweep_smoke:
        only = [x.strip() for x in a.only.split(",") if x.strip()] or None
        threads = a.threads if a.threads is not None else (1 if a.sweep_smoke else 0)
        work = a.work / ("sweep-smoke" if a.sweep_smoke else "sweep")
        doc = sweep(work, a.sweep_smoke, only, threads)
        doc["command"] = " ".join(["python benchmarks/suite_sizing.py", *sys.argv[1:]])
        name = "sweep-smoke" if a.sweep_smoke else "sweep"
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
        md = sweep_markdown(doc)
        (a.out / f"{name}.md").write_text(md)
        print(md)
        return
    doc = sizing(a.results)
    if a.finetune_epochs:
        doc["finetune_epochs"] = finetune_epochs(
            a.results, [int(x) for x in a.finetune_epochs.split(",")], a.work
        )
    out = ROOT / "results" / "sizing" / f"{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=lambda x: None if x != x else x) + "\n")
    md = markdown(doc)
    out.with_suffix(".md").write_text(md)
    print(md)
    assert not any(
        isinstance(v, float) and math.isnan(v) for v in doc["eval_s_per_protocol"].values()
    )


if __name__ == "__main__":
    main()
