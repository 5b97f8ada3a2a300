"""Configuration plumbing shared by every YAML-configured object, and the run's own config.

* ``from_mapping(cls, data, where)``: the one YAML-to-dataclass loader. Nested dataclasses,
  lists of dataclasses, tuples, optionals and scalars are checked field by field; an unknown
  key is an error naming the key (with a close match), a value of the wrong type names the
  field. Protocol cards (protocols/cards.py) and trainer configs (train/config.py) both use it.
* ``parse_set`` / ``apply_set``: the one ``--set key.sub=value`` parser (values read as YAML).
* ``RunConfig``: everything ``ssl-eval run`` needs; it validates itself when built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# the evaluation's validation split, carved from train (data.splits.stratified_val_split): the
# defaults of ``ssl-eval run --val-fraction --split-seed`` and of the trainer, which leaves
# those images out of training (train/config.py)
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SPLIT_SEED = 0


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parser's multi-line message as one line: what is wrong and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def _load_yaml(text: str) -> object:
    """``yaml.safe_load``, with nesting deeper than the parser's recursion (``[[[[...``) a
    ``YAMLError`` like any other invalid YAML instead of a RecursionError."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def parse_yaml(text: str, where: str) -> object:
    try:
        return _load_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML ({yaml_problem(e)}); fix the file") from e


def read_yaml(path: Path, what: str) -> object:
    """The YAML document in ``path``; an unreadable file, text that is not UTF-8 or invalid YAML
    is a one-line UserError naming ``what``."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from e
    return parse_yaml(text, str(path))


def check_keys(data: dict, allowed, where: str) -> None:
    """Every key of ``data`` is in ``allowed``, else a UserError with the closest match."""
    allowed = set(allowed)
    for k in data:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown key {k!r}{hint}; allowed: {sorted(allowed)}")


def from_mapping(cls: type, data: object, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursively, checking keys and types."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    check_keys(data, names, where)
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def _coerce(tp: Any, v: object, where: str) -> object:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return v
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, v, where)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(a, v, where)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple or tp is tuple:
        seq = list(v) if isinstance(v, list | tuple) else [v]
        if args and args[-1] is not Ellipsis:
            if len(seq) != len(args):
                raise UserError(f"{where}: expected {len(args)} values, got {v!r}")
            return tuple(
                _coerce(a, x, f"{where}[{i}]")
                for i, (a, x) in enumerate(zip(args, seq, strict=True))
            )
        item = args[0] if args else Any
        return tuple(_coerce(item, x, f"{where}[{i}]") for i, x in enumerate(seq))
    if origin is list or tp is list:
        if not isinstance(v, list | tuple):
            raise UserError(f"{where}: expected a list, got {v!r}")
        item = args[0] if args else Any
        return [_coerce(item, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise UserError(f"{where}: expected a mapping, got {v!r}")
        return dict(v)
    return _coerce_scalar(tp, v, where)


# a number in exponent notation without a dot (1e-6, 5E+3): YAML 1.2 reads it as a float, but
# PyYAML (YAML 1.1) as a string, and Python writes small floats that way (repr(1e-06))
_EXP_FLOAT = re.compile(r"[-+]?[0-9]+[eE][-+]?[0-9]+")


def _coerce_scalar(tp: type, v: object, where: str) -> object:
    if tp is float and isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if tp is float and isinstance(v, str) and _EXP_FLOAT.fullmatch(v.strip()):
        return float(v)
    if tp is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if tp is bool and isinstance(v, bool):
        return v
    if tp is str and isinstance(v, str | int | float) and not isinstance(v, bool):
        return str(v)
    name = getattr(tp, "__name__", str(tp))
    raise UserError(f"{where}: expected {name}, got {v!r}")


def refuse_non_finite(obj: object, where: str) -> None:
    """No number in ``obj`` (a dataclass, mapping or list, at any depth) is NaN or infinite:
    YAML reads ``.nan`` and ``.inf`` as floats, and a NaN learning rate or temperature would
    train to nothing and still report a number."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list | tuple):
        items = [(f"[{i}]", v) for i, v in enumerate(obj)]
    else:
        if isinstance(obj, float) and not math.isfinite(obj):
            raise UserError(f"{where}: {obj} is not a finite number; give one")
        return
    for name, v in items:
        refuse_non_finite(v, f"{where}{'' if str(name).startswith('[') else '.'}{name}")


def parse_set(assignment: str) -> tuple[str, object]:
    """``key=value`` -> (key, value parsed as YAML); the key may be dotted (``aug.local_views``)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: use key=value, e.g. --set epochs=50")
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError as e:
        raise UserError(
            f"--set {assignment!r}: the value is not valid YAML ({yaml_problem(e)}); "
            "quote it, e.g. --set 'key=[1, 2]'"
        ) from e
    return key, value


def deep_update(base: dict, upd: dict) -> dict:
    """``base`` with ``upd`` merged in, nested dicts merged key by key."""
    out = dict(base)
    for k, v in upd.items():
        out[k] = (
            deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def apply_set(d: dict, assignment: str) -> dict:
    """``d`` with one ``a.b.c=value`` assignment applied to its nested mapping."""
    key, value = parse_set(assignment)
    node: dict = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return deep_update(d, node)


@dataclass(frozen=True)
class RunConfig:
    """Everything ``ssl-eval run`` needs; built by the CLI, read by evaluate.run(). It checks
    itself when built, so a bad combination fails before any work starts."""

    backbones: tuple[str, ...]
    datasets: tuple[str, ...]
    protocols: tuple  # of protocols.cards.ProtocolCard
    results_dir: Path = Path("results")
    cache_dir: Path | None = None
    weights: Path | None = None
    data_root: Path | None = None
    download: bool = False
    device: str = "auto"
    batch_size: int = 256
    seeds: tuple[int, ...] = (0,)
    bootstrap_resamples: int = 1000
    image_size: int | None = None
    feature_kind: str | None = None
    family: str | None = None
    arch: str | None = None
    # evaluate ckpt:DIR of an unfinished training (refused otherwise); recorded in the
    # records' load_report.training.incomplete_allowed
    allow_incomplete: bool = False
    feature_dtype: str = "float16"
    val_fraction: float = DEFAULT_VAL_FRACTION
    split_seed: int = DEFAULT_SPLIT_SEED
    force: bool = False
    offline: bool = False
    num_workers: int | None = None
    progress: bool = True
    # decode once (decode_cache.py): images decoded and resized once per dataset, split and
    # resize/crop, shared by every backbone; off by default (docs/benchmarks.md, decode cache)
    decode_cache: bool = False
    channels_last: bool = False  # accel.py: speed options of extraction, off by default
    compile: bool = False
    pin_memory: bool = False
    # a protocol that cannot apply to a backbone (fine-tuning raw pixels) is logged and left
    # out instead of refused: set by job suites, which mix baselines and trained models
    skip_inapplicable: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.backbones:
            raise UserError("name at least one --backbone")
        if not self.protocols:
            raise UserError("name at least one --protocol")
        if self.weights is not None and len(self.backbones) > 1:
            raise UserError("--weights applies to one backbone; name a single --backbone with it")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError("--val-fraction must be between 0 and 1")
        if self.image_size is not None and self.image_size < 1:
            raise UserError(
                f"--image-size must be a positive number of pixels, not {self.image_size}"
            )
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError("--num-workers must be 0 or more")
        if not self.seeds:
            raise UserError("--seed needs at least one seed")
