"""The shape of podtrain's import graph: no cycles in sdk/ or entrypoint/, and private modules stay private.

The graph is read from the source with :mod:`ast`, not by importing: every ``import`` and ``from ... import``
anywhere in a module counts (at the top, inside a function, in a ``try``), since a lazy import that closes a cycle
still makes the order of first use matter. ``from pkg import name`` is an edge to ``pkg.name`` when that is a
module, else to ``pkg``; relative imports are resolved against the importing module's package;
``importlib.import_module("literal")`` counts too. Imports under ``if TYPE_CHECKING:`` never run and do not count.
Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implied edges are left out, as every
import checker does, or each package that imports its own modules would be a cycle.

A private module (``_name``) belongs to the package that holds it: ``sdk.stores._s3`` may be imported by
``sdk.stores`` and the modules under it, never by ``sdk.run`` or ``entrypoint``. Tests are not checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sdk", "entrypoint")

Graph = dict[str, set[str]]


def modules_under(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``: dotted name -> file (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every import statement and ``importlib.import_module("...")`` call, skipping ``if TYPE_CHECKING:`` bodies."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant):
                yield node
        stack.extend(ast.iter_child_nodes(node))


def _known(name: str, known: Mapping[str, Path]) -> str | None:
    """``name`` or its longest prefix that is a module of the graph; None when it is outside it."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The modules of the graph that ``module`` (at ``path``) imports, resolved as described in this file's doc."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            assert isinstance(node, ast.Call) and isinstance(node.args[0], ast.Constant)
            names = [str(node.args[0].value)]
        targets.update(t for t in (_known(name, known) for name in names) if t is not None)
    targets.discard(module)
    return targets


def import_graph(root: Path, packages: Iterable[str]) -> Graph:
    """module -> the modules of ``packages`` it imports."""
    known = modules_under(root, packages)
    return {module: imports_of(module, path, known) for module, path in known.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) for each group of modules that import each other (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(start: str) -> None:  # iterative: no recursion limit on a deep graph
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph.get(step, ())))))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: Mapping[str, set[str]]) -> list[str]:
    """The shortest cycle through the group's first module, by breadth-first search inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for step in sorted(graph[node] & group):
                if step == start:
                    return [*paths[node], start]
                if step not in paths:
                    paths[step] = [*paths[node], step]
                    following.append(step)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")  # pragma: no cover - Tarjan's says so


def private_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """``"importer -> target"`` for each import of a private module from outside the package that holds it."""
    found = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if importer != owner and not importer.startswith(owner + "."):
                        found.append(f"{importer} -> {target} (private to {owner})")
                    break
    return found


# -- podtrain's own graph ------------------------------------------------------------------------------------


def test_sdk_and_entrypoint_have_no_import_cycle() -> None:
    """No module of sdk/ or entrypoint/ reaches itself through its imports, lazy ones included."""
    found = cycles(import_graph(ROOT, PACKAGES))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_private_modules_are_imported_only_inside_their_package() -> None:
    """``pkg._x`` is imported by ``pkg`` and the modules under it only."""
    found = private_violations(import_graph(ROOT, PACKAGES))
    assert not found, "private modules imported from outside their package:\n" + "\n".join(found)


def test_the_graph_sees_podtrain_s_own_lazy_and_from_imports() -> None:
    """A check of the reader on the real tree: the console script's lazy import of the CLI, and a ``from package
    import module`` resolved to the module."""
    graph = import_graph(ROOT, PACKAGES)
    assert "entrypoint.cli" in graph["entrypoint.early"]  # inside main()
    assert "sdk.redaction" in graph["entrypoint.cli"]  # from sdk import redaction
    assert "sdk.outcomes" in graph["entrypoint.supervisor"]


# -- the checks themselves, on a made-up tree ------------------------------------------------------------------


def _tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_closed_by_a_function_level_import_is_found(tmp_path: Path) -> None:
    """a imports b at the top; b imports a inside a function: a cycle, printed as a path."""
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg import b\n",
            "pkg/b.py": "def f():\n    from pkg.a import thing\n",
            "pkg/c.py": "import pkg.a\n",
        },
    )
    assert cycles(import_graph(root, ["pkg"])) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_relative_imports_and_import_module_calls_are_edges(tmp_path: Path) -> None:
    """``from . import x``, ``from ..y import z`` and ``importlib.import_module("...")`` resolve to modules."""
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "from . import x\n",
            "pkg/sub/x.py": "from ..y import z\n",
            "pkg/y.py": "import importlib\n\ndef f():\n    importlib.import_module('pkg.sub')\n",
        },
    )
    graph = import_graph(root, ["pkg"])
    assert graph["pkg.sub"] == {"pkg.sub.x"} and graph["pkg.sub.x"] == {"pkg.y"} and graph["pkg.y"] == {"pkg.sub"}
    assert cycles(graph) == [["pkg.sub", "pkg.sub.x", "pkg.y", "pkg.sub"]]


def test_type_checking_imports_are_not_edges(tmp_path: Path) -> None:
    """An import only the type checker runs closes no cycle."""
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "import pkg.b\n",
            "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import A\n",
        },
    )
    assert cycles(import_graph(root, ["pkg"])) == []


def test_a_private_module_imported_from_another_package_is_a_violation(tmp_path: Path) -> None:
    """``pkg.stores._s3`` from ``pkg.run`` is reported; from ``pkg.stores.store`` and ``pkg.stores`` it is not."""
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/run.py": "from pkg.stores import _s3\n",
            "pkg/stores/__init__.py": "from pkg.stores._s3 import S3\n",
            "pkg/stores/store.py": "from ._s3 import S3\n",
            "pkg/stores/_s3.py": "",
            "pkg/_util.py": "",
            "pkg/stores/x.py": "import pkg._util\n",
        },
    )
    assert private_violations(import_graph(root, ["pkg"])) == ["pkg.run -> pkg.stores._s3 (private to pkg.stores)"]


@pytest.mark.parametrize("text", ["import pkg.b\n", "from pkg.b import f\n", "from pkg import b\n"])
def test_each_spelling_of_an_import_is_an_edge(tmp_path: Path, text: str) -> None:
    """``import pkg.b``, ``from pkg.b import f`` and ``from pkg import b`` each make pkg.a depend on pkg.b."""
    root = _tree(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": text, "pkg/b.py": "def f():\n    pass\n"})
    assert import_graph(root, ["pkg"])["pkg.a"] == {"pkg.b"}
