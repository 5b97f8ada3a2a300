"""``--deterministic``: CPU training whose weights do not depend on which x86-64 CPU ran it.

Measured in ``benchmarks/bench_determinism.py`` (docs/suite.md, "Bitwise-reproducible CPU
training"): unpinned, every kernel path changes the trained weights (ATen's AVX-512, AVX2 and
scalar kernels, oneDNN's ISA, the thread count), so a retrained model is another model on
another machine. With all of these pinned, every emulated machine gave one set of weights, at
about 4x the training steps on a 2-core CPU:

* ``ATEN_CPU_CAPABILITY=avx2``: torch's vectorised kernels at one vector width (needs a CPU
  with AVX2 and FMA; older or non-x86 CPUs are refused, never silently run another path);
* ``MKL_CBWR=COMPATIBLE``: MKL's one fixed code branch, the same on Intel and AMD CPUs;
* one thread (``OMP_NUM_THREADS=MKL_NUM_THREADS=1`` and ``torch.set_num_threads(1)``): the
  order of every reduction;
* oneDNN (mkldnn) and NNPACK off: their convolutions pick kernels by the CPU's ISA.

The two environment variables are read by torch and MKL when the first operation runs, so
``pin_environment`` must run before the process touches torch (``ssl_eval.cli`` calls it when
the option is given, before any command imports torch); the process-wide flags are applied
around the training alone by ``pinned`` (the evaluation that follows in ``ssl-eval suite`` runs
with the process's own threads and oneDNN again; ATen's capability stays pinned for the
process, and the records' ``machine.cpu_capability`` says so). ``pinned`` reads every pin back
and refuses to train when one did not take effect (e.g. torch ran before the variable was set):
a run that says it is deterministic is. What was read back is written into the sidecar
(``determinism``) and the evaluation records (``load_report.training.determinism``).

CUDA training is not covered (other kernels, other rules): ``--deterministic`` with a GPU
device is refused.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import UserError

CAPABILITY = "avx2"  # the pinned ATen kernel path (the pinned weights depend on this value)
ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": CAPABILITY,
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
THREADS = 1


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def check_supported(machine: str | None = None, flags: set[str] | None = None) -> None:
    """Refuse, in one line, a CPU the pinned kernel path cannot run on."""
    machine = machine if machine is not None else platform.machine()
    if machine.lower() not in ("x86_64", "amd64"):
        raise UserError(
            f"--deterministic pins x86-64 AVX2 kernels; this machine is {machine}: train "
            "without --deterministic (the check then judges retrained models by their runs)"
        )
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in ("avx2", "fma") if f not in flags]
    if missing:
        raise UserError(
            f"--deterministic pins torch's AVX2 kernels, and this CPU lacks {', '.join(missing)} "
            "(/proc/cpuinfo); train without --deterministic"
        )


def pin_environment(log=None) -> dict[str, str]:
    """Set the pinned environment variables in this process (before torch runs an operation);
    returns what each held before, for the log. Values already equal are left alone."""
    check_supported()
    before = {}
    for k, v in ENVIRONMENT.items():
        old = os.environ.get(k)
        if old != v:
            before[k] = old
            os.environ[k] = v
    if log is not None and any(v is not None for v in before.values()):
        changed = ", ".join(
            f"{k}={v} (was {before[k]})" for k, v in ENVIRONMENT.items() if before.get(k)
        )
        log(f"deterministic: overrode {changed}")
    return before


def read_back() -> dict:
    """The pins as this process runs them (what the sidecar and the records carry)."""
    import torch

    return {
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.enabled),
        "nnpack": bool(torch._C._get_nnpack_enabled()),
        "torch": torch.__version__,
    }


EXPECTED = {
    "aten_cpu_capability": CAPABILITY.upper(),
    "mkl_cbwr": ENVIRONMENT["MKL_CBWR"],
    "threads": THREADS,
    "mkldnn": False,
    "nnpack": False,
}


@contextmanager
def pinned(device_type: str) -> Iterator[dict]:
    """Within: one thread, oneDNN and NNPACK off; every pin read back and checked. Yields the
    read-back pins. The process's own threads and flags come back on exit."""
    import torch

    if device_type != "cpu":
        raise UserError(
            f"--deterministic covers CPU training only, not {device_type}; add --device cpu "
            "or drop --deterministic"
        )
    saved = (
        torch.get_num_threads(),
        torch.backends.mkldnn.enabled,
        torch._C._get_nnpack_enabled(),
    )
    torch.set_num_threads(THREADS)
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    try:
        got = read_back()
        wrong = {k: got[k] for k, v in EXPECTED.items() if got[k] != v}
        if wrong:
            raise UserError(
                f"deterministic training could not pin {wrong} (expected "
                f"{ {k: EXPECTED[k] for k in wrong} }): torch ran before the environment was "
                "pinned; use the --deterministic option of ssl-eval train/suite in a fresh "
                "process, or export " + " ".join(f"{k}={v}" for k, v in ENVIRONMENT.items())
            )
        yield got
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.mkldnn.enabled = saved[1]
        torch.backends.nnpack.set_flags(saved[2])
