"""What one job of a sweep runs: ``evaluate.run`` on its (backbone, dataset), every protocol and
seed. The store decides what is left: a unit recorded by an earlier job is skipped, one another
process holds is waited for (the per-unit lock), so a resubmitted job completes only the missing
units. submitit pickles this function by reference and the RunConfig (a frozen dataclass) with it.
"""

from __future__ import annotations

from ..config import RunConfig


def run_job(cfg: RunConfig) -> list[tuple[str, str, str, str]]:
    """(backbone, dataset, protocol, status) of each unit; an exception fails the job, and
    ``ssl-eval status`` shows the last line of its standard error."""
    from ..evaluate import run

    return [(o.backbone, o.dataset, o.protocol, o.status) for o in run(cfg)]
