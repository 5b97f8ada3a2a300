"""The checkpoint-family framework: a registry of adapters, each recognising its official
layout from the keys (``detect``) and building a model from it (``build``). The adapters
themselves live in ``families/``, one file per family; this module knows none of them.

Tagged backbones (``mocov3_vitb16``, ``simclr_r50`` ...) name a family and a variant;
``ckpt:PATH`` detects the family from the file (or takes ``--family``) and takes the
architecture from what the file declares, ``--arch``, or the shapes plus the family's own
code, never guessing a detail none of them pins (``architecture.py``). Both paths end in the
same strict load and the same load report, which says what was built and why
(``load_report["architecture"]``). A ``ckpt:`` path that is a folder goes to the folder
reader that accepts it (``register_folder_reader``; the ``ssl-eval train`` output folder is
one, in ``families/trained.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core.errors import UserError
from ..core.registry import Registry
from ..data.transforms import Preprocessing
from .architecture import describe
from .base import Backbone, BackboneSpec, BuildOptions, WeightsInfo
from .checkpoints import Checkpoint, read_checkpoint, summarise_keys
from .registry import BACKBONES
from .weights import WeightsSource


@dataclass(frozen=True)
class Loaded:
    """What a family's build returns: the loaded model and how its paper evaluated it."""

    model: nn.Module
    report: dict
    preprocessing: Preprocessing
    feature_kind: str
    description: str
    arch_from: str = "the tensor shapes"  # who pinned the architecture, for the load report


@dataclass(frozen=True)
class Family:
    """An adapter for one family's checkpoint layouts. ``build(ckpt, variant, options)`` gets
    ``variant=None`` from ``ckpt:PATH`` and must then infer the architecture from shapes."""

    name: str
    detect: Callable[[Checkpoint], bool]
    build: Callable[[Checkpoint, str | None, BuildOptions], Loaded]
    description: str


FAMILIES: Registry[Family] = Registry("checkpoint family")
TAGS: dict[str, tuple[str, str]] = {}  # tag -> (family, variant), for listings and tests
# tag -> where its official file is found: a record's file is the tag's own or a --weights file
TAG_WEIGHTS: dict[str, WeightsSource] = {}


@dataclass(frozen=True)
class FolderReader:
    """Reads ``ckpt:DIR`` for a folder layout that ``accepts(path)`` recognises."""

    name: str
    accepts: Callable[[Path], bool]
    build: Callable[[Path, BuildOptions], Backbone]


FOLDER_READERS: list[FolderReader] = []


def register_family(family: Family) -> Family:
    FAMILIES.register(family.name, family, family.description)
    return family


def register_folder_reader(reader: FolderReader) -> FolderReader:
    FOLDER_READERS.append(reader)
    return reader


def _folder_reader(path: Path) -> FolderReader | None:
    return next((r for r in FOLDER_READERS if r.accepts(path)), None)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown --family {name!r}; choose one of: {', '.join(FAMILIES.names())}")
    return FAMILIES.get(name)


def detect_family(ckpt: Checkpoint) -> Family:
    """The one family whose detector accepts this checkpoint."""
    hits = [e.obj for e in FAMILIES.entries() if e.obj.detect(ckpt)]
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(FAMILIES.names())
    if not hits:
        sample = sorted(ckpt.flat)[:6]
        raise UserError(
            f"cannot tell which family {ckpt.path.name} belongs to (top-level entries "
            f"{ckpt.top[:6]}, keys such as {sample}). Pass --family with one of: {names}"
        )
    raise UserError(
        f"{ckpt.path.name} matches several families ({', '.join(f.name for f in hits)}); "
        "pass --family to choose"
    )


def finish_report(
    report: dict, fmt: str, dropped_before: Iterable[str] = (), prefix: str = ""
) -> dict:
    """Merge keys removed before the strict load (projectors, momentum encoders, decoders)
    into the strict load's report, named as in the file (``prefix`` restores the container
    path of the strict load's own names), summarised so a record stays small."""
    dropped = sorted({prefix + k for k in report.get("dropped", [])} | set(dropped_before))
    return {
        **report,
        "format": fmt,
        "dropped": summarise_keys(dropped),
        "dropped_count": len(dropped),
    }


def backbone_from_checkpoint(
    tag: str,
    ckpt: Checkpoint,
    family: Family,
    variant: str | None,
    opt: BuildOptions,
    preprocessing: Preprocessing | None = None,
    description: str | None = None,
) -> Backbone:
    from ..core.files import sha256_file

    loaded = family.build(ckpt, variant, opt)
    pre = preprocessing or loaded.preprocessing
    if opt.image_size:
        pre = pre.with_size(opt.image_size)
    report = {
        "family": family.name,
        "file": ckpt.path.name,
        **loaded.report,
        "architecture": {**describe(loaded.model), "from": loaded.arch_from},
    }
    weights = WeightsInfo("file", sha256_file(ckpt.path), str(ckpt.path))
    return Backbone(
        tag,
        loaded.model,
        pre,
        opt.feature_kind or loaded.feature_kind,
        weights,
        report,
        description or loaded.description,
    )


def register_tag(
    tag: str,
    family: str,
    variant: str,
    source: WeightsSource,
    description: str,
    preprocessing: Preprocessing | None = None,
) -> None:
    """A tagged backbone: its family's adapter, a fixed variant and the official file."""

    def build(opt: BuildOptions) -> Backbone:
        if opt.family and opt.family != family:
            raise UserError(
                f"--family {opt.family} applies to ckpt:PATH; {tag} is always read as {family}"
            )
        if opt.arch:
            raise UserError(f"--arch {opt.arch} applies to ckpt:PATH; {tag} is always {variant}")
        path = source.resolve(opt.weights, opt.offline)
        ckpt = read_checkpoint(path)
        return backbone_from_checkpoint(
            tag, ckpt, get_family(family), variant, opt, preprocessing, description
        )

    BACKBONES.register(tag, BackboneSpec(tag, build, source.status, description))
    TAGS[tag] = (family, variant)
    TAG_WEIGHTS[tag] = source


def _ckpt_spec(rest: str) -> BackboneSpec:
    name = f"ckpt:{rest}"
    path = Path(rest).expanduser()

    def build(opt: BuildOptions) -> Backbone:
        if opt.weights is not None:
            raise UserError(f"{name} already names its weights file; drop --weights")
        reader = _folder_reader(path)  # e.g. a folder written by `ssl-eval train`
        if reader is not None:
            return reader.build(path, opt)
        if not path.is_file():
            raise UserError(f"{name}: no such file {path} (nor an `ssl-eval train` output folder)")
        ckpt = read_checkpoint(path)
        family = get_family(opt.family) if opt.family else detect_family(ckpt)
        bb = backbone_from_checkpoint(name, ckpt, family, None, opt)
        bb.load_report["family_from"] = "--family" if opt.family else "detected from keys"
        return bb

    def status() -> str:
        found = path.is_file() or _folder_reader(path) is not None
        return f"present ({path})" if found else f"missing ({path})"

    return BackboneSpec(name, build, status, f"checkpoint {path.name}, family detected from keys")


BACKBONES.register_prefix(
    "ckpt",
    _ckpt_spec,
    "ckpt:PATH, an `ssl-eval train` output folder, or a checkpoint whose family (supervised, simclr, mocov3, mae, dino, dinov2, "
    "dinov3, cifar_resnet) is detected from its keys; --family overrides",
)
