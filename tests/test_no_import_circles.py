"""No import circles among the project's own modules (``nbd``, ``icbdcache``, ``pxe``,
``bench``).

Every ``.py`` file is read with :mod:`ast`, so every import counts: at the top, inside
functions, under ``if TYPE_CHECKING:``. An import names the project module it loads:
``import a.b`` and ``from a.b import name`` give ``a.b``; ``from a import b`` gives ``a.b`` when
``b`` is a module of ``a`` (a file or a package), else ``a``; relative imports are resolved
against the importing module's package. Parent packages that Python runs on the way (the
``__init__.py`` files) are not counted as edges of their own.

A circle is a strongly connected component of that graph with more than one module; the test
fails naming one cycle through each component, as ``a -> b -> a``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from astparse import parse
from conftest import REPO

#: The top-level packages of the project.
PACKAGES = ("nbd", "icbdcache", "pxe", "bench")

def module_name(path: Path, root: Path) -> str:
    """``icbdcache/replication/registry/base.py`` -> ``icbdcache.replication.registry.base``;
    a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of :data:`PACKAGES` under ``root``: dotted name -> file."""
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            found[module_name(path, root)] = path
    return found


def _package_of(module: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported(module: str, path: Path, modules: set[str]) -> set[str]:
    """The project modules that ``module`` (its file ``path``) imports, anywhere in it."""
    tree = parse(path.read_text(), filename=str(path))
    out: set[str] = set()

    def nearest(name: str) -> str | None:
        """``name`` itself if it is a project module, else its longest prefix that is."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = nearest(alias.name)
                if target is not None:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module, path)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = sub if sub in modules else nearest(source)
                if target is not None:
                    out.add(target)
    out.discard(module)
    return out


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    mods = project_modules(root)
    names = set(mods)
    return {m: imported(m, p, names) for m, p in mods.items()}


def components(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    members: set[str] = set()
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        members.add(m)
                        if m == node:
                            break
                    if len(members) > 1:
                        found.append(frozenset(members))
    return found


def one_cycle(graph: dict[str, set[str]], members: Iterable[str]) -> list[str]:
    """A cycle through a component, as a path that ends where it starts."""
    inside = set(members)
    start = min(inside)
    seen = {start: start}
    queue = [start]
    while queue:  # breadth first from start, inside the component, back to start
        node = queue.pop(0)
        for nxt in sorted(graph[node] & inside):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(seen[path[-1]])
                return [*reversed(path), start]
            if nxt not in seen:
                seen[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no cycle through {sorted(inside)}")


def describe(graph: dict[str, set[str]], members: Iterable[str]) -> str:
    """One cycle of a component, and the component's modules when it has more."""
    inside = sorted(members)
    cycle = one_cycle(graph, inside)
    more = f" (circle of {', '.join(inside)})" if len(inside) > len(cycle) - 1 else ""
    return " -> ".join(cycle) + more


# ------------------------------------------------------------------ the walker itself


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """Imports inside functions and TYPE_CHECKING blocks, relative ones, and ``from pkg import
    module`` all make edges; a circle among them is found and named."""
    pkg = tmp_path / "icbdcache"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "b.py": "def f() -> None:\n    from icbdcache.sub import c\n",
        "sub/__init__.py": "from .. import a as _a  # noqa\n",
        "sub/c.py": "import icbdcache.a\nimport os\n",
        "d.py": "from icbdcache import a\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["icbdcache.a"] == {"icbdcache.b"}
    assert graph["icbdcache.b"] == {"icbdcache.sub.c"}
    assert graph["icbdcache.sub"] == {"icbdcache.a"}
    assert graph["icbdcache.sub.c"] == {"icbdcache.a"}
    assert graph["icbdcache.d"] == {"icbdcache.a"}
    [circle] = components(graph)
    assert circle == {"icbdcache.a", "icbdcache.b", "icbdcache.sub.c"}
    assert describe(graph, circle) == \
        "icbdcache.a -> icbdcache.b -> icbdcache.sub.c -> icbdcache.a"


# ------------------------------------------------------------------ the project


def test_no_import_circles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "icbdcache.server" in graph  # the walk found the project
    found = [describe(graph, c) for c in components(graph)]
    assert not found, "import circles:\n" + "\n".join(found)
