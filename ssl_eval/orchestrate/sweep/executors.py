"""The executors a sweep submits through, as a registry: each says which device its jobs run
on (decided at submission, so the unit keys planned here are the keys the jobs record), how to
build its submitit executor, and how to read a job's state from another process later."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...core.errors import UserError
from ...core.registry import Registry


@dataclass(frozen=True)
class ClusterOptions:
    """How a sweep is submitted: built by the CLI, read by ``submit_sweep``."""

    executor: str = "local"
    jobs_dir: Path | None = None  # submitit's folder (default <results>/sweeps/jobs)
    timeout_min: int = 240
    cpus_per_task: int | None = None
    gpus_per_node: int = 0
    slurm_partition: str | None = None
    array_parallelism: int | None = None  # SLURM: how many array jobs run at once
    wait: bool = True
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        if self.timeout_min < 1:
            raise UserError("--timeout-min must be at least 1 minute")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise UserError("--cpus-per-task must be at least 1")
        if self.gpus_per_node < 0:
            raise UserError("--gpus-per-node must be 0 or more")
        if self.array_parallelism is not None and self.array_parallelism < 1:
            raise UserError("--array-parallelism must be at least 1")
        if self.poll_s <= 0:
            raise UserError("--poll-seconds must be positive")


# a job's state, read from any process: ("pending" | "running" | "ended", submitit's own word)
JobState = tuple[str, str]
# the job as the sweep file records it: job_id, executor, folder, ... and ``identity``
Job = dict


@dataclass(frozen=True)
class ExecutorKind:
    cluster: str  # submitit's AutoExecutor name
    device: Callable[[str, ClusterOptions], str]  # --device -> the device the jobs run on
    parameters: Callable[[ClusterOptions], dict]  # -> AutoExecutor.update_parameters(**)
    identity: Callable[[str], str | None]  # job id -> what tells it from a later namesake
    job_state: Callable[[Job], JobState]  # the recorded job -> its state now
    help: str


EXECUTORS: Registry[ExecutorKind] = Registry("executor")


def _local_device(device: str, opts: ClusterOptions) -> str:
    from ...core.runtime import resolve_device

    return str(resolve_device(device))  # the jobs run here: the same answer


def _slurm_device(device: str, opts: ClusterOptions) -> str:
    if device == "auto":  # decided here, not on each node: it is part of every unit's key
        return "cuda" if opts.gpus_per_node > 0 else "cpu"
    if device.startswith("cuda") and opts.gpus_per_node == 0:
        raise UserError(
            f"--device {device} with --gpus-per-node 0: the jobs would have no GPU; "
            "ask for one (--gpus-per-node 1) or use --device cpu"
        )
    return device


def _common(opts: ClusterOptions) -> dict:
    p: dict = {"timeout_min": opts.timeout_min, "gpus_per_node": opts.gpus_per_node}
    if opts.cpus_per_task is not None:
        p["cpus_per_task"] = opts.cpus_per_task
    return p


def _slurm_parameters(opts: ClusterOptions) -> dict:
    p = _common(opts) | {"name": "ssl-eval"}
    if opts.slurm_partition:
        p["slurm_partition"] = opts.slurm_partition
    if opts.array_parallelism:
        p["slurm_array_parallelism"] = opts.array_parallelism
    return p


def _proc_stat(pid: str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _local_identity(job_id: str) -> str | None:
    """A local job's id is its controller's pid, which the system reuses: its start time (clock
    ticks after boot) tells the job's process from a later one with the same pid."""
    stat = _proc_stat(job_id) if job_id.isdigit() else None
    return stat[19] if stat and len(stat) > 19 else None


def _local_state(job: Job) -> JobState:
    # submitit keeps no state of a local job that another process can read: ask the system
    jid = str(job["job_id"])
    stat = _proc_stat(jid) if jid.isdigit() else None
    if stat is None and jid.isdigit() and not Path("/proc/self/stat").exists():
        try:  # no /proc here: the kernel says whether the pid lives (pid reuse unseen)
            os.kill(int(jid), 0)
            return ("running", "RUNNING")
        except ProcessLookupError:
            return ("ended", "FINISHED")
        except PermissionError:
            return ("running", "RUNNING")
    if stat is None or stat[0] in ("Z", "X"):  # gone, or a zombie its parent has not reaped
        return ("ended", "FINISHED")
    if job.get("identity") is not None and stat[19:20] != [job["identity"]]:
        return ("ended", "FINISHED")  # another process took the pid since
    return ("running", "RUNNING")


_SLURM_PENDING = {"PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}
_SLURM_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"}


def _slurm_state(job: Job) -> JobState:
    import submitit

    try:
        sj = submitit.SlurmJob(folder=job["folder"], job_id=str(job["job_id"]))
        state = sj.get_info(mode="force").get("State")
    except Exception:  # sacct missing or failing: say so rather than guess
        state = None
    state = (state or "UNKNOWN").split()[0]  # "CANCELLED by 123" -> CANCELLED
    if state in _SLURM_PENDING:
        return ("pending", state)
    if state in _SLURM_RUNNING:
        return ("running", state)
    if state == "UNKNOWN":
        return ("pending", "UNKNOWN (sacct gave no state)")
    return ("ended", state)


EXECUTORS.register(
    "local",
    ExecutorKind(
        "local", _local_device, _common, _local_identity, _local_state, "processes on this machine"
    ),
    help="submitit's LocalExecutor: one process per job on this machine (tests, one server)",
)
EXECUTORS.register(
    "slurm",
    ExecutorKind(
        "slurm", _slurm_device, _slurm_parameters, lambda job_id: None, _slurm_state, "SLURM"
    ),
    help="submitit's SlurmExecutor: one SLURM array task per job",
)


def make_executor(opts: ClusterOptions, folder: Path):
    """The submitit executor of ``opts.executor``, writing its pickles and logs under ``folder``."""
    import submitit

    kind = EXECUTORS.get(opts.executor)
    try:
        ex = submitit.AutoExecutor(folder=folder / "%j", cluster=kind.cluster)
    except RuntimeError as e:  # SlurmExecutor: no srun on this machine
        raise UserError(
            f"--executor {opts.executor}: {e}; submit from the cluster's login node, "
            "or use --executor local"
        ) from e
    ex.update_parameters(**kind.parameters(opts))
    return ex
