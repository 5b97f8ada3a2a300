"""What one job of a sweep runs: ``evaluate.run`` on its (backbone, dataset), every protocol and
seed. The store decides what is left: a unit recorded by an earlier job is skipped, one another
process holds is waited for (the per-unit lock), so a resubmitted job completes only the missing
units. submitit pickles this function by reference and the RunConfig (a frozen dataclass) with it.
"""

from __future__ import annotations

from ...core.config import RunConfig
from ...core.errors import UserError


def environment() -> str:
    """What, besides the config, goes into every unit key: ssl-eval's source and the versions
    of the libraries that compute features. A job that runs where these differ from the
    submitter's would record its units under keys the sweep did not plan."""
    from ...core.files import sha256_json
    from ...core.provenance import PROTOCOL_LIBRARIES, library_versions, source_hash

    return sha256_json([source_hash(), library_versions(PROTOCOL_LIBRARIES)])[:16]  # as unit_key


def run_job(cfg: RunConfig, planned_in: str | None = None) -> list[tuple[str, str, str, str]]:
    """(backbone, dataset, protocol, status) of each unit; an exception fails the job, and
    ``ssl-eval status`` shows the last line of its standard error. ``planned_in``: the
    submitter's ``environment()``; a job whose own differs refuses to run."""
    from ..evaluate import run

    if planned_in is not None and environment() != planned_in:
        raise UserError(
            "ssl-eval's source or its libraries changed since this sweep was planned (a queued "
            "job runs the code it finds): its units would be recorded under other keys; "
            "run the sweep's command again to plan and submit with the code as it is now"
        )
    return [(o.backbone, o.dataset, o.protocol, o.status) for o in run(cfg)]
