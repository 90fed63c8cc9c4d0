"""Structured, quiet-by-default logging: one ``key=value`` line per event."""

from __future__ import annotations

import logging
import sys
import time


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


def tag_process() -> None:
    """Put ``pid=N`` in every log line (worker processes of ``serve --workers``)."""
    for h in logging.getLogger().handlers:
        h.setFormatter(logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s pid=%(process)d %(message)s",
            "%Y-%m-%dT%H:%M:%S"))


def kv(**fields: object) -> str:
    """Render fields as ``k=v`` pairs; values with spaces are quoted."""
    parts = []
    for k, v in fields.items():
        s = str(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)


class Throttled:
    """A warning stream that logs at most one line per ``interval`` seconds and says how many
    it held back, so an outage that fails thousands of requests does not flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message = f"{message} suppressed={self._held}"
            self._held = 0
        self._next = now + self.interval
        self.logger.warning(message)
