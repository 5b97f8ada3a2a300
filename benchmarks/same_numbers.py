#!/usr/bin/env python
"""Are two results folders the same numbers? For a change that must not change behaviour (a
move of modules, a refactor): run the same suite before and after into two folders, then

    python benchmarks/same_numbers.py /tmp/before /tmp/after

Every record is matched on (backbone, dataset, protocol, metric, seed) and compared field by
field, ignoring only what records when and where it ran (run_id, time, wall_time_s,
peak_memory_mb), what names the code (code_version, the unit key, load_report.training.
trainer_source) and the paths and cache keys those change (checkpoint folder names, which hold
the trainer's hash; details.feature_cache, keyed on the source), and the details' timings. Exit 0 when every field agrees.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

IGNORED = {"run_id", "time", "wall_time_s", "peak_memory_mb", "code_version", "unit"}
CKPT = re.compile(r"[^\"' ]*/checkpoints/([A-Za-z0-9_.-]+-s\d+)-[0-9a-f]{10}")
CACHE = re.compile(r'"feature_cache": \{[^}]*\}')
SECONDS = re.compile(r'"(\w*seconds\w*|\w+_s)": (\{[^}]*\}|[0-9.eE+-]+)')


def records(folder: Path) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for f in sorted((folder / "records").glob("*.json")):
        for r in json.loads(f.read_text())["records"]:
            ds = r["dataset"]["name"] if isinstance(r["dataset"], dict) else r["dataset"]
            key = (r["backbone"], ds, r["protocol"]["name"], r["metric"], r["seed"])
            if key in out and (out[key]["time"], out[key]["run_id"]) > (r["time"], r["run_id"]):
                continue  # the newest record of a setting, as the tables read it
            out[key] = r
    return out


def comparable(field: str, value: object) -> str:
    if field == "load_report" and isinstance(value, dict):
        value = json.loads(json.dumps(value))
        training = value.get("training")
        if isinstance(training, dict):
            training.pop("trainer_source", None)
    text = CKPT.sub(r"CHECKPOINT/\1", json.dumps(value, sort_keys=True))
    if field == "details":  # timings and the cache keys the source hash changes
        text = SECONDS.sub(r'"\1": "-"', CACHE.sub('"feature_cache": "-"', text))
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    a = ap.parse_args()
    old, new = records(a.before), records(a.after)
    print(f"{len(old)} records before, {len(new)} after")
    ok = set(old) == set(new)
    if not ok:
        print(
            f"only before: {sorted(set(old) - set(new))[:5]}; only after: {sorted(set(new) - set(old))[:5]}"
        )
    differ: dict[str, list] = {}
    for key in sorted(set(old) & set(new), key=str):
        for field in (set(old[key]) | set(new[key])) - IGNORED:
            if comparable(field, old[key].get(field)) != comparable(field, new[key].get(field)):
                differ.setdefault(field, []).append(key)
    same = sum(
        old[k]["value"] == new[k]["value"] and old[k].get("ci95") == new[k].get("ci95")
        for k in set(old) & set(new)
    )
    print(f"value and interval identical: {same} of {len(set(old) & set(new))}")
    for field, keys in sorted(differ.items()):
        print(f"differs: {field} in {len(keys)} record(s), e.g. {keys[0]}")
    return 0 if ok and not differ else 1


if __name__ == "__main__":
    sys.exit(main())
