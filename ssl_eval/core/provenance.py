"""Where a number came from: the versions of ssl-eval's code and of the libraries that
compute it, and the machine. Cache and skip keys include the source hashes and versions, so a
change of code or library never serves a stale result; records carry them as provenance."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import platform
import subprocess
import sys
from functools import cache, lru_cache
from pathlib import Path

from .. import __version__

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # ssl_eval/
# the libraries whose versions change features: the model code, decoding and resizing
FEATURE_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "pillow")
# what computes a protocol's number from the features besides torch and numpy: scikit-learn
# (few-shot's logistic regression, the probes), scipy (its solvers, the t quantiles of the
# intervals) and faiss (the k-NN search); in every unit key, not in the feature key (features
# are computed by the FEATURE_LIBRARIES alone). A library that is not installed is None.
PROTOCOL_LIBRARIES = (*FEATURE_LIBRARIES, "scikit-learn", "scipy", "faiss-cpu", "faiss-gpu-cu12")


@cache
def source_hash(*parts: str) -> str:
    """sha256 over the source of ssl-eval's ``parts`` (files or folders under the package,
    e.g. ``features.py``, ``backbones``; none: the whole package and its shipped cards),
    derived from the files themselves, so no version constant has to be bumped by hand."""
    roots = [PACKAGE_DIR / p for p in parts] if parts else [PACKAGE_DIR]
    missing = [str(r) for r in roots if not r.exists()]
    if missing:  # a moved or renamed file would silently drop out of the keys
        raise FileNotFoundError(f"source_hash: no such part of the package: {missing}")
    if not parts:
        cards = next(
            (d for d in (PACKAGE_DIR / "_cards", PACKAGE_DIR.parent / "protocols") if d.is_dir()),
            None,
        )
        roots += [cards] if cards else []
    files: list[Path] = []
    for r in roots:
        files += (
            [r] if r.is_file() else sorted(p for p in r.rglob("*") if p.suffix in (".py", ".yaml"))
        )
    h = hashlib.sha256()
    for f in sorted(set(files)):
        rel = f.relative_to(PACKAGE_DIR.parent) if f.is_relative_to(PACKAGE_DIR.parent) else f.name
        h.update(f"{rel}\0".encode())
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def module_sources(*objects: object) -> dict[str, str]:
    """{source file: sha256} of the modules defining ``objects`` (a plugin's factory, its
    model's class and the classes that class derives from), skipping torch's own."""
    out: dict[str, str] = {}
    for obj in objects:
        classes = obj.__mro__ if isinstance(obj, type) else (obj,)
        for c in classes:
            with contextlib.suppress(TypeError, OSError):
                path = inspect.getsourcefile(c)
                if (
                    path
                    and "site-packages/torch/" not in path.replace("\\", "/")
                    and c is not object
                ):
                    out[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return dict(sorted(out.items()))


@lru_cache(maxsize=1)
def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "ssl_eval": __version__}
    for name in (
        "torch",
        "torchvision",
        "timm",
        "numpy",
        "pillow",
        "scikit-learn",
        "scipy",
        "faiss-cpu",
        "faiss-gpu-cu12",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def library_versions(names: tuple[str, ...] = FEATURE_LIBRARIES) -> dict:
    v = package_versions()
    return {n: v.get(n) for n in names}


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the ssl-eval source (with '.dirty' if modified), else the version;
    always followed by the source hash, which holds where git is absent (a wheel)."""
    here = PACKAGE_DIR.parent
    base = __version__
    try:
        rev = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if rev.returncode == 0 and (here / ".git").exists():
            dirty = subprocess.run(
                ["git", "-C", str(here), "status", "--porcelain", "--", "ssl_eval", "protocols"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            base = f"{__version__}+g{rev.stdout.strip()}" + (".dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{base} src:{source_hash()}"


def peak_memory_mb(device_type: str) -> float:
    """Peak resident memory of this process (MB), or peak GPU memory when on a GPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20
    except ImportError:  # Windows
        return float("nan")


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"


def autocast_dtype(device) -> str | None:
    """The autocast precision extraction and fine-tuning use on ``device`` (None: float32)."""
    return "bfloat16" if device.type == "cuda" else None


CPUINFO = Path("/proc/cpuinfo")  # a module constant: tests point it at a fake file


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` is empty on Linux),
    else ``platform.processor()``, else "unknown"."""
    try:
        for line in CPUINFO.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What ran the numbers, as provenance (not part of any setting: another CPU does not make
    two numbers incomparable, but a retrained model's weights differ with it): the CPU model,
    the kernel capability torch dispatched to (AVX512, AVX2, DEFAULT ...) and the CPU count."""
    import os

    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - provenance only
        capability = "unknown"
    return {"cpu_model": cpu_model(), "cpu_capability": capability, "cpu_count": os.cpu_count()}
