"""``reproduce``: run the recipe a published number names, through the normal evaluation, and
set ours beside theirs.

The entry (protocols/published.yaml, or another file) names the backbone tag, the dataset and
the recipe card; nothing else is chosen here: the run is ``evaluate.run`` with exactly that
card, the backbone's own preprocessing and feature kind, and the default validation split, so
its record is the entry's setting and the report shows it in its "Published" table too.
Before any work, the entry's card, tag and dataset must exist, the weights must be present or
downloadable, and a dataset ssl-eval cannot fetch must be where ``--data-root`` says, each
refusal one line saying what to download and where to put it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.config import RunConfig
from ..core.distributed import launched_main
from ..core.errors import UserError, one_line
from ..protocols.published import Published, PublishedEntry, check_runnable, load_published
from ..records.store import read_unit_file, records_dir
from ..report.published import Comparison, compare


@dataclass(frozen=True)
class ReproduceConfig:
    tag: str
    dataset: str
    recipe: str | None = None  # one of the entry's recipes (default: every published one)
    published: Path | None = None  # default: the shipped protocols/published.yaml
    results_dir: Path = Path("results")
    cache_dir: Path | None = None
    data_root: Path | None = None
    download: bool = False
    device: str = "auto"
    batch_size: int = 256
    seed: int = 0
    offline: bool = False
    num_workers: int | None = None
    progress: bool = True
    force: bool = False


def _need_weights(tag: str, offline: bool) -> None:
    """Refuse, before the data is read, a tag whose weights are neither here nor downloadable:
    building it raises the tag's own refusal (which file, which folder) without a download,
    as there is nothing to download or downloading is off."""
    from ..backbones.base import BuildOptions
    from ..backbones.catalog import get_spec
    from ..core.network import offline_reason

    spec = get_spec(tag)
    status = spec.status()
    if status.startswith("present") or status == "none needed":
        return
    if status == "missing" or offline_reason(offline):
        spec.build(BuildOptions(offline=offline))  # the tag's one-line "place FILE in DIR"


def _need_data(published: Published, entry: PublishedEntry, rc: ReproduceConfig) -> None:
    """A dataset with a download hint in the published file: its data must load from
    ``--data-root``; otherwise one line saying what to download and where to put it."""
    hint = published.datasets.get(entry.dataset)
    if hint is None:
        return
    if rc.data_root is None or not Path(rc.data_root).expanduser().is_dir():
        where = "no --data-root given" if rc.data_root is None else f"{rc.data_root} is no folder"
        raise UserError(f"{entry.dataset} is not here ({where}): {hint.download}")
    from ..data.datasets import DatasetOptions, get_dataset
    from ..features.extraction import default_cache_dir

    cache = Path(rc.cache_dir) if rc.cache_dir else default_cache_dir()
    try:  # the manifest remembers the content hashes: the run's own load reads no image again
        get_dataset(entry.dataset, DatasetOptions(rc.data_root, rc.download, cache / "manifests"))
    except UserError as e:
        raise UserError(
            f"{entry.dataset} does not load from {rc.data_root} ({one_line(e, limit=300)}): "
            f"{hint.download}"
        ) from e


def run_config(rc: ReproduceConfig, cards: tuple) -> RunConfig:
    """The one evaluation an entry names: its tag, its dataset, its card; nothing overridden."""
    return RunConfig(
        backbones=(rc.tag,),
        datasets=(rc.dataset,),
        protocols=cards,
        results_dir=rc.results_dir,
        cache_dir=rc.cache_dir,
        data_root=rc.data_root,
        download=rc.download,
        device=rc.device,
        batch_size=rc.batch_size,
        seeds=(rc.seed,),
        force=rc.force,
        offline=rc.offline,
        num_workers=rc.num_workers,
        progress=rc.progress,
    )


def reproduce(rc: ReproduceConfig) -> list[Comparison]:
    """Run every published entry of ``rc.tag`` on ``rc.dataset`` (or the one of ``rc.recipe``)
    and compare each with its record."""
    from .evaluate import run as run_units

    published = load_published(rc.published)
    entries = published.select(rc.tag, rc.dataset, rc.recipe)
    cards = {}
    for e in entries:
        if e.recipe not in cards:
            cards[e.recipe] = check_runnable(e)
    _need_weights(rc.tag, rc.offline)
    _need_data(published, entries[0], rc)
    try:
        outcomes = run_units(run_config(rc, tuple(cards.values())))
    except UserError as e:
        if "--set" not in str(e):
            raise
        # a card's own refusal advising an override, which reproduce does not take
        names = ",".join(cards)
        raise UserError(
            f"{one_line(e)} (reproduce runs {names} as shipped, without --set: is the data "
            f"complete? `ssl-eval run --backbone {rc.tag} --dataset {rc.dataset} --protocol "
            f"{names} --set ...` runs it changed, another setting than the published one)"
        ) from e
    if not launched_main():  # torchrun: rank 0 wrote the records and compares
        return []
    by_card = {o.protocol: o for o in outcomes}
    out = []
    for e in entries:
        o = by_card.get(e.recipe)
        if o is None or o.key is None:
            raise UserError(f"{e.label}: the run produced no record ({o.status if o else 'none'})")
        records = _unit_records(rc.results_dir, o.key)
        rec = next((r for r in records if r.metric == e.metric), None)
        if rec is None:
            raise UserError(f"{e.label}: the record of unit {o.key} has no {e.metric}")
        out.append(compare(e, rec))
    return out


def _unit_records(results_dir: Path, key: str) -> list:
    """The records of unit ``key`` (its newest valid file)."""
    for p in sorted(records_dir(results_dir).glob(f"{key}-*.json"), reverse=True):
        try:
            return read_unit_file(p)
        except ValueError:
            continue
    raise UserError(f"no valid record file of unit {key} in {records_dir(results_dir)}")
