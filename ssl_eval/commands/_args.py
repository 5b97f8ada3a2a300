"""Argument types and options shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import UserError


def csv_list(value: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in csv_list(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from e


def add_results_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--results-dir",
        type=Path,
        default=Path("results"),
        help="where result records and leaderboards live (default: results/)",
    )


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """Options of a sweep: the run's units sharded into jobs submitted with submitit."""
    g = p.add_argument_group(
        "cluster", "shard the units into one job per backbone x dataset, submitted with submitit"
    )
    g.add_argument(
        "--executor",
        help="submit jobs instead of running here: local (processes on this machine) or slurm",
    )
    g.add_argument("--slurm-partition", help="SLURM partition of the jobs")
    g.add_argument("--timeout-min", type=int, default=240, help="time limit of a job (240)")
    g.add_argument("--cpus-per-task", type=int, help="CPUs of a job")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs of a job (default 0)")
    g.add_argument(
        "--array-parallelism", type=int, help="SLURM: at most this many jobs of the array at once"
    )
    g.add_argument(
        "--jobs-dir",
        type=Path,
        help="submitit's pickles and job logs (default <results-dir>/sweeps/jobs)",
    )
    g.add_argument(
        "--no-wait", action="store_true", help="return once submitted; follow with ssl-eval status"
    )
    g.add_argument(
        "--poll-seconds", type=float, default=5.0, help="how often a waiting sweep looks (5)"
    )


def cluster_options(a: argparse.Namespace):
    """The ClusterOptions of parsed ``add_cluster_options`` arguments (None: run here)."""
    if a.executor is None:
        for flag, value in (
            ("--no-wait", a.no_wait),
            ("--jobs-dir", a.jobs_dir),
            ("--slurm-partition", a.slurm_partition),
            ("--array-parallelism", a.array_parallelism),
        ):
            if value:
                raise UserError(f"{flag} applies to a sweep: add --executor local|slurm")
        return None
    from ..orchestrate.sweep import EXECUTORS, ClusterOptions

    EXECUTORS.get(a.executor)  # an unknown name: "did you mean"
    return ClusterOptions(
        executor=a.executor,
        jobs_dir=a.jobs_dir,
        timeout_min=a.timeout_min,
        cpus_per_task=a.cpus_per_task,
        gpus_per_node=a.gpus_per_node,
        slurm_partition=a.slurm_partition,
        array_parallelism=a.array_parallelism,
        wait=not a.no_wait,
        poll_s=a.poll_seconds,
    )
