"""Run configuration and protocol cards.

A protocol card is a YAML file (name, version, type, selection split, params) validated into
frozen dataclasses: an unknown key is an error naming the key, a value of the wrong type is
an error naming the field. ``--set key=value`` overrides a param and is recorded.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .protocols import PROTOCOL_TYPES

CARD_KEYS = {"name", "version", "type", "description", "selection_split", "params"}


def cards_dir() -> Path:
    """Shipped cards: inside the installed package, or protocols/ in a source checkout."""
    here = Path(__file__).resolve().parent
    for d in (here / "_cards", here.parent / "protocols"):
        if d.is_dir():
            return d
    raise UserError("ssl-eval's protocol cards are missing from this installation; reinstall it")


def shipped_cards() -> list[str]:
    return sorted(p.stem for p in cards_dir().glob("*.yaml"))


@dataclass(frozen=True)
class ProtocolCard:
    name: str
    version: int
    type: str
    params: object  # the protocol type's frozen params dataclass
    description: str = ""
    selection_split: str = "val"
    source: str = ""
    overrides: tuple[tuple[str, object], ...] = ()

    def params_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.params).items()}

    def to_record(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "type": self.type,
            "selection_split": self.selection_split,
            "params": self.params_dict(),
            "overrides": {k: v for k, v in self.overrides},
            "source": self.source,
        }


def _coerce(cls: type, name: str, value: object, where: str) -> object:
    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        seq = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce_scalar(item, v, f"{where}.{name}") for v in seq)
    return _coerce_scalar(hint, value, f"{where}.{name}")


def _coerce_scalar(tp: type, v: object, where: str) -> object:
    if tp is float and isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    if tp is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if tp is bool and isinstance(v, bool):
        return v
    if tp is str:
        return str(v)
    raise UserError(f"{where}: expected {tp.__name__}, got {v!r}")


def _build_params(cls: type, raw: dict, where: str) -> object:
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown key {k!r}{hint}; allowed: {sorted(names)}")
    return cls(**{k: _coerce(cls, k, v, where) for k, v in raw.items()})


def parse_card(raw: object, source: str, overrides: list[str] | tuple[str, ...] = ()) -> ProtocolCard:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a protocol card must be a YAML mapping")
    for k in raw:
        if k not in CARD_KEYS:
            raise UserError(f"{source}: unknown key {k!r}; allowed: {sorted(CARD_KEYS)}")
    for k in ("name", "version", "type"):
        if k not in raw:
            raise UserError(f"{source}: missing required key {k!r}")
    if not isinstance(raw["version"], int) or isinstance(raw["version"], bool):
        raise UserError(f"{source}: version must be an integer")
    ptype = PROTOCOL_TYPES.get(str(raw["type"]))
    params = dict(raw.get("params") or {})
    applied = []
    for o in overrides:
        key, sep, value = o.partition("=")
        key = key.strip().removeprefix("params.")
        if not sep or not key:
            raise UserError(f"--set {o!r}: use key=value, e.g. --set epochs=50")
        params[key] = yaml.safe_load(value)
        applied.append((key, params[key]))
    return ProtocolCard(
        name=str(raw["name"]),
        version=raw["version"],
        type=ptype.name,
        params=_build_params(ptype.params, params, f"{source} params"),
        description=str(raw.get("description", "")),
        selection_split=str(raw.get("selection_split", "val")),
        source=source,
        overrides=tuple(applied),
    )


def load_card(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ProtocolCard:
    """``spec`` is a shipped card's name (``linear``) or a path to a YAML card."""
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"protocol card {spec} does not exist")
        source = str(path)
    else:
        path = cards_dir() / f"{spec}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(spec, shipped_cards(), n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise UserError(
                f"unknown protocol {spec!r}.{hint} Shipped: {', '.join(shipped_cards())}; "
                "or pass a path to your own card (.yaml)"
            )
        source = f"shipped:{spec}"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({e})") from e
    return parse_card(raw, source, overrides)


def load_cards(specs: list[str], overrides: list[str] | tuple[str, ...] = ()) -> tuple[ProtocolCard, ...]:
    """Load several cards and route ``--set`` overrides: ``card.key=value`` goes to that card;
    a plain ``key=value`` goes to every card whose params have ``key`` (an error if none does)."""
    plain = [load_card(s) for s in specs]
    routed: list[list[str]] = [[] for _ in specs]
    for o in overrides:
        key = o.partition("=")[0].strip()
        head, dot, rest = key.partition(".")
        targets = [i for i, c in enumerate(plain) if dot and head == c.name]
        if targets:
            o = rest + "=" + o.partition("=")[2]
        else:
            field_name = key.removeprefix("params.")
            targets = [i for i, c in enumerate(plain)
                       if field_name in {f.name for f in dataclasses.fields(c.params)}]
        if not targets:
            raise UserError(f"--set {o!r}: no selected protocol has a param {key!r} "
                            f"(protocols: {', '.join(c.name for c in plain)}); use card.key=value")
        for i in targets:
            routed[i].append(o)
    return tuple(load_card(s, r) if r else c for s, c, r in zip(specs, plain, routed, strict=True))


SUITE_KEYS = {"name", "description", "protocols"}


@dataclass(frozen=True)
class Suite:
    name: str
    protocols: tuple[str, ...]
    description: str = ""


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in (cards_dir() / "suites").glob("*.yaml"))


def load_suite(spec: str) -> Suite:
    """A named collection of protocol cards: a shipped suite's name or a YAML path."""
    path = Path(spec)
    if not (spec.endswith((".yaml", ".yml")) or path.is_file()):
        path = cards_dir() / "suites" / f"{spec}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(spec, shipped_suites(), n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise UserError(f"unknown suite {spec!r}.{hint} Shipped: {', '.join(shipped_suites())}")
    if not path.is_file():
        raise UserError(f"suite {spec} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("protocols"), list) or not raw["protocols"]:
        raise UserError(f"{path}: a suite is a mapping with a non-empty 'protocols' list")
    for k in raw:
        if k not in SUITE_KEYS:
            raise UserError(f"{path}: unknown key {k!r}; allowed: {sorted(SUITE_KEYS)}")
    return Suite(str(raw.get("name", path.stem)), tuple(map(str, raw["protocols"])), str(raw.get("description", "")))


def validate_all() -> list[str]:
    """Load every shipped card and suite (and each suite's cards); return one line per item.
    Raises UserError on the first invalid one."""
    lines = []
    for name in shipped_cards():
        c = load_card(name)
        lines.append(f"card  {name}: ok (type={c.type}, version={c.version})")
    for name in shipped_suites():
        s = load_suite(name)
        for card in s.protocols:
            load_card(card)
        lines.append(f"suite {name}: ok ({', '.join(s.protocols)})")
    return lines


@dataclass(frozen=True)
class RunConfig:
    """Everything ``ssl-eval run`` needs; built by the CLI, read by evaluate.run()."""

    backbones: tuple[str, ...]
    datasets: tuple[str, ...]
    protocols: tuple[ProtocolCard, ...]
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
    feature_dtype: str = "float16"
    val_fraction: float = 0.1
    split_seed: int = 0
    force: bool = False
    offline: bool = False
    num_workers: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)
