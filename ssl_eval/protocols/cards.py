"""Protocol cards and suites: YAML files validated into frozen dataclasses.

A card (``protocols/<name>.yaml``, shipped inside the package) names a protocol type, a
version and the type's params; ``--set key=value`` overrides a param and is recorded. The
params class validates its own ranges when the card loads, so a bad value fails before any
feature is extracted. A suite (``protocols/suites/<name>.yaml``) is a named list of cards.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path

from ..core.config import check_keys, from_mapping, parse_set, read_yaml, refuse_non_finite
from ..core.errors import UserError
from .base import PROTOCOL_TYPES, ProtocolType

CARD_KEYS = ("name", "version", "type", "description", "selection_split", "params")
SUITE_KEYS = ("name", "description", "protocols")


def cards_dir() -> Path:
    """Shipped cards: inside the installed package, or protocols/ in a source checkout."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "_cards", pkg.parent / "protocols"):
        if d.is_dir():
            return d
    raise UserError("ssl-eval's protocol cards are missing from this installation; reinstall it")


# protocols/ also holds the published numbers (protocols/published.py): data, not a card
NOT_CARDS = ("published.yaml",)


def shipped_cards() -> list[str]:
    return sorted(p.stem for p in cards_dir().glob("*.yaml") if p.name not in NOT_CARDS)


def shipped_suites() -> list[str]:
    return sorted(p.stem for p in (cards_dir() / "suites").glob("*.yaml"))


@dataclass(frozen=True)
class ProtocolCard:
    name: str
    version: int
    protocol: ProtocolType  # the resolved protocol type: what runs this card
    params: object  # the protocol type's frozen params dataclass
    description: str = ""
    selection_split: str = "val"
    source: str = ""
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def type(self) -> str:
        return self.protocol.name

    def params_dict(self) -> dict:
        """The resolved params, less each param its dataclass lists in ``NEUTRAL`` whose value
        is the neutral one: a param added to a protocol type later, whose neutral value gives
        exactly the numbers of the type before it (tested), does not change the setting of the
        cards that do not use it (their records, keys and gate rows stay what they were)."""
        neutral = getattr(type(self.params), "NEUTRAL", {})
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self.params).items()
            if not (k in neutral and _same(v, neutral[k]))
        }

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


def _same(value: object, neutral: object) -> bool:
    if isinstance(value, list | tuple) and isinstance(neutral, list | tuple):
        return list(value) == list(neutral)
    return type(value) is type(neutral) and value == neutral


def parse_card(
    raw: object, source: str, overrides: list[str] | tuple[str, ...] = ()
) -> ProtocolCard:
    """A card from its parsed YAML; ``overrides`` are ``key=value`` assignments to its params."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a protocol card must be a YAML mapping")
    check_keys(raw, CARD_KEYS, source)
    for k in ("name", "version", "type"):
        if k not in raw:
            raise UserError(f"{source}: missing required key {k!r}")
    if not isinstance(raw["version"], int) or isinstance(raw["version"], bool):
        raise UserError(f"{source}: version must be an integer")
    ptype = PROTOCOL_TYPES.get(str(raw["type"]))
    if raw.get("params") is not None and not isinstance(raw["params"], dict):
        raise UserError(
            f"{source}: params must be a mapping of name: value, not {type(raw['params']).__name__}"
        )
    for k in ("name", "description", "selection_split"):
        if k in raw and isinstance(raw[k], dict | list):
            raise UserError(f"{source}: {k} must be a single value, not a {type(raw[k]).__name__}")
    if str(raw.get("selection_split", "val")) != "val":
        raise UserError(
            f"{source}: selection_split is {raw['selection_split']!r}, but every choice a "
            "protocol makes is made on the validation split carved from train; use 'val'"
        )
    params = dict(raw.get("params") or {})
    applied = []
    for o in overrides:
        key, value = parse_set(o)
        key = key.removeprefix("params.")
        params[key] = value
        applied.append((key, value))
    typed = from_mapping(ptype.params, params, f"{source} params")
    refuse_non_finite(typed, f"{source} params")
    return ProtocolCard(
        name=str(raw["name"]),
        version=raw["version"],
        protocol=ptype,
        params=typed,
        description=str(raw.get("description", "")),
        selection_split=str(raw.get("selection_split", "val")),
        source=source,
        overrides=tuple(applied),
    )


def _resolve(
    spec: str, folder: Path, shipped: list[str], what: str, hint_own: str
) -> tuple[Path, str]:
    """(path, source) of a shipped name or a path to a YAML file."""
    path = Path(spec)
    if spec.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise UserError(f"{what} {spec} does not exist")
        return path, str(path)
    path = folder / f"{spec}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(spec, shipped, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UserError(f"unknown {what} {spec!r}.{hint} Shipped: {', '.join(shipped)}{hint_own}")
    return path, f"shipped:{spec}"


def load_card(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ProtocolCard:
    """``spec`` is a shipped card's name (``linear``) or a path to a YAML card."""
    path, source = _resolve(
        spec, cards_dir(), shipped_cards(), "protocol", "; or pass a path to your own card (.yaml)"
    )
    return parse_card(read_yaml(path, "protocol card"), source, overrides)


def load_cards(
    specs: list[str], overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ProtocolCard, ...]:
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
            targets = [
                i
                for i, c in enumerate(plain)
                if field_name in {f.name for f in dataclasses.fields(c.params)}
            ]
        if not targets:
            raise UserError(
                f"--set {o!r}: no selected protocol has a param {key!r} "
                f"(protocols: {', '.join(c.name for c in plain)}); use card.key=value"
            )
        for i in targets:
            routed[i].append(o)
    return tuple(load_card(s, r) if r else c for s, c, r in zip(specs, plain, routed, strict=True))


@dataclass(frozen=True)
class Suite:
    name: str
    protocols: tuple[str, ...]
    description: str = ""


def load_suite(spec: str) -> Suite:
    """A named collection of protocol cards: a shipped suite's name or a YAML path."""
    path, _ = _resolve(spec, cards_dir() / "suites", shipped_suites(), "suite", "")
    raw = read_yaml(path, "suite")
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("protocols"), list)
        or not raw["protocols"]
    ):
        raise UserError(f"{path}: a suite is a mapping with a non-empty 'protocols' list")
    check_keys(raw, SUITE_KEYS, str(path))
    return Suite(
        str(raw.get("name", path.stem)),
        tuple(map(str, raw["protocols"])),
        str(raw.get("description", "")),
    )


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
