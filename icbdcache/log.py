"""Structured, quiet-by-default logging: one ``key=value`` line per event."""

from __future__ import annotations

import logging
import sys


def setup(verbosity: int = 0) -> None:
    """Configure the root logger on stderr. ``verbosity``: -1 warnings only, 0 info (one line
    per connection), 1 debug."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s",
                          "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def kv(**fields: object) -> str:
    """Render fields as ``k=v`` pairs; values with spaces are quoted."""
    parts = []
    for k, v in fields.items():
        s = str(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)
