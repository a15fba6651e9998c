"""The import graph of ``mofo/``: no module cycles, and packages import only lower layers.

Static: every ``.py`` under ``mofo/`` is parsed (nothing is imported), and every ``import
mofo...`` / ``from mofo... import ...`` (relative ones included) counts, also the lazy ones
inside functions, because a lazy import hides a cycle rather than removing it. ``from a.b
import c`` is an edge to the module ``a.b.c`` when that module exists, else to ``a.b``. A
package's ``__init__`` is a module of its own: importing ``a.b.c`` is not counted as importing
``a.b`` (every re-exporting ``__init__`` would otherwise be a cycle with its own modules).

The layers are the map in docs/ARCHITECTURE.md ("The package map").
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "mofo"

# A module may import modules of its own group and of lower layers only. The group of a module
# is the longest key below that is a prefix of its dotted name ("mofo" itself: only the root).
LAYERS: dict[str, int] = {
    "mofo": 0,  # the package root (version, docstring)
    "mofo.config": 0,
    "mofo.logs": 0,
    "mofo.paths": 0,  # the results layout: imports nothing of mofo
    "mofo.provenance": 0,
    "mofo.masking": 1,
    "mofo.recipe": 1,
    "mofo.tracking": 1,
    "mofo.stage_args": 1,
    "mofo.formats": 2,
    "mofo.models": 2,
    "mofo.data": 3,
    "mofo.viz": 3,
    "mofo.inputs": 4,
    "mofo.motion": 5,
    "mofo.runtime": 5,
    "mofo.training": 6,
    "mofo.evaluation": 7,
    "mofo.stages": 8,
    "mofo.bench": 9,
    "mofo.cli": 10,
}

# Edges that break a rule above on purpose, each with why and when it goes away. The test
# fails when one of them no longer exists, so that this list cannot go stale.
ALLOWED_EDGES: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__`` = package)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, dict[str, int]]:
    """``{importer: {imported: line}}`` over the modules of ``mofo`` (lazy imports included)."""
    modules = module_files()
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(name, node, is_package)
                if source is None:
                    continue
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in modules else source)
            for target in targets:
                if target.split(".")[0] != "mofo":
                    continue
                while target not in modules:  # ``import mofo.a.b.name``-style spellings
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest path from start back to start inside the component (breadth first).
        parents: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, {})):
                    if w not in members:
                        continue
                    if w == start:
                        found = v
                        break
                    if w not in parents:
                        parents[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v != start:
            path.append(v)
            v = parents[v]
        cycles.append([start] + path[1:][::-1] + [start])
    return cycles


def group_of(module: str) -> str | None:
    """The key of ``LAYERS`` that ``module`` belongs to (None: it has no layer yet)."""
    keys = [k for k in LAYERS if module == k or (k != "mofo" and module.startswith(k + "."))]
    return max(keys, key=len) if keys else None


def layer_of(module: str) -> tuple[str, int]:
    group = group_of(module)
    if group is None:
        raise KeyError(f"{module} has no layer in LAYERS")
    return group, LAYERS[group]


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    modules = module_files()
    steps = []
    for a, b in itertools.pairwise(cycle):
        rel = modules[a].relative_to(PACKAGE_DIR.parent)
        steps.append(f"{a} -> {b} ({rel}:{graph[a][b]})")
    return " ; ".join(steps)


def without_allowed(
    graph: dict[str, dict[str, int]], allowed: dict[tuple[str, str], str] = ALLOWED_EDGES
) -> dict[str, dict[str, int]]:
    return {
        a: {b: line for b, line in bs.items() if (a, b) not in allowed}
        for a, bs in graph.items()
    }


def layering_violations(
    graph: dict[str, dict[str, int]], allowed: dict[tuple[str, str], str] = ALLOWED_EDGES
) -> list[str]:
    """Every edge of ``graph`` to another group of the same or a higher layer, not allowed."""
    modules = module_files()
    bad = []
    for a, targets in sorted(graph.items()):
        group_a, layer_a = layer_of(a)
        for b, line in sorted(targets.items()):
            group_b, layer_b = layer_of(b)
            if group_a == group_b or (a, b) in allowed:
                continue
            if layer_b >= layer_a:
                rel = modules[a].relative_to(PACKAGE_DIR.parent)
                bad.append(
                    f"{a} (layer {layer_a}) imports {b} ({group_b}, layer {layer_b}) "
                    f"at {rel}:{line}"
                )
    return bad


def stale_allowed(
    graph: dict[str, dict[str, int]], allowed: dict[tuple[str, str], str] = ALLOWED_EDGES
) -> list[tuple[str, str]]:
    """The allowed edges that ``graph`` no longer has."""
    return [edge for edge in sorted(allowed) if edge[1] not in graph.get(edge[0], {})]


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # mofo.training.finetune imports load_pretrained inside run(): a lazy import.
    assert "mofo.models.checkpoint" in graph["mofo.training.finetune"]
    assert "mofo.masking.grid" in graph["mofo.masking"]  # a package __init__ re-exporting


def test_find_cycles_names_the_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles_inside_mofo():
    graph = import_graph()
    cycles = find_cycles(without_allowed(graph))
    assert not cycles, "import cycles in mofo/:\n" + "\n".join(
        _describe(graph, cycle) for cycle in cycles
    )


def test_every_module_has_a_layer():
    unplaced = [m for m in module_files() if group_of(m) is None]
    assert not unplaced, f"give these modules a layer in LAYERS (and docs): {unplaced}"


def test_packages_import_only_lower_layers():
    bad = layering_violations(import_graph())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_allowed_exceptions_are_still_needed():
    gone = stale_allowed(import_graph())
    assert not gone, f"no longer imported, remove from ALLOWED_EDGES: {gone}"


def test_allowed_edges_lift_their_rule_and_go_stale_when_the_import_goes():
    """The ALLOWED_EDGES logic on a made-up graph (the real list is empty): an allowed edge
    lifts the layering rule and breaks a cycle for that edge only, and one that the graph no
    longer has is reported."""
    up = ("mofo.models.vit", "mofo.training.engine")  # layer 2 -> layer 4
    graph = {up[0]: {up[1]: 7, "mofo.config": 3}, up[1]: {up[0]: 9}}
    allowed = {up: "made up"}
    assert len(layering_violations(graph, {})) == 1
    assert "mofo.models.vit (layer 2) imports mofo.training.engine" in (
        layering_violations(graph, {})[0]
    )
    assert layering_violations(graph, allowed) == []
    assert find_cycles(without_allowed(graph, {})) != []
    assert find_cycles(without_allowed(graph, allowed)) == []
    assert stale_allowed(graph, allowed) == []
    assert stale_allowed({up[0]: {"mofo.config": 3}}, allowed) == [up]
    assert stale_allowed({}, {**allowed, ("mofo.cli", "mofo.stages"): "why"}) == [
        ("mofo.cli", "mofo.stages"), up]
