"""The result record: one per (backbone, dataset, protocol, metric), its schema
(``ResultRecord``, ``SCHEMA_VERSION``; documented in results/README.md) and its ``setting``, the
identity that decides which numbers are comparable (``make_setting``)."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields

from ..core.config import from_mapping
from ..core.errors import UserError
from ..core.files import sha256_json

SCHEMA_VERSION = 3  # 2: ``setting`` and ``seed_dependent``; 3: ``machine``

# metrics whose lower value is the better one (dense depth errors); they are also the metrics
# that are not fractions in [0, 1] (RMSE in metres, AbsRel a ratio that can pass 1). Every
# other metric is a fraction where higher is better (top-1, mIoU, pixel accuracy, delta1).
LOWER_IS_BETTER = frozenset({"rmse", "abs_rel"})
DENSE_HEADLINES = ("miou", "rmse")  # the leaderboard's columns beside top-1


@dataclass
class ResultRecord:
    schema_version: int
    run_id: str
    time: str
    unit: str
    backbone: str
    weights: dict
    load_report: dict
    preprocessing: dict
    feature_kind: str
    protocol: dict  # the card: name, version, type, params, overrides, source
    dataset: dict  # name, fingerprint, num_classes, sizes {train, val, test}
    split: dict  # val_fraction, split_seed
    metric: str
    value: float
    seed: int
    wall_time_s: float
    peak_memory_mb: float
    device: str
    packages: dict
    code_version: str
    ci95: list[float] | None = None  # 95% interval of ``value``
    ci_method: str = ""  # "bootstrap-test" (resampling test images) or "t-seeds" / "t-episodes"
    spread: dict | None = None  # mean/std/n over seeds or episodes where the protocol ran several
    details: dict = field(default_factory=dict)
    setting: dict = field(
        default_factory=dict
    )  # what makes two numbers comparable: see make_setting
    seed_dependent: bool = (
        True  # whether the number changes with the seed (protocol or backbone init)
    )
    # what ran it (provenance, not setting): CPU model, torch's kernel capability, CPU count;
    # empty in records of schema < 3
    machine: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ResultRecord:
        """A record from its JSON form; a missing required field or a non-mapping is a
        ValueError naming it. Fields this version does not know are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"a record must be a mapping, got {type(d).__name__}")
        version = d.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise ValueError(
                f"written by a newer ssl-eval (record schema {version}, this one reads "
                f"<= {SCHEMA_VERSION}); upgrade ssl-eval to read it"
            )
        known = {f.name for f in fields(cls) if f.init}
        missing = [
            f.name
            for f in fields(cls)
            if f.init and f.name not in d and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        try:  # every field of the right type, checked as cards are
            rec = from_mapping(cls, {k: v for k, v in d.items() if k in known}, "record")
        except UserError as e:
            raise ValueError(str(e)) from e
        if rec.setting and not (
            isinstance(rec.setting.get("summary"), dict)
            and all(isinstance(rec.setting["summary"].get(k), dict) for k in ("row", "column"))
            and all(isinstance(rec.setting.get(k), str) for k in ("hash", "row", "column"))
        ):
            raise ValueError("its setting is not of the form ssl-eval writes")
        for name in ("dataset", "protocol"):
            if not isinstance(getattr(rec, name).get("name"), str):
                raise ValueError(f"its {name} has no name")
        if not rec.setting:  # schema 1 predates the setting: derive it from what the record holds
            rec.setting = make_setting(
                rec.backbone,
                rec.weights,
                rec.preprocessing,
                rec.feature_kind,
                rec.protocol,
                rec.dataset,
                rec.split,
                {
                    "dtype": rec.details.get("feature_dtype", "float16"),
                    "image_size": "unrecorded (schema 1)",
                    "feature_kind": "unrecorded (schema 1)",
                },
            )
            rec.seed_dependent = rec.protocol.get("type") != "knn" or _random_init(rec.weights)
        return rec

    @property
    def column_key(self) -> str:
        """The protocol side of the setting (protocol, data, split, feature options)."""
        return self.setting["column"]


def _random_init(weights: dict) -> bool:
    return str(weights.get("source", "")).startswith("random-init")


def make_setting(
    backbone: str,
    weights: dict,
    preprocessing: dict,
    feature_kind: str,
    protocol: dict,
    dataset: dict,
    split: dict,
    features: dict,
) -> dict:
    """The record's ``setting``: a readable ``summary`` of everything that makes two numbers
    comparable, its ``hash``, and the hashes of its two sides.

    * column side: the protocol card (name, version, type, every resolved param, overrides
      included), the dataset (name and content fingerprint, which covers its label set), the
      split (val fraction, split seed) and the feature options the user chose (``dtype``,
      ``image_size`` and ``feature_kind`` overrides, None when the backbone's own is used);
    * row side: the backbone tag and its weights (the sha256; ``random-init`` for a seeded
      initialisation, whose seed is the replicate axis), with its own preprocessing and
      feature kind unless an override in the column side replaced them.

    Code and package versions are provenance, not setting: a newer record of the same setting
    replaces the older one in a table."""
    fp = dataset.get("fingerprint")
    if isinstance(fp, dict):  # how a folder's content was hashed is provenance, not content
        fp = {k: v for k, v in fp.items() if k != "content_hash"}
    column = {
        "protocol": {k: protocol.get(k) for k in ("name", "version", "type", "params")},
        "dataset": {
            "name": dataset.get("name"),
            "fingerprint": sha256_json(fp)[:16] if fp is not None else None,
        },
        "split": {"val_fraction": split.get("val_fraction"), "split_seed": split.get("split_seed")},
        "features": {
            "dtype": features.get("dtype"),
            "image_size": features.get("image_size"),
            "feature_kind": features.get("feature_kind"),
        },
    }
    row = {
        "backbone": backbone,
        "weights": "random-init" if _random_init(weights) else weights.get("sha256"),
    }
    if column["features"]["image_size"] is None:
        row["preprocessing"] = preprocessing
    if column["features"]["feature_kind"] is None:
        row["feature_kind"] = feature_kind
    summary = {"row": row, "column": column}
    return {
        "hash": sha256_json(summary)[:16],
        "row": sha256_json(row)[:16],
        "column": sha256_json(column)[:16],
        "summary": summary,
    }
