"""Sweeps: the units of a ``run`` sharded into independent jobs submitted with submitit (SLURM,
or submitit's local executor on one machine), every job writing its records into the shared
results folder, resumable and skip-existing; ``ssl-eval status`` follows them.

* ``executors.py``: the executor registry (local, slurm), the device jobs run on, job states
* ``sweepfile.py``: ``<results>/sweeps/<id>.json``, the planned units and every submitted job
* ``job.py``: what one job runs (``evaluate.run`` on one backbone x dataset)
* ``submit.py``: plan, group, submit the groups with missing units, wait and summarise
* ``status.py``: each planned unit as done, running, pending or failed
"""

from .executors import EXECUTORS, ClusterOptions
from .status import UnitState, sweep_status
from .submit import SweepOutcome, submit_sweep

__all__ = [
    "EXECUTORS",
    "ClusterOptions",
    "SweepOutcome",
    "UnitState",
    "submit_sweep",
    "sweep_status",
]
