"""What trains: the trainer's fingerprint, written into every checkpoint's sidecar
(``make_sidecar``: ``"trainer"``) and used by the suite to decide whether trained weights can
be reused, so weights are keyed on the code and libraries that made them, not on the recipe
alone.

``source`` hashes the code that trains: the modules of the ssl_eval package that
``train/loop.py`` imports, and the modules those import, transitively, found statically with
``ast`` (imports inside functions included, relative imports resolved). A package whose
``__init__`` imports every module of its folder (``pkgutil.iter_modules(__path__)``, the
method registry) counts all of them. The parent packages' ``__init__`` files that Python also
runs on the way (``backbones/__init__.py`` and the evaluator's catalog it re-exports) are not
followed unless an import names the package itself: they register and re-export, they do not
train. So a change of a loss, an architecture, an augmentation or the data generator changes
the hash, and a change of the leaderboard or of a protocol does not.

``versions`` are the libraries whose versions change trained weights (the kernels, the
architectures, decoding and the generators)."""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # ssl_eval/
ENTRY = ("train", "loop.py")  # the one training loop
# the libraries whose versions change the trained weights: kernels and generators (torch),
# the augmentations' roi_align and ResNet blocks (torchvision), the ViT and timm: architectures
# (timm), the data's permutations and splits (numpy), image decoding (pillow)
TRAINING_LIBRARIES = ("torch", "torchvision", "timm", "numpy", "pillow")


def _module_file(pkg_dir: Path, parts: list[str]) -> Path | None:
    """The file of module ``parts`` (relative to the package root ``pkg_dir``): ``a/b.py`` or
    the package ``a/b/__init__.py``; None when it is not in the package."""
    base = pkg_dir.joinpath(*parts) if parts else pkg_dir
    if parts and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _package_parts(pkg_dir: Path, path: Path) -> list[str]:
    """The package that module file ``path`` sits in, as parts relative to ``pkg_dir``."""
    return list(path.parent.relative_to(pkg_dir).parts)


def _imports(pkg_dir: Path, path: Path, source: str) -> set[Path]:
    """The files of the package's modules that ``source`` (the text of ``path``) imports."""
    name = pkg_dir.name
    here = _package_parts(pkg_dir, path)
    tree = ast.parse(source, filename=str(path))
    found: set[Path] = set()

    def add(parts: list[str], names: list[str] = ()) -> None:
        f = _module_file(pkg_dir, parts)
        if f is not None:
            found.add(f)
        for n in names:  # `from pkg import module`
            sub = _module_file(pkg_dir, [*parts, n]) if n != "*" else None
            if sub is not None:
                found.add(sub)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                mod = alias.name.split(".")
                if mod[0] == name:
                    add(mod[1:])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module.split(".") if node.module else []
            if node.level:
                up = node.level - 1
                if up > len(here):
                    continue  # beyond the package: not ssl_eval's
                base = here[: len(here) - up] if up else list(here)
                parts = [*base, *mod]
            elif mod and mod[0] == name:
                parts = mod[1:]
            else:
                continue
            add(parts, [a.name for a in node.names])
    if path.name == "__init__.py" and "iter_modules" in source:
        # a registry package that imports every module of its folder when it is imported
        found.update(p for p in path.parent.glob("*.py") if p != path)
    return found


def trainer_files(
    pkg_dir: Path = PACKAGE_DIR, read: Callable[[Path], bytes] | None = None
) -> list[Path]:
    """Every module file of the package reached from ``train/loop.py``, sorted."""
    read = read or Path.read_bytes
    start = pkg_dir.joinpath(*ENTRY)
    seen, todo = {start}, [start]
    while todo:
        f = todo.pop()
        for g in _imports(pkg_dir, f, read(f).decode("utf-8")):
            if g not in seen:
                seen.add(g)
                todo.append(g)
    return sorted(seen)


def source_fingerprint(
    pkg_dir: Path = PACKAGE_DIR, read: Callable[[Path], bytes] | None = None
) -> str:
    """sha256 (16 hex) over the files of ``trainer_files``, each its path relative to the
    package's parent and its contents, in sorted path order."""
    read = read or Path.read_bytes
    h = hashlib.sha256()
    for f in trainer_files(pkg_dir, read):
        h.update(f"{f.relative_to(pkg_dir.parent).as_posix()}\0".encode())
        h.update(read(f))
        h.update(b"\0")
    return h.hexdigest()[:16]


def training_library_versions() -> dict:
    from ..core.provenance import package_versions

    v = package_versions()
    return {n: v.get(n) for n in TRAINING_LIBRARIES}


@lru_cache(maxsize=1)
def _fingerprint() -> tuple[str, tuple]:
    return source_fingerprint(), tuple(training_library_versions().items())


def trainer_fingerprint() -> dict:
    """``{"source": sha256 of the code that trains (16 hex), "versions": {library: version}}``,
    computed once per process (a fresh dict each call)."""
    source, versions = _fingerprint()
    return {"source": source, "versions": dict(versions)}
