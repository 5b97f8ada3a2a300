"""``ssl-eval compare``: difference and paired significance test between two backbones."""

from __future__ import annotations

import argparse

from ._args import add_results_dir

NAME = "compare"
HELP = "difference and paired significance test between two backbones"
ORDER = 50


def add_arguments(cp: argparse.ArgumentParser) -> None:
    cp.add_argument("a")
    cp.add_argument("b")
    cp.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cp.add_argument(
        "--allow-different-settings",
        action="store_true",
        help="pair records of one protocol run under different settings (said in the output)",
    )
    add_results_dir(cp)


def run(a: argparse.Namespace) -> int:
    from ..report.compare import compare

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
