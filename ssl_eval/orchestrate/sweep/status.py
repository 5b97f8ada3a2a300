"""Each planned unit of the sweeps in a results folder (and each unit recorded there without a
sweep) as done, running, pending or failed:

* done: its record exists and verifies (the store decides, as it does for skipping);
* running: a live process holds its unit lock, or the job it belongs to runs;
* pending: its job waits in the queue, or no job was submitted for it yet;
* failed: the last job submitted for it ended without recording it (the detail gives the job's
  state and the last line of its standard error)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from submitit.core.utils import JobPaths

from ...core.errors import UserError
from ...core.files import lock_held, lock_path
from ...records.store import load_records, records_dir, unit_done
from .executors import EXECUTORS
from .sweepfile import load_sweeps, sweeps_dir

STATES = ("done", "running", "pending", "failed")


@dataclass(frozen=True)
class UnitState:
    key: str
    backbone: str
    dataset: str
    protocol: str
    seed: int | None
    state: str  # one of STATES
    job: str | None = None  # the id of the last job submitted for it
    detail: str = ""


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no standard error written"
    lines = [ln for ln in lines if ln]
    return lines[-1] if lines else "its standard error is empty"


def sweep_status(results_dir: Path, sweep: str | None = None) -> list[UnitState]:
    """The state of every unit planned by the sweeps under ``results_dir`` (only sweep ``sweep``
    when given), then of every other recorded unit (done). A folder with neither is a
    UserError."""
    sweeps = load_sweeps(results_dir)
    if sweep is not None:
        sweeps = [s for s in sweeps if s["sweep"] == sweep]
    planned: dict[str, dict] = {}
    last_job: dict[str, dict] = {}  # unit key -> the latest job submitted for it
    for s in sweeps:
        for u in s["units"]:
            planned.setdefault(u["key"], u)
        for j in sorted(s["jobs"], key=lambda j: j["submitted"]):
            for k in j["units"]:
                if k not in last_job or j["submitted"] >= last_job[k]["submitted"]:
                    last_job[k] = j
    job_states: dict[str, tuple[str, str]] = {}
    out: list[UnitState] = []
    for key, u in planned.items():
        job = last_job.get(key)
        row = (key, u.get("tag", u["backbone"]), u["dataset"], u["protocol"], u["seed"])
        if unit_done(results_dir, key):
            out.append(UnitState(*row, "done", job and job["job_id"]))
            continue
        if lock_held(lock_path(records_dir(results_dir) / key)):
            out.append(UnitState(*row, "running", job and job["job_id"], "evaluating"))
            continue
        if job is None:
            out.append(UnitState(*row, "pending", None, "not submitted"))
            continue
        jid = job["job_id"]
        if jid not in job_states:
            job_states[jid] = EXECUTORS.get(job["executor"]).job_state(job)
        phase, word = job_states[jid]
        if phase == "ended":
            err = JobPaths(job["folder"], jid, 0).stderr  # where submitit put task 0's stderr
            out.append(
                UnitState(*row, "failed", jid, f"job {word} without it; stderr: {_last_line(err)}")
            )
        else:
            out.append(UnitState(*row, phase, jid, f"job {word}"))
    if sweep is None:
        out += _recorded_elsewhere(results_dir, set(planned))
    if not out:
        where = f"sweep {sweep}" if sweep else f"sweep in {sweeps_dir(results_dir)}"
        raise UserError(
            f"no {where} and no record in {records_dir(results_dir)}: start one with "
            "`ssl-eval run ... --executor local|slurm` (or name the right --results-dir)"
        )
    return out


def _recorded_elsewhere(results_dir: Path, planned: set[str]) -> list[UnitState]:
    """Units recorded by plain runs (no sweep): done, one row per unit."""
    seen: dict[str, UnitState] = {}
    for r in load_records(results_dir):
        if r.unit not in planned and r.unit not in seen:
            seed = r.seed if r.seed_dependent else None
            seen[r.unit] = UnitState(
                r.unit, r.backbone, r.dataset["name"], r.protocol["name"], seed, "done"
            )
    return list(seen.values())


def counts(states: list[UnitState]) -> dict[str, int]:
    c = Counter(s.state for s in states)
    return {k: c.get(k, 0) for k in STATES}


def format_counts(states: list[UnitState]) -> str:
    c = counts(states)
    return f"{len(states)} unit(s): " + ", ".join(f"{c[k]} {k}" for k in STATES)


def format_table(states: list[UnitState]) -> str:
    lines = ["state\tbackbone\tdataset\tprotocol\tseed\tjob\tdetail"]
    for s in states:
        seed = "-" if s.seed is None else str(s.seed)
        lines.append(
            f"{s.state}\t{s.backbone}\t{s.dataset}\t{s.protocol}\t{seed}\t{s.job or '-'}\t{s.detail}"
        )
    return "\n".join(lines)
