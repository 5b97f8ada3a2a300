"""The paired comparison of two backbones (``ssl-eval compare``): for every column both have,
the top-1 difference with a paired bootstrap interval and McNemar's test on the same test
images, paired only under the same setting."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..core.errors import UserError
from ..core.stats import mcnemar, paired_bootstrap, unpack_bits
from ..records.frame import load_frame
from ..records.schema import ResultRecord
from ..records.store import load_records
from .leaderboard import HEADLINE, build_table, difference_labels


def compare(
    results_dir: Path, a: str, b: str, seed: int = 0, allow_different_settings: bool = False
) -> list[dict]:
    """For every column both backbones have, the top-1 difference (b - a) with a paired
    bootstrap interval and McNemar's test on the same test images. Records are paired only
    under the same setting; where the two backbones ran the same protocol under different
    settings, that is an error naming what differs, unless ``allow_different_settings`` (then
    the row says so)."""
    every = load_records(results_dir)
    recs = [r for r in every if r.metric == HEADLINE]
    known = sorted({r.backbone for r in recs})
    for name in (a, b):
        if name not in known:
            other = sorted({r.metric for r in every if r.backbone == name})
            if other:  # mIoU, RMSE ...: no per-image hits to pair
                raise UserError(
                    f"backbone {name!r} has no top-1 results in {results_dir}, only "
                    f"{', '.join(other)}: compare pairs top-1 on the same test images (those "
                    "are in the leaderboard, with their 95% intervals)"
                )
            raise UserError(f"no results for backbone {name!r} in {results_dir}; have: {known}")
    table = build_table(load_frame(results_dir))

    def newest(tag: str) -> dict[tuple[str, object], ResultRecord]:
        out: dict[tuple[str, object], ResultRecord] = {}
        for r in recs:
            if r.backbone != tag:
                continue
            k = (r.column_key, r.seed if r.seed_dependent else None)
            if k not in out or (r.time, r.run_id) > (out[k].time, out[k].run_id):
                out[k] = r
        return out

    ra_all, rb_all = newest(a), newest(b)

    def partner(k: tuple[str, object], pool: dict) -> tuple | None:
        """The same setting at the same seed; a seed-independent record serves every seed."""
        col, s = k
        for kb in sorted(pool, key=str):
            if kb[0] == col and (s is None or kb[1] is None or s == kb[1]):
                return kb
        return None

    pairs, lone_a = [], []
    for ka in sorted(ra_all, key=str):
        kb = partner(ka, rb_all)
        if kb is None:
            lone_a.append(ka)
        else:
            pairs.append((ka, ra_all[ka], rb_all[kb], ""))
    paired_b = {partner(k, rb_all) for k, *_ in pairs}
    lone_b = [k for k in rb_all if k not in paired_b]
    # the same dataset and protocol under different settings
    group = {
        k: (r.dataset.get("name"), r.protocol.get("name")) for k, r in (ra_all | rb_all).items()
    }
    for ka in lone_a:
        for kb in lone_b:
            if group[ka] != group[kb] or (
                ka[1] is not None and kb[1] is not None and ka[1] != kb[1]
            ):
                continue
            diff = difference_labels(
                {ka[0]: table.col_summary[ka[0]], kb[0]: table.col_summary[kb[0]]},
                Counter({ka[0]: 1}),
            )[kb[0]]
            what = f"{group[ka][0]} / {group[ka][1]}"
            if not allow_different_settings:
                raise UserError(
                    f"{what}: {a} and {b} were run under different settings ({b} has: {diff}); "
                    "they are not comparable. Rerun one of them under the other's setting, or pass "
                    "--allow-different-settings to pair them anyway (recorded in the output)"
                )
            pairs.append((ka, ra_all[ka], rb_all[kb], diff))
    out = []
    for (col, _), ra, rb, differs in pairs:
        s = ra.seed if ra.seed_dependent else (rb.seed if rb.seed_dependent else None)
        row = {
            "column": table.col_label[col],
            "seed": s,
            "a": ra.value,
            "b": rb.value,
            "diff": rb.value - ra.value,
        }
        if differs:
            row["settings_differ"] = differs
        da, db = ra.details, rb.details
        if (
            "per_sample_correct" in da
            and "per_sample_correct" in db
            and da.get("n_test") == db.get("n_test")
        ):
            if ra.dataset.get("fingerprint") != rb.dataset.get("fingerprint"):
                raise UserError(
                    f"{row['column']}: the two backbones were evaluated on different data; cannot pair"
                )
            ca = unpack_bits(da["per_sample_correct"], da["n_test"])
            cb = unpack_bits(db["per_sample_correct"], db["n_test"])
            row |= {
                "paired_bootstrap": paired_bootstrap(ca, cb, seed=seed),
                "mcnemar": mcnemar(ca, cb),
            }
        out.append(row)
    if not out:
        raise UserError(f"{a!r} and {b!r} share no (dataset, protocol) with top-1 results")
    return out
