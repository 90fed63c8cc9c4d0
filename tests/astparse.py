"""``ast.parse`` safe from CPython 3.11.7's garbage-collector bug: a finalizer that runs
while the AST is being built (an asyncio task of an earlier test collected then, and logged)
makes ``ast.parse`` raise ``SystemError: AST constructor recursion depth mismatch``
(python/cpython gh-106905, fixed in 3.11.8). Collecting is paused while parsing."""

from __future__ import annotations

import ast
import gc


def parse(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse(source, filename)`` with the garbage collector paused (and collected first,
    so that finalizers run before, not during, the parse). Raises SyntaxError as it does."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(source, filename=filename)
    finally:
        if was:
            gc.enable()
