"""Plan a run's units, shard them into one job per (backbone, dataset), submit the jobs that
have units left, record them in the sweep file, and wait for them (or not).

One job per (backbone, dataset) rather than per unit: a job extracts the backbone's features on
the dataset once and every protocol and seed of that pair reads them, where one job per unit
would build the backbone and extract (or read the cache) once per unit. The per-unit locks make
either safe; a finer split only pays for many slow protocols on one pair (fine-tuning), which
``--protocol`` per submission already gives."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...core.config import RunConfig
from ...core.runtime import log
from ...records.store import unit_done, utc_now
from .executors import EXECUTORS, ClusterOptions, make_executor
from .status import UnitState, counts, format_counts, sweep_status
from .sweepfile import record_jobs, sweep_id, sweeps_dir


@dataclass
class SweepOutcome:
    sweep: str
    device: str  # the device the jobs run on, decided at submission (it is in every unit key)
    planned: int
    submitted: list[str] = field(default_factory=list)  # job ids submitted by this call
    busy: list[str] = field(default_factory=list)  # earlier jobs still queued or running
    recorded: int = 0  # units already in the store at submission (not submitted again)
    inapplicable: list[str] = field(default_factory=list)  # "tag x protocol" left out (suites)
    states: list[UnitState] = field(default_factory=list)  # after waiting; empty with no wait


def submit_sweep(cfg: RunConfig, opts: ClusterOptions) -> SweepOutcome:
    """Submit the missing units of ``cfg`` as jobs through ``opts.executor``; with
    ``opts.wait``, wait for them and return every unit's state."""
    import torch

    from ..units import plan

    kind = EXECUTORS.get(opts.executor)
    device = kind.device(cfg.device, opts)
    cfg = dataclasses.replace(cfg, device=device)
    jobs_dir = Path(opts.jobs_dir or sweeps_dir(cfg.results_dir) / "jobs").absolute()
    executor = make_executor(opts, jobs_dir)  # before planning: no SLURM here fails at once
    log(f"planning the sweep (device {device} for every job)", "sweep")
    planned = plan(cfg, torch.device(device))
    units = [u for u in planned if u.applies]
    sid = sweep_id(u.key for u in units)
    out = SweepOutcome(sid, device, len(units))
    out.inapplicable = [f"{u.tag} x {u.protocol}" for u in planned if not u.applies]
    groups: dict[tuple[str, str], list[str]] = {}
    for u in units:
        if cfg.force or not unit_done(cfg.results_dir, u.key):
            groups.setdefault((u.backbone, u.dataset), []).append(u.key)
        else:
            out.recorded += 1
    previous = _states(cfg.results_dir, sid)
    for pair, keys in list(groups.items()):
        busy = {s.job for s in previous if s.key in keys and s.state in ("running", "pending")}
        busy.discard(None)
        if busy:  # a resubmission would only queue behind the unit locks
            log(
                f"{pair[0]} x {pair[1]}: job {', '.join(sorted(busy))} still queued or running",
                "sweep",
            )
            out.busy += sorted(busy)
            del groups[pair]
    jobs = []
    if not groups:
        log(f"sweep {sid}: nothing to submit ({len(units)} unit(s) planned)", "sweep")
    else:
        jobs = _submit(cfg, opts, executor, sid, units, groups)
        out.submitted = [str(j.job_id) for j in jobs]
    if opts.wait:
        out.states = _wait(cfg.results_dir, sid, jobs, opts.poll_s)
    return out


def _states(results_dir: Path, sid: str) -> list[UnitState]:
    from ...core.errors import UserError

    try:
        return sweep_status(results_dir, sid)
    except UserError:  # a new sweep: nothing submitted before
        return []


def _submit(cfg, opts, executor, sid, units, groups) -> list:
    from .job import environment, run_job

    job_cfgs = [
        dataclasses.replace(cfg, backbones=(bb,), datasets=(ds,), progress=False)
        for bb, ds in groups
    ]
    kind = EXECUTORS.get(opts.executor)
    jobs = executor.map_array(run_job, job_cfgs, [environment()] * len(job_cfgs))
    now = utc_now()
    entries = [
        {
            "job_id": str(j.job_id),
            "identity": kind.identity(str(j.job_id)),
            "executor": opts.executor,
            "submitted": now,
            "folder": str(j.paths.folder),
            "backbone": bb,
            "dataset": ds,
            "units": keys,
        }
        for j, ((bb, ds), keys) in zip(jobs, groups.items(), strict=True)
    ]
    record_jobs(
        cfg.results_dir,
        sid,
        [dataclasses.asdict(u) for u in units],
        {
            "backbones": list(cfg.backbones),
            "datasets": list(cfg.datasets),
            "protocols": [c.name for c in cfg.protocols],
            "seeds": list(cfg.seeds),
            "device": cfg.device,
        },
        entries,
    )
    for e in entries:
        log(
            f"submitted job {e['job_id']} ({opts.executor}): {e['backbone']} x {e['dataset']}, "
            f"{len(e['units'])} unit(s); logs in {e['folder']}",
            "sweep",
        )
    return jobs


def _wait(results_dir: Path, sid: str, jobs: list, poll_s: float) -> list[UnitState]:
    """Poll until the jobs submitted here have ended and no unit of the sweep is running or
    pending (earlier jobs included), printing each change of counts."""
    said = None
    while True:
        ended = all(j.done() for j in jobs)  # --force: a unit shows done before its redo
        states = sweep_status(results_dir, sid)
        line = format_counts(states)
        if line != said:
            log(f"sweep {sid}: {line}", "sweep")
            said = line
        c = counts(states)
        if ended and not c["running"] and not c["pending"]:
            return states
        time.sleep(poll_s)
