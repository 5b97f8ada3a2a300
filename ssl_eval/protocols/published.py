"""Published numbers as expectations: ``protocols/published.yaml`` validated into frozen
dataclasses.

Each entry pairs an official backbone tag and a dataset with the figure its authors printed
(``value``, percent, as written), where it is printed (``source``: a paper's table or a file of
the authors' repository at a commit), the recipe card that reproduces their evaluation
(``recipe``) and where that card departs from it (``note``). The file's schema is checked when
it loads; whether its cards, tags and datasets exist in this installation is checked when an
entry is run (``check_runnable``), so a file naming cards that land later still loads.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ..core.config import check_keys, from_mapping, read_yaml
from ..core.errors import UserError
from .cards import cards_dir, load_card, shipped_cards

PUBLISHED_FILE = "published.yaml"
METRICS = ("top1", "top5")
# what their figure scores: ``probe`` (default), the authors' evaluation of the frozen network,
# which the entry's card follows; ``own-head``, the network's own classifier, trained end to
# end with it (torchvision's supervised weights): no card reproduces that, the card's number
# is another evaluation of the same network, and the difference is no reproduction gap
EVALUATIONS = ("probe", "own-head")
FILE_KEYS = ("version", "datasets", "entries")
VERSION = 1


def _name(value: str, what: str, where: str) -> None:
    if not value or value != value.strip() or any(c.isspace() for c in value):
        raise UserError(f"{where}: {what} {value!r} must be a non-empty name without spaces")


def _line(value: str, what: str, where: str) -> None:
    if not value.strip():
        raise UserError(f"{where}: {what} is empty; say where the figure is printed")
    if "\n" in value.strip():
        raise UserError(f"{where}: {what} must be one line (use '>-' in YAML to fold it)")


@dataclass(frozen=True)
class DatasetHint:
    """What to download for a dataset ssl-eval cannot fetch, and where to put it (one line)."""

    download: str

    def __post_init__(self) -> None:
        _line(self.download, "download", "dataset hint")


@dataclass(frozen=True)
class PublishedEntry:
    tag: str  # a registered backbone name (an official tag)
    dataset: str  # a registered dataset name
    recipe: str  # a shipped protocol card's name
    metric: str
    value: float  # percent, as printed in the source
    source: str  # a paper's table, or repo@commit + file + table
    note: str = ""  # where the recipe departs from the authors' evaluation
    # the paper's own figure for this model and evaluation, where the paper prints one (it can
    # differ from ``value``, e.g. a repository's re-run): both given, or neither
    paper_value: float | None = None
    paper_source: str = ""  # the paper (arXiv id), its table, the row and column read
    evaluation: str = "probe"  # one of EVALUATIONS

    def __post_init__(self) -> None:
        where = f"published entry {self.tag}/{self.dataset}/{self.recipe}"
        _name(self.tag, "tag", where)
        _name(self.dataset, "dataset", where)
        _name(self.recipe, "recipe", where)
        if self.metric not in METRICS:
            raise UserError(f"{where}: metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if not (math.isfinite(self.value) and 0 < self.value <= 100):
            raise UserError(f"{where}: value {self.value} is not a percentage in (0, 100]")
        _line(self.source, "source", where)
        if self.evaluation not in EVALUATIONS:
            raise UserError(
                f"{where}: evaluation {self.evaluation!r} is not one of {', '.join(EVALUATIONS)}"
            )
        if "\n" in self.note.strip():
            raise UserError(f"{where}: note must be one line (use '>-' in YAML to fold it)")
        if (self.paper_value is None) != (not self.paper_source.strip()):
            raise UserError(f"{where}: paper_value and paper_source go together (both or neither)")
        if self.paper_value is not None:
            v = self.paper_value
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise UserError(f"{where}: paper_value {v!r} is not a number")
            if not (math.isfinite(v) and 0 < v <= 100):
                raise UserError(f"{where}: paper_value {v} is not a percentage in (0, 100]")
            _line(self.paper_source, "paper_source", where)

    @property
    def is_probe(self) -> bool:
        """Whether theirs is a probe the card follows (not the network's own classifier)."""
        return self.evaluation == "probe"

    @property
    def label(self) -> str:
        return f"{self.tag} on {self.dataset} under {self.recipe} ({self.metric})"


@dataclass(frozen=True)
class _File:
    version: int
    entries: tuple[PublishedEntry, ...]
    datasets: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Published:
    entries: tuple[PublishedEntry, ...]
    datasets: dict[str, DatasetHint]
    path: str

    def select(
        self, tag: str, dataset: str, recipe: str | None = None
    ) -> tuple[PublishedEntry, ...]:
        """The entries of ``tag`` on ``dataset`` (under ``recipe`` if given); a UserError
        listing what is published otherwise."""
        found = tuple(
            e
            for e in self.entries
            if e.tag == tag and e.dataset == dataset and recipe in (None, e.recipe)
        )
        if found:
            return found
        mine = sorted({f"{e.dataset}/{e.recipe}" for e in self.entries if e.tag == tag})
        if mine:
            have = f"published for {tag}: {', '.join(mine)}"
        else:
            tags = sorted({e.tag for e in self.entries})
            have = f"tags with published numbers: {', '.join(tags)}"
        want = f"{tag} on {dataset}" + (f" under {recipe}" if recipe else "")
        raise UserError(f"no published number for {want} in {self.path}; {have}")


def _required(cls: type, raw: object, where: str) -> None:
    """``raw`` is a mapping of ``cls``'s fields holding every one that has no default."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}")
    check_keys(raw, [f.name for f in fields(cls)], where)  # a misspelt key: "did you mean"
    need = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in need if k not in raw]
    if missing:
        raise UserError(f"{where}: missing required key(s) {', '.join(missing)}")


def published_path() -> Path:
    return cards_dir() / PUBLISHED_FILE


def load_published(path: str | Path | None = None) -> Published:
    """The published numbers of ``path`` (default: the shipped ``protocols/published.yaml``),
    schema-checked: unknown keys, wrong types, a bad metric or value, a missing source and a
    duplicate (tag, dataset, recipe, metric) are one-line UserErrors naming the file."""
    p = Path(path) if path is not None else published_path()
    if not p.is_file():
        raise UserError(f"published numbers file {p} does not exist")
    raw = read_yaml(p, "published numbers file")
    if not isinstance(raw, dict):
        raise UserError(f"{p}: expected a mapping with 'version' and 'entries'")
    check_keys(raw, FILE_KEYS, str(p))
    if "entries" not in raw or "version" not in raw:
        raise UserError(f"{p}: 'version' and 'entries' are required")
    if not isinstance(raw["entries"], list):
        raise UserError(f"{p}: entries must be a list of mappings")
    for i, e in enumerate(raw["entries"]):
        _required(PublishedEntry, e, f"{p}: entries[{i}]")
    if isinstance(raw.get("datasets"), dict):
        for name, hint in raw["datasets"].items():
            _required(DatasetHint, hint, f"{p}: datasets.{name}")
    parsed = from_mapping(_File, raw, str(p))
    if parsed.version != VERSION:
        raise UserError(f"{p}: version {parsed.version} is not {VERSION}, the one ssl-eval reads")
    hints = {}
    for name, hint in parsed.datasets.items():
        hints[str(name)] = from_mapping(DatasetHint, hint, f"{p}: datasets.{name}")
    seen: set[tuple] = set()
    for e in parsed.entries:
        key = (e.tag, e.dataset, e.recipe, e.metric)
        if key in seen:
            raise UserError(f"{p}: {e.label} is published twice; keep one entry")
        seen.add(key)
    return Published(parsed.entries, hints, str(p))


def check_runnable(entry: PublishedEntry):
    """The recipe card of ``entry``, once its card, backbone tag and dataset are known to this
    installation; a one-line UserError naming what is missing otherwise."""
    from ..backbones.catalog import get_spec
    from ..backbones.registry import BACKBONES
    from ..data.datasets import DATASETS

    if entry.recipe not in shipped_cards():
        raise UserError(
            f"{entry.label}: its recipe card {entry.recipe!r} is not shipped with this "
            f"installation (shipped: {', '.join(shipped_cards())}); update ssl-eval"
        )
    try:
        get_spec(entry.tag)  # loads every family's tags
        known = entry.tag in BACKBONES  # a registered name, not a prefix form (random:...)
    except UserError:
        known = False
    if not known:
        raise UserError(
            f"{entry.label}: backbone tag {entry.tag!r} is not registered in this installation "
            "(ssl-eval list shows the tags); update ssl-eval or fix the entry"
        )
    if entry.dataset not in DATASETS:
        raise UserError(
            f"{entry.label}: dataset {entry.dataset!r} is not registered in this installation "
            f"(registered: {', '.join(DATASETS.names())}); update ssl-eval or fix the entry"
        )
    return load_card(entry.recipe)
