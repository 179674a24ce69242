"""Imports run one way: the layers of the house, checked by walking the package's imports with ``ast``.

``cli -> report -> {api, compare, plan, diagnose, apply, gate} -> prepare -> {engines,
optimizations, recipes} -> {workload, models, profile, ... the data and step mechanics} ->
{units, errors, choices}``. A module may import its own layer or a lower one, never a
higher one (module level or inside a function), and module-level imports have no cycle.
The lazy package face (``memprof/__init__.py``) is the one exception: it names the
public API of every layer, and imports none of it until asked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "memprof"

#: (layer, module prefixes), lowest first; a module's layer is that of its longest matching prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "memprof._version",
            "memprof.errors",
            "memprof.files",
            "memprof.units",
            "memprof.choices",
            "memprof.gcpause",
        ),
    ),
    (
        "data",
        (
            "memprof.allocator_model",
            "memprof.gpus",
            "memprof.budget",
            "memprof.profile",
            "memprof.models",
            "memprof.model_config",
            "memprof.bounds",
            "memprof.inputs",
            "memprof.data",
            "memprof.workload",
            "memprof.tracking",
            "memprof.snapshot",
            "memprof.chunked",
            "memprof.distill_loss",
            "memprof.surgery",
            "memprof.sharding",
        ),
    ),
    ("engines and optimizations", ("memprof.engines", "memprof.optimizations", "memprof.recipes")),
    ("preparation", ("memprof.prepare",)),
    (
        "commands",
        (
            "memprof.api",
            "memprof.compare",
            "memprof.plan",
            "memprof.diagnose",
            "memprof.apply",
            "memprof.gate",
            "memprof.pytest_plugin",
        ),
    ),
    ("report", ("memprof.report",)),
    ("cli", ("memprof.cli", "memprof.clihelp", "memprof.__main__")),
]
FACE = "memprof"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    best, rank = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    return rank


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool, int]]:
    """(imported memprof module, at module level?, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = set()
    for node in tree.body:
        top.add(id(node))
        if isinstance(node, ast.If):  # TYPE_CHECKING blocks: never run
            for sub in node.body:
                top.add(("type", id(sub)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        if ("type", id(node)) in top:
            continue  # under `if TYPE_CHECKING:`
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != FACE:
                out.append((t, id(node) in top, node.lineno))
    return out


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != FACE and layer(m) < 0]
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"


def test_no_upward_import():
    mods = modules()
    known = set(mods)
    upward = []
    for name, path in mods.items():
        if name == FACE:
            continue
        for target, _, line in imports(name, path, known):
            if layer(target) > layer(name):
                upward.append(
                    f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({LAYERS[layer(name)][0]}) imports "
                    f"{target} ({LAYERS[layer(target)][0]})"
                )
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle_at_module_level():
    mods = modules()
    known = set(mods)
    edges = {
        name: {t for t, at_top, _ in imports(name, path, known) if at_top}
        for name, path in mods.items()
        if name != FACE
    }
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt) :], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("bad", ["memprof.cli.analyze"])
def test_the_check_sees_an_upward_import(bad):
    # the checker itself: a data-layer module importing the CLI is caught
    assert layer(bad) > layer("memprof.workload")
