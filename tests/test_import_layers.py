"""The package's rooms import one way: each room may import only the rooms below it, and no
set of modules imports itself round in a circle. The imports are read from the source with
``ast`` (imports inside functions and under TYPE_CHECKING included: a lazy import that runs
back up is still a dependency), so a new module or a moved import is checked without running
anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ssl_eval"

# the flow, bottom to top (CONTRIBUTING.md, "Where a change goes"); rooms on one level do not
# import each other
LAYERS = [
    {"core"},  # errors, config, registry, runtime, provenance, stats, files, distributed
    {"data"},
    {"backbones"},
    {"features"},
    {"protocols"},
    {"records", "train"},  # records read protocol outputs; the trainer uses the k-NN search
    {"report"},  # everything that reads records: leaderboard, gate, findings, the report
    {"orchestrate"},  # evaluate, sweep, suite
    {"commands"},
    {"cli"},
    {"__main__"},
]
LEVEL = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the ssl_eval modules it imports (a name imported from a package resolves to
    the submodule when one of that name exists, else to the package)."""
    edges: dict[str, set[str]] = {}
    for mod, f in mods.items():
        pkg = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(
                        pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])
                    )
                else:
                    base = node.module or ""
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in mods else base)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        resolved = set()
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t.startswith("ssl_eval") and t != mod:
                resolved.add(t)
        edges[mod] = resolved
    return edges


def _room(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (__version__ only)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _upward(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in edges.items():
        a = _room(mod)
        for t in targets:
            b = _room(t)
            if a is None or b is None or a == b:
                continue
            if a not in LEVEL or b not in LEVEL:
                bad.append(f"{mod} -> {t}: room {a if a not in LEVEL else b} has no layer")
            elif LEVEL[b] >= LEVEL[a]:
                bad.append(f"{mod} -> {t}: {a} (layer {LEVEL[a]}) imports {b} (layer {LEVEL[b]})")
    return sorted(bad)


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms <= set(LEVEL), f"rooms without a layer in LAYERS: {sorted(rooms - set(LEVEL))}"


@pytest.mark.slow
def test_no_import_circles():
    assert _cycles(_imports(_modules())) == []


@pytest.mark.slow
def test_no_import_runs_back_up():
    assert _upward(_imports(_modules())) == []


@pytest.mark.parametrize(
    "files, expect",
    [
        # a lazy circle, as knn_search.py <-> knn_gpu.py once was
        (
            {"core/a.py": "def f():\n    from .b import g\n", "core/b.py": "from .a import f\n"},
            "cycle",
        ),
        # a layer violation: core importing the records
        ({"core/x.py": "from ..records.y import z\n", "records/y.py": "z = 1\n"}, "upward"),
        ({"core/x.py": "z = 1\n", "records/y.py": "from ..core.x import z\n"}, None),
    ],
)
def test_the_checks_fail_on_the_defects_they_name(tmp_path, files, expect):
    root = tmp_path / "ssl_eval"
    for name, text in {"__init__.py": "", **files}.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.parent / "__init__.py").touch()
        p.write_text(text)
    edges = _imports(_modules(root))
    assert bool(_cycles(edges)) == (expect == "cycle")
    assert bool(_upward(edges)) == (expect == "upward")
