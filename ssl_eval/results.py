"""The result record: its schema, its builder, atomic writing and reading the store.

One record per (backbone, dataset, protocol, metric). Each evaluation unit (backbone x dataset
x protocol x seed) writes one JSON file ``<results>/records/<unit>-<run_id>.json`` in one
rename, so concurrent runs never collide and a killed run leaves either the whole file or
nothing. Readers get typed records (``ResultRecord.from_dict``), so a schema change touches
this file and its docs (results/README.md).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .config import from_mapping
from .errors import UserError
from .fsutil import _umask, atomic_write_json, sha256_json
from .provenance import code_version, machine_info, package_versions
from .runtime import warn
from .stats import bootstrap_ci, mean_ci, pack_bits

if TYPE_CHECKING:  # types only: the builder reads these objects, it does not import their layers
    from .backbones.base import Backbone
    from .data.datasets import DatasetBundle
    from .protocols.base import ProtocolOutput
    from .protocols.cards import ProtocolCard

SCHEMA_VERSION = 3  # 2: ``setting`` and ``seed_dependent``; 3: ``machine``


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


@dataclass(frozen=True)
class Unit:
    """What every record of one evaluation unit shares, besides the protocol's output."""

    key: str
    run_id: str
    seed: int
    split: dict  # val_fraction, split_seed
    sizes: dict  # train, val, test
    device: str
    feature_options: (
        dict  # dtype, and the image_size / feature_kind overrides (None: the backbone's)
    )
    seed_dependent: bool = True
    features: dict | None = (
        None  # feature cache keys, dtype and extraction seconds (frozen protocols)
    )


def build_records(
    unit: Unit,
    backbone: Backbone,
    bundle: DatasetBundle,
    card: ProtocolCard,
    output: ProtocolOutput,
    wall_s: float,
    peak_mb: float,
    bootstrap_resamples: int = 1000,
) -> list[ResultRecord]:
    """One record per metric of ``output``, each with the unit's full provenance and a 95%
    interval: the t interval over the protocol's own repetitions where it reports a spread,
    else the bootstrap over test images (whose per-image correctness top-1 keeps, packed)."""
    details = dict(output.details)
    if unit.features:
        details.update(unit.features)
    common = dict(
        schema_version=SCHEMA_VERSION,
        run_id=unit.run_id,
        time=utc_now(),
        unit=unit.key,
        backbone=backbone.tag,
        weights=backbone.weights.to_dict(),
        load_report=backbone.load_report,
        preprocessing=backbone.preprocessing.to_dict(),
        feature_kind=backbone.feature_kind,
        protocol=card.to_record(),
        dataset={
            "name": bundle.name,
            "fingerprint": bundle.fingerprint,
            "num_classes": bundle.num_classes,
            "sizes": dict(unit.sizes),
        },
        split=dict(unit.split),
        seed=unit.seed,
        wall_time_s=round(wall_s, 3),
        peak_memory_mb=round(peak_mb, 1),
        device=unit.device,
        packages=package_versions(),
        code_version=code_version(),
        seed_dependent=unit.seed_dependent,
        machine=machine_info(),
    )
    common["setting"] = make_setting(
        common["backbone"],
        common["weights"],
        common["preprocessing"],
        common["feature_kind"],
        common["protocol"],
        common["dataset"],
        common["split"],
        unit.feature_options,
    )
    records = []
    trivial_top5 = bundle.num_classes <= 5  # top-5 of 5 or fewer classes is always 100%
    if trivial_top5:
        details["top5_omitted"] = f"{bundle.num_classes} classes: top-5 is trivially 100%"
    for metric, value in output.metrics.items():
        if trivial_top5 and metric.startswith("top5"):
            continue
        ci, method, spread, extra = None, "", None, {}
        if metric in output.spread:
            m, sd, lo, hi = mean_ci(output.spread[metric])
            ci, method = [lo, hi], output.details.get("spread_over", "t-seeds")
            spread = {"mean": m, "std": sd, "n": len(output.spread[metric])}
        elif metric in output.per_sample:
            correct = output.per_sample[metric]
            ci, method = (
                list(bootstrap_ci(correct, bootstrap_resamples, unit.seed)),
                "bootstrap-test",
            )
            if metric == "top1":
                extra = {"per_sample_correct": pack_bits(correct), "n_test": len(correct)}
        records.append(
            ResultRecord(
                metric=metric,
                value=float(value),
                ci95=ci,
                ci_method=method,
                spread=spread,
                details=details | extra,
                **common,
            )
        )
    return records


def new_run_id() -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def records_dir(results_dir: Path) -> Path:
    return Path(results_dir) / "records"


def unit_done(results_dir: Path, unit: str) -> bool:
    """Whether a valid record file of ``unit`` exists; a damaged one is reported and does not
    count, so the unit is computed again."""
    for p in records_dir(results_dir).glob(f"{unit}-*.json"):
        try:
            read_unit_file(p)
            return True
        except ValueError as e:
            warn(f"{p} is damaged ({e}); its unit counts as not done and will be computed again")
    return False


def write_unit(results_dir: Path, unit: str, run_id: str, records: list[ResultRecord]) -> Path:
    path = records_dir(results_dir) / f"{unit}-{run_id}.json"
    body = [r.to_dict() for r in records]
    doc = {"schema_version": SCHEMA_VERSION, "records": body, "sha256": sha256_json(body)}
    try:
        atomic_write_json(path, doc)
    except OSError as e:  # the numbers are computed: never drop them silently
        import tempfile

        try:
            fd, rescue = tempfile.mkstemp(prefix=f"ssl-eval-unsaved-{unit}-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                os.fchmod(fd, 0o666 & ~_umask())  # a record once copied back: the umask's mode
                json.dump(doc, f, indent=2, sort_keys=True, default=str)
        except OSError:  # no disk anywhere: the numbers go to the terminal
            print(json.dumps(doc, sort_keys=True, default=str), file=sys.stderr)
            rescue = "the lines above (standard error)"
        raise UserError(
            f"cannot write the record {path} ({e.strerror or e}); its numbers are saved in {rescue}: "
            f"copy that file into {records_dir(results_dir)} once the folder is writable"
        ) from e
    return path


def read_unit_file(path: Path) -> list[ResultRecord]:
    """The records of one file, verified against the checksum it carries; any damage (bytes
    that are not UTF-8 or JSON, a wrong shape, a checksum mismatch, a newer schema) is a
    ValueError saying what."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError:  # [[[[... deeper than the decoder's recursion
        raise ValueError("not a record file (JSON nested too deeply)") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError("not a record file (expected a mapping with a 'records' list)")
    if "sha256" in data and data["sha256"] != sha256_json(data["records"]):
        raise ValueError("its content does not match its checksum")
    return [ResultRecord.from_dict(r) for r in data["records"]]


def load_records(results_dir: Path) -> list[ResultRecord]:
    """Every record under ``results_dir``, typed and verified. A file that is not a valid record
    file is skipped with a warning naming it; readers never crash on the store."""
    out = []
    for p in sorted(records_dir(results_dir).glob("*.json")):
        try:
            out.extend(read_unit_file(p))
        except ValueError as e:
            warn(f"skipping {p}: {e}")
    return out


def load_frame(results_dir: Path):
    """The store as one pandas DataFrame, one row per record file: see ``ssl_eval.frame``."""
    from .frame import load_frame as _load_frame

    return _load_frame(results_dir)
