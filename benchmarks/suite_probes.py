#!/usr/bin/env python
"""The default suite's ViT probes, sized and judged on the VALIDATION split (test never used to
choose; its top-1 is printed beside, for reading only).

    python benchmarks/suite_probes.py --ckpt mae=RUN/checkpoints/mae-s0-... \\
        --ckpt simclr=RUN/checkpoints/simclr-s0-...

The checkpoints are the default suite's own (``ssl-eval suite`` trains them into
``<results>/checkpoints/``). Each candidate (a protocol card with the overrides that size it
for the suite) is run with ``ssl-eval run`` on every checkpoint, on shapes at 16x16 with the
suite's split; the table gives each one's selected validation top-1 (the head the protocol
picked on validation: ``details.best_val_top1``, or the best of ``details.val_top1.*``) and its
wall seconds (the record's ``wall_time_s``).

Then MAE's standing: every method's validation top-1 under the suite's linear card, from the
committed default reference (``results/reference/default``: mean over its training runs), with
MAE's rank among the self-supervised methods, and where MAE's validation top-1 under each ViT
probe (measured here, one training run) would place it.

``--no-run`` tabulates the records a previous run left in ``--work`` (the newest per
backbone and candidate) without evaluating anything. Writes results/sizing/probes.json and
.md (generated: do not edit by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (label, card, overrides, ViTs only): the suite's own linear card, the multi-layer linear card
# (it reads a ViT's blocks: asked of the --vit checkpoints alone) and the attentive cards (patch
# tokens of a ViT, the feature map of a CNN) at budgets small enough for the suite
CANDIDATES = [
    ("linear (suite card)", "linear", [], False),
    ("linear@dinov2, 250 it", "linear@dinov2", ["iterations=250"], True),
    ("attentive@capi, 200 it, card grid", "attentive@capi", ["iterations=200", "warmup=20"], True),
    # the card's grid picked its top lr at 200 iterations: the grid moved up, one weight decay
    (
        "attentive@capi, 200 it, lr 5e-3..5e-2",
        "attentive@capi",
        ["iterations=200", "warmup=20", "lrs=[5e-3,1e-2,2e-2,5e-2]", "weight_decays=[5e-2]"],
        True,
    ),
    (
        "attentive@capi, 500 it, lr 5e-3..5e-2",
        "attentive@capi",
        ["iterations=500", "warmup=50", "lrs=[5e-3,1e-2,2e-2,5e-2]", "weight_decays=[5e-2]"],
        True,
    ),
    (
        "attentive@capi, 1000 it, lr 5e-3..5e-2",
        "attentive@capi",
        ["iterations=1000", "warmup=100", "lrs=[5e-3,1e-2,2e-2,5e-2]", "weight_decays=[5e-2]"],
        True,
    ),
    ("linear@dinov2, 1000 it", "linear@dinov2", ["iterations=1000"], True),
    ("linear@dinov2, the suite's setting", "linear@dinov2", None, True),  # default.yaml's set
    ("attentive@capi, the suite's setting", "attentive@capi", None, False),  # default.yaml's set
]
METHODS = ("simclr", "mocov3", "byol", "simsiam", "barlowtwins", "swav", "dino", "mae")


def _val(r) -> float | None:
    v = r.get("details.best_val_top1")
    if v is not None and v == v:
        return float(v)
    cols = [c for c in r.index if c.startswith("details.val_top1.")]
    vals = [float(r[c]) for c in cols if r[c] == r[c]]
    return max(vals) if vals else None


def _run(backbones: list[str], card: str, sets: list[str], results: Path) -> None:
    from ssl_eval.cli import main as cli

    args = ["run", "--backbone", ",".join(backbones), "--dataset", "shapes"]
    args += ["--image-size", "16", "--protocol", card, "--results-dir", str(results)]
    args += ["--no-progress"]
    for s in sets:
        args += ["--set", s]
    code = cli(args)
    if code != 0:
        raise SystemExit(f"ssl-eval {' '.join(args)} exited {code}")


def _weights(folder: str) -> str | None:
    """The sha256 of a trained checkpoint's weights (its sidecar), as the records carry it."""
    try:
        return json.loads((Path(folder) / "backbone.json").read_text()).get("weights_sha256")
    except (OSError, ValueError):
        return None


def _suite_set(card: str) -> list[str]:
    """The default suite's overrides of ``card`` (its ``set`` entries ``card.key=value``)."""
    from ssl_eval.orchestrate.suite import load_job_suite

    return [o.partition(".")[2] for o in load_job_suite("default").set if o.startswith(card + ".")]


def _reference_linear(ref: Path) -> dict[str, dict]:
    """Each method's validation top-1 under the suite's linear card in the reference."""
    from ssl_eval.records.frame import load_frame

    df = load_frame(ref)
    df = df[(df["protocol"] == "linear") & df["top1"].notna()]
    out: dict[str, dict] = {}
    for name, g in df.groupby("backbone"):
        vals = [v for v in (_val(r) for _, r in g.iterrows()) if v is not None]
        if vals:
            out[str(name)] = {"val_top1": sum(vals) / len(vals), "runs": len(vals)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", action="append", required=True, help="name=checkpoint folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ssl-eval-suite-probes"))
    ap.add_argument("--reference", type=Path, default=ROOT / "results/reference/default")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "results/sizing")
    ap.add_argument("--only", help="comma-separated candidate indices (default: all)")
    ap.add_argument(
        "--no-run", action="store_true", help="tabulate the records already in --work only"
    )
    ap.add_argument("--vit", default="mae", help="the ViT checkpoints' names (comma-separated)")
    a = ap.parse_args()
    from ssl_eval.records.frame import load_frame

    backbones = [f"{n}=ckpt:{p}" for n, _, p in (c.partition("=") for c in a.ckpt)]
    names = [c.partition("=")[0] for c in a.ckpt]
    picked = range(len(CANDIDATES)) if not a.only else [int(i) for i in a.only.split(",")]
    rows = []
    for i in picked:
        label, card, sets, vit_only = CANDIDATES[i]
        sets = _suite_set(card) if sets is None else sets
        results = a.work / f"c{i}"
        load0 = None if a.no_run else os.getloadavg()[0]
        vits = a.vit.split(",")
        if not a.no_run:
            _run(
                [b for b, n in zip(backbones, names, strict=True) if n in vits or not vit_only],
                card,
                sets,
                results,
            )
        df = load_frame(results)
        df = df[df["top1"].notna() & df["backbone"].isin(names)]
        # the newest record per backbone (a rerun after a code change writes new units)
        df = df.sort_values("time", kind="stable").groupby("backbone").tail(1)
        for _, r in df.iterrows():
            rows.append(
                {
                    "candidate": label,
                    "card": card,
                    "set": sets,
                    "backbone": r["backbone"],
                    "val_top1": _val(r),
                    "test_top1": float(r["top1"]),
                    "wall_s": float(r["wall_time_s"]),
                    "load_avg": None if load0 is None else round(load0, 1),
                }
            )
            print(rows[-1], flush=True)
    ref = _reference_linear(a.reference)
    methods = {m: v for m, v in ref.items() if m in METHODS}
    order = sorted(methods, key=lambda m: -methods[m]["val_top1"])
    doc = {
        "command": "python benchmarks/suite_probes.py " + " ".join(sys.argv[1:]),
        "weights": {n: _weights(p) for n, _, p in (c.partition("=") for c in a.ckpt)},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        "reference_linear_val": ref,
        "mae_rank_linear": order.index("mae") + 1 if "mae" in order else None,
        "methods": len(order),
    }
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "probes.json").write_text(json.dumps(doc, indent=1))
    (a.out_dir / "probes.md").write_text(_markdown(doc, names, methods, order))
    print((a.out_dir / "probes.md").read_text())


def _markdown(doc: dict, names: list[str], methods: dict, order: list[str]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        "# The default suite's ViT probes on validation",
        "",
        f"Generated by `{doc['command']}` ({doc['time']}); do not edit by hand. Validation",
        "top-1 (%) of the head each protocol selected on validation; test top-1 for reading only,",
        "never used to choose. Seconds: the record's `wall_time_s` (the protocol's own time:",
        "extracting features into an empty cache is not in it, reading cached tokens is), taken",
        "while other jobs loaded the 2 cores and with 1 or 2 torch threads: a guide to the",
        "relative cost of one probe's variants, not a budget figure (docs/suite.md measures that).",
        "",
        "Weights (sha256 of each checkpoint, as the records carry it): "
        + ", ".join(f"{n} `{(w or '?')[:12]}`" for n, w in doc["weights"].items())
        + ".",
        "",
        "| candidate | backbone | val top-1 | (test top-1) | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['candidate']} | {r['backbone']} | {pct(r['val_top1'])} | "
            f"({pct(r['test_top1'])}) | {r['wall_s']:.1f} |"
        )
    lines += [
        "",
        "## MAE's standing among the methods (validation top-1, %)",
        "",
        "Under the suite's linear card, from the committed default reference (mean over its",
        "training runs), the methods ranked:",
        "",
        "| rank | method | linear val top-1 | runs |",
        "|---:|---|---:|---:|",
    ]
    for i, m in enumerate(order, 1):
        lines.append(f"| {i} | {m} | {pct(methods[m]['val_top1'])} | {methods[m]['runs']} |")
    lines += ["", "Where MAE would stand under each probe measured here (one training run):", ""]
    for r in doc["rows"]:
        if r["backbone"] != "mae" or r["val_top1"] is None:
            continue
        others = [methods[m]["val_top1"] for m in order if m != "mae"]
        rank = 1 + sum(v > r["val_top1"] for v in others)
        lines.append(
            f"- {r['candidate']}: {pct(r['val_top1'])}, rank {rank} of {len(others) + 1} "
            "against the others' linear figures"
        )
    lines += [
        "",
        "Under one probe for every backbone it was measured on here (one training run):",
        "",
    ]
    for label in dict.fromkeys(r["candidate"] for r in doc["rows"]):
        got = sorted(
            (r for r in doc["rows"] if r["candidate"] == label and r["val_top1"] is not None),
            key=lambda r: -r["val_top1"],
        )
        if len(got) > 1:
            lines.append(
                f"- {label}: "
                + ", ".join(
                    f"{i}. {r['backbone']} {pct(r['val_top1'])}" for i, r in enumerate(got, 1)
                )
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
