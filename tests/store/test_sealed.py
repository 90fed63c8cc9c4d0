"""The store is sealed: ``lmdb`` is imported only under ``icbdcache/store/``.

Every ``.py`` file of the project's packages is parsed with :mod:`ast` and every import is
counted, at module level or inside a function, class or ``if TYPE_CHECKING`` block, and so are
``importlib.import_module("lmdb")`` and ``__import__("lmdb")`` with a literal name. Code
elsewhere uses the :class:`~icbdcache.store.Store` methods, which raise StoreError for LMDB's
failures.
"""

from __future__ import annotations

import ast

from astparse import parse
from conftest import REPO

PACKAGES = ("nbd", "icbdcache", "pxe", "bench")
SEALED = "icbdcache/store/"
SEALED_MODULE = "lmdb"


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module name) of every import in ``source``, wherever it is in the file."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                out.append((node.lineno, arg.value))
    return out


def imports_of(module: str) -> list[str]:
    """``path:line`` of every import of ``module`` (or a submodule) in the project's
    packages."""
    hits = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for line, name in imported_modules(path.read_text()):
                if name == module or name.startswith(module + "."):
                    hits.append(f"{path.relative_to(REPO).as_posix()}:{line}")
    return hits


def test_finder_counts_imports_anywhere() -> None:
    """The walker sees an import at module level, inside a function, a method and a
    conditional, ``from`` imports of a submodule, and import_module calls."""
    source = (
        "import os, lmdb\n"
        "def f():\n"
        "    import lmdb\n"
        "class C:\n"
        "    def m(self):\n"
        "        from lmdb.cffi import Environment\n"
        "if False:\n"
        "    from lmdb import Error\n"
        "import importlib\n"
        "importlib.import_module('lmdb')\n"
        "__import__('lmdb')\n"
        "import lmdbx\n"
        "from . import lmdb\n"
    )
    found = sorted(line for line, name in imported_modules(source)
                   if name == "lmdb" or name.startswith("lmdb."))
    assert found == [1, 3, 6, 8, 10, 11]  # not lmdbx (line 12), not a relative import (13)


def test_lmdb_is_imported_only_in_the_store() -> None:
    hits = imports_of(SEALED_MODULE)
    inside = [h for h in hits if h.startswith(SEALED)]
    outside = [h for h in hits if not h.startswith(SEALED)]
    # the walk reaches the store itself (else it would find nothing anywhere and pass)
    assert any(h.startswith(SEALED + "lmdbstore.py:") for h in inside), hits
    assert outside == [], f"lmdb imported outside {SEALED}: {outside}"


def test_every_package_is_walked() -> None:
    """Each package has Python files for the walk to read (a renamed package would make the
    seal check silently smaller)."""
    for pkg in PACKAGES:
        assert any((REPO / pkg).rglob("*.py")), pkg
