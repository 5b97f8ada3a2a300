#!/usr/bin/env python
"""The suite's sizing, from commands: what each model and protocol costs, and how far each
trained model stands from the baselines on the VALIDATION split (test never read).

    python benchmarks/suite_sizing.py                                   # the default reference
    python benchmarks/suite_sizing.py --results results/reference/quick --name quick
    python benchmarks/suite_sizing.py --finetune-epochs 3,5             # + fine-tuning measured

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=ROOT / "results/reference/default")
    ap.add_argument("--name", default="default")
    ap.add_argument("--finetune-epochs", default="", help="e.g. 3,5: measure fine-tuning at each")
    ap.add_argument("--work", type=Path, default=Path("/tmp/suite-sizing"))
    a = ap.parse_args()
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
