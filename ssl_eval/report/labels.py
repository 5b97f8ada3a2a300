"""How leaderboard settings are labelled: a column or row whose setting differs from the one
most records share is labelled with the difference (``linear [lrs=30]``, ``knn @64px``), and a
setting's full summary written as one line of ``key=value`` (the footnotes).
"""

from __future__ import annotations

from collections import Counter


def _flat(d: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, object] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _short(v: object) -> str:
    if isinstance(v, list | tuple):
        return ",".join(_short(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _describe(path: str, v: object) -> str:
    """One difference of a setting, readably: ``lrs=30``, ``@64px``, ``v1``."""
    leaf = path.rsplit(".", 1)[-1]
    if path == "features.image_size":
        if v is None:  # no --image-size: the backbone's own preprocessing
            return "native size"
        return f"@{v}px" if isinstance(v, int) else f"size {v}"
    if path == "features.feature_kind":
        return f"feature={v}"
    if path == "features.dtype":
        return str(v)
    if path == "protocol.version":
        return f"v{v}"
    if path == "split.val_fraction":
        return f"val={_short(v)}"
    if path == "weights":
        return f"weights {str(v)[:8]}"
    return f"{leaf}={_short(v)}"


def difference_labels(summaries: dict[str, dict], weights: Counter) -> dict[str, str]:
    """{key: label of how its summary differs from the reference}; the reference (the one with
    the most records, then the smallest key) gets the empty label."""
    if len(summaries) < 2:
        return {k: "" for k in summaries}
    ref = min(summaries, key=lambda k: (-weights[k], k))
    flat_ref = _flat(summaries[ref])
    labels = {}
    for k, s in summaries.items():
        if k == ref:
            labels[k] = ""
            continue
        flat = _flat(s)
        diffs = [
            _describe(p, flat.get(p))
            for p in sorted(set(flat) | set(flat_ref))
            if flat.get(p) != flat_ref.get(p)
        ]
        labels[k] = " ".join(diffs) or k[:8]
    seen = Counter(labels.values())
    return {k: (f"{v} #{k[:6]}" if v and seen[v] > 1 else v) for k, v in labels.items()}


def _summary_text(s: dict) -> str:
    return "; ".join(f"{k}={_short(v)}" for k, v in sorted(_flat(s).items()))
