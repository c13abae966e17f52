"""The project's import graph: no cycles, and the layers import only downwards.

Every .py of the installed packages is parsed (not imported), its module name taken from
pyproject.toml's package-dir mapping (edge_client/ installs as gefl.edge_client, ...). Every
import statement counts: at module level, inside functions, under `if TYPE_CHECKING:`, since
a cycle through a lazy import is still one the next refactoring can turn into a crash.
`from pkg import name` imports the module pkg.name when there is one, else pkg.

Layers: gefl's core (every gefl.* module except gefl.cli and the three packages below) never
imports gefl.edge_client, gefl.aggregator, gefl.export or gefl.cli; those three never import
gefl.cli, the command line on top of everything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = "gefl"

SERVICE_PACKAGES = ("gefl.edge_client", "gefl.aggregator", "gefl.export")
CLI = "gefl.cli"


def package_dirs() -> dict[str, Path]:
    """Package name -> its source folder, as pyproject.toml installs them."""
    import tomllib  # Python 3.11+; the test runs under the project's own interpreter

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / folder for name, folder in config.get("package-dir", {}).items()}
    for name in config["packages"]:  # the rest live where their name says (gefl.generators: gefl/generators)
        dirs.setdefault(name, ROOT / Path(*name.split(".")))
    return dirs


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py of every installed package."""
    modules: dict[str, Path] = {}
    dirs = package_dirs()
    for package, folder in dirs.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.name == "__init__.py" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _known(name: str, modules: Iterable[str]) -> str | None:
    """`name` if it is one of ours, else its longest prefix that is; None for other distributions."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> list[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: list[Edge] = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.append(submodule if submodule in modules else base)
        for target in targets:
            resolved = _known(target, modules)
            if resolved is None or resolved == module:
                continue
            edges.append(Edge(module, resolved, path, node.lineno))
            # Importing a.b.c runs a/b/__init__.py first: an edge to each package above the target,
            # except the packages this module sits in (those are already being imported).
            parts = resolved.split(".")
            for end in range(1, len(parts)):
                parent = ".".join(parts[:end])
                if parent in modules and parent != module and not module.startswith(parent + "."):
                    edges.append(Edge(module, parent, path, node.lineno))
    return edges


def import_graph() -> dict[str, dict[str, list[Edge]]]:
    """module -> imported module -> the import statements that do it."""
    files = module_files()
    names = set(files)
    graph: dict[str, dict[str, list[Edge]]] = {m: {} for m in files}
    for module, path in files.items():
        for edge in imports_of(module, path, names):
            graph[module].setdefault(edge.target, []).append(edge)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[Edge]]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def a_cycle(graph: dict[str, dict[str, list[Edge]]], component: list[str]) -> list[Edge]:
    """One cycle through the component's first module, as the import statements that close it."""
    members = set(component)
    start = component[0]
    # breadth-first from start back to start, inside the component: the shortest such cycle
    previous: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target not in members:
                    continue
                edge = graph[node][target][0]
                if target == start:
                    cycle = [edge]
                    while cycle[0].source != start:
                        cycle.insert(0, previous[cycle[0].source])
                    return cycle
                if target not in previous:
                    previous[target] = edge
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle found in component {component}")  # cannot happen for an SCC


def describe_cycle(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source, *(e.target for e in cycle)])
    steps = "; ".join(f"{e.source} imports {e.target} at {e.where()}" for e in cycle)
    return f"{chain} ({steps})"


def layering_violations(graph: dict[str, dict[str, list[Edge]]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        in_service = any(within(module, p) for p in SERVICE_PACKAGES)
        if module == CLI:
            continue
        forbidden = (CLI,) if in_service else (*SERVICE_PACKAGES, CLI)
        layer = "edge_client/aggregator/export" if in_service else "gefl core"
        for target, edges in sorted(targets.items()):
            for banned in forbidden:
                if within(target, banned):
                    for edge in edges:
                        problems.append(f"{module} ({layer}) imports {target} at {edge.where()}: "
                                        f"{layer} must not import {banned}")
    return problems


# --------------------------------------------------------------------------- the tests

GRAPH = import_graph()


def test_the_graph_sees_the_whole_project():
    """Guards the test itself: the mapping found the packages and the imports resolve."""
    assert {"gefl.config", "gefl.generators.cvae", "gefl.edge_client.transport", "gefl.aggregator.coordinator",
            "gefl.export.infer", CLI} <= set(GRAPH)
    assert "gefl.generators.base" in GRAPH["gefl.generators.cvae"]
    assert "gefl.edge_client.transport" in GRAPH["gefl.edge_client.grpc_transport"]
    connect = GRAPH["gefl.edge_client.connect"]
    assert "gefl.protocol.mqtt" in connect and "gefl" not in connect  # `from gefl.protocol import mqtt`
    assert "gefl.edge_client.grpc_transport" in connect  # an import inside a function counts


def test_no_import_cycles():
    cycles = [f"{describe_cycle(a_cycle(GRAPH, c))}; modules on cycles with these: {', '.join(c)}"
              for c in strongly_connected(GRAPH)]
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_layers_import_only_downwards():
    problems = layering_violations(GRAPH)
    assert not problems, "layering violations:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- the checker's own checks

def _graph(edges: dict[str, list[str]]) -> dict[str, dict[str, list[Edge]]]:
    here = Path(__file__)
    return {m: {t: [Edge(m, t, here, 1)] for t in ts} for m, ts in edges.items()}


def test_the_checker_finds_a_cycle_and_names_it():
    graph = _graph({"gefl.a": ["gefl.b"], "gefl.b": ["gefl.c"], "gefl.c": ["gefl.a", "gefl.d"], "gefl.d": []})
    (component,) = strongly_connected(graph)
    assert component == ["gefl.a", "gefl.b", "gefl.c"]
    assert describe_cycle(a_cycle(graph, component)).startswith("gefl.a -> gefl.b -> gefl.c -> gefl.a (")
    assert strongly_connected(_graph({"gefl.a": ["gefl.b"], "gefl.b": []})) == []


@pytest.mark.parametrize(("source", "target", "bad"), [
    ("gefl.simulation", "gefl.aggregator.serve", True),
    ("gefl.data", "gefl.cli", True),
    ("gefl.edge_client.runtime", "gefl.cli", True),
    ("gefl.aggregator.serve", "gefl.simulation", False),
    ("gefl.cli", "gefl.export.infer", False),
    ("gefl.export.infer", "gefl.edge_client.probe", False),
])
def test_the_checker_knows_the_layers(source, target, bad):
    assert bool(layering_violations(_graph({source: [target], target: []}))) is bad


def test_relative_and_from_imports_resolve(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("from . import sibling\nfrom .sibling import thing\nfrom gefl.pkg import CONSTANT\n"
                    "def f():\n    import gefl.pkg.deep.other\n")
    modules = {"gefl.pkg", "gefl.pkg.mod", "gefl.pkg.sibling", "gefl.pkg.deep"}
    assert [e.target for e in imports_of("gefl.pkg.mod", path, modules)] == [
        "gefl.pkg.sibling", "gefl.pkg.sibling", "gefl.pkg", "gefl.pkg.deep"]


def test_no_two_modules_define_a_class_of_one_name():
    """Two classes of one name (there were two DeviceProfiles, one in bytes, one in MB) make every
    reader ask which one a function takes."""
    defined: dict[str, list[str]] = {}
    for module, path in module_files().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                defined.setdefault(node.name, []).append(module)
    assert not {name: where for name, where in defined.items() if len(where) > 1}
