"""Job suites: YAML validated into frozen dataclasses by the one loader (``ssl_eval.core.config``).

A job suite declares everything its numbers depend on: the evaluation dataset(s) and image size,
the baselines, the protocols (with card overrides), and each trained model's method and
training config (defaults shared by all models, deep-merged with each model's own ``config``).
Its ``version`` is recorded with the run, so a changed suite is told apart.

``protocols`` apply to every backbone; ``arch_protocols`` maps a pattern of training
architectures (fnmatch, e.g. ``vit_*``) to protocols evaluated on the trained models whose
resolved ``arch`` matches it, and on no other backbone: a protocol that only fits some
architectures (a multi-layer probe reads a ViT's blocks) is asked of those alone.
``dataset_protocols`` maps a dataset to the protocols evaluated on it alone, on every backbone:
a dense dataset (``shapes-seg``) is scored by its per-pixel probes, never by the image-level
protocols of ``datasets``."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from ...core.config import from_mapping, read_yaml
from ...core.errors import UserError
from ...protocols.cards import _resolve, cards_dir


@dataclass(frozen=True)
class TrainedModel:
    name: str  # the label in tables: simclr, simclr-no-jitter, ...
    method: str  # a trainer method (simclr, ..., supervised)
    config: dict = field(default_factory=dict)  # deep-merged over the suite's train defaults
    description: str = ""
    groups: tuple[str, ...] = ()  # e.g. ("methods",), ("ablation",): how the report groups it


@dataclass(frozen=True)
class JobSuite:
    name: str
    version: int
    description: str = ""
    datasets: tuple[str, ...] = ("shapes",)
    image_size: int = 32
    seeds: tuple[int, ...] = (0,)
    baselines: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ("knn", "linear")
    set: tuple[str, ...] = ()  # protocol card overrides, as ``run --set``
    train_defaults: dict = field(default_factory=dict)  # a TrainConfig mapping (partial)
    models: tuple[TrainedModel, ...] = ()
    budget_s: float | None = None  # the wall time the suite is sized for (measured, not enforced)
    # {arch pattern: [protocols]}: evaluated on the trained models of a matching arch only
    arch_protocols: dict = field(default_factory=dict)
    # {dataset: [protocols]}: evaluated on that dataset alone, on every backbone
    dataset_protocols: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version < 1:
            raise UserError(f"suite {self.name}: version must be at least 1")
        if not self.baselines and not self.models:
            raise UserError(f"suite {self.name}: name at least one baseline or trained model")
        if not self.protocols:
            raise UserError(f"suite {self.name}: name at least one protocol")
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"suite {self.name}: model names must be unique; repeated: {dup}")
        for n in names:
            if not n.replace("-", "").replace("_", "").isalnum():
                raise UserError(
                    f"suite {self.name}: model name {n!r} may hold only letters, digits, - and _"
                )
        self._check_mapping("arch_protocols", "an arch pattern", "{'vit_*': [attentive@capi]}")
        for pattern, cards in self.arch_protocols.items():
            both = sorted(set(cards) & set(self.protocols))
            if both:
                raise UserError(
                    f"suite {self.name}: {both} is in protocols (every backbone) and in "
                    f"arch_protocols[{pattern!r}]; name it once"
                )

        self._check_mapping("dataset_protocols", "a dataset", "{'shapes-seg': [knnseg@capi]}")
        for ds in self.dataset_protocols:
            if ds in self.datasets:
                raise UserError(
                    f"suite {self.name}: {ds!r} is in datasets (every protocol) and in "
                    "dataset_protocols (its own); name it once"
                )

    def _check_mapping(self, field_name: str, key: str, example: str) -> None:
        """``field_name`` maps ``key`` to a non-empty list of protocols, or a one-line error."""
        mapping = getattr(self, field_name)
        if not isinstance(mapping, dict):
            raise UserError(
                f"suite {self.name}: {field_name} maps {key} to protocols, e.g. {example}"
            )
        for k, cards in mapping.items():
            if not isinstance(cards, list | tuple) or not cards:
                raise UserError(
                    f"suite {self.name}: {field_name}[{k!r}] must list at least one protocol"
                )

    def arch_extra(self, arch: str) -> tuple[str, ...]:
        """The protocols of ``arch_protocols`` whose pattern matches ``arch``, in file order."""
        out: list[str] = []
        for pattern, cards in self.arch_protocols.items():
            if fnmatchcase(arch, str(pattern)):
                out += [c for c in cards if c not in out]
        return tuple(out)

    def arch_only(self) -> tuple[str, ...]:
        """The protocols of ``arch_protocols`` not also suite-wide, in file order."""
        out: list[str] = []
        for cards in self.arch_protocols.values():
            out += [c for c in cards if c not in out and c not in self.protocols]
        return tuple(out)

    def all_protocols(self) -> tuple[str, ...]:
        """Every protocol the suite names: suite-wide, arch, then dataset protocols."""
        out = [*self.protocols, *self.arch_only()]
        for cards in self.dataset_protocols.values():
            out += [c for c in cards if c not in out]
        return tuple(out)

    def backbone_labels(self) -> list[str]:
        return [*self.baselines, *(m.name for m in self.models)]


def jobs_dir() -> Path:
    return cards_dir() / "jobs"


def shipped_job_suites() -> list[str]:
    d = jobs_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_job_suite(spec: str) -> JobSuite:
    """A shipped job suite's name (``default``, ``quick``) or a path to a YAML file."""
    path, _ = _resolve(
        spec,
        jobs_dir(),
        shipped_job_suites(),
        "suite",
        "; or pass a path to your own suite (.yaml)",
    )
    raw = read_yaml(path, "suite")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a suite is a YAML mapping (name, version, models, protocols...)")
    raw = {"name": path.stem, **raw}
    return from_mapping(JobSuite, raw, f"suite {path}")


def shipped_reference(name: str) -> Path | None:
    """The committed reference baseline of shipped suite ``name``, wherever ssl-eval runs from:
    inside the installed package (``ssl_eval/_reference/<name>/baseline.json``, put there by
    the wheel build) or ``results/reference/<name>/baseline.json`` of a source checkout (an
    editable install). None when the suite has no committed reference."""
    from ...core.provenance import PACKAGE_DIR as pkg

    for root in (pkg / "_reference", pkg.parent / "results" / "reference"):
        p = root / name / "baseline.json"
        if p.is_file():
            return p
    return None
