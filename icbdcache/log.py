"""Structured, quiet-by-default logging: one ``key=value`` line per event.

Every value goes through :func:`escape` (in :func:`kv`), so a value that came from the network
(an export name, a peer's error text, a URL path) cannot break a line in two or hide in control
characters: one event is one line, whatever a client sends. Any other log format renders
values through :func:`escape` too.

Refusals and errors that a peer can cause at will go through :class:`Throttled`: at most one
line a second per reason, with the count of the lines held back.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass


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


def _escapes() -> dict[int, str]:
    table: dict[int, str] = {ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r",
                             ord("\t"): "\\t"}
    for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]:
        table.setdefault(c, f"\\x{c:02x}")
    for c in (0x2028, 0x2029):  # line and paragraph separators: line breaks to some readers
        table[c] = f"\\u{c:04x}"
    return table


_ESCAPES = _escapes()


def escape(value: object) -> str:
    """``str(value)`` with a backslash, every control character (C0, DEL, C1) and the Unicode
    line separators written as escapes (``\\n``, ``\\x1b``, ``\\u2028``, ``\\\\``): printable,
    one line, and the original recoverable."""
    return str(value).translate(_ESCAPES)


def kv(**fields: object) -> str:
    """Render fields as ``k=v`` pairs, each value through :func:`escape`; values with spaces,
    quotes or ``=`` (or empty) are quoted."""
    parts = []
    for k, v in fields.items():
        s = escape(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)


@dataclass
class _Reason:
    """What a :class:`Throttled` stream keeps per reason."""

    next: float = 0.0  # monotonic time a line may be written again
    held: int = 0  # lines held back since the last one written
    message: str = ""  # the last one held back
    level: int = logging.WARNING


class Throttled:
    """A log stream that writes at most one line per ``interval`` seconds for each reason,
    so that a peer (or an outage) causing thousands of refusals or errors does not flood the
    log. A line written after others were held back ends with ``suppressed=N``: how many of
    that reason were held back since the previous line. When none follows, the last one held
    back is written at the end of the interval with the count of the others (needs a running
    event loop; otherwise the count rides on the next line of that reason). Reasons are fixed
    words of the code, never values from the network: each keeps a little state for as long
    as the stream lives."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        self._reasons: dict[str, _Reason] = {}
        #: Lines written and held back, all reasons together.
        self.written = 0
        self.held = 0

    def warning(self, message: str, reason: str = "") -> None:
        """``message`` at WARNING, throttled under ``reason``."""
        self.log(message, reason, logging.WARNING)

    def info(self, message: str, reason: str = "") -> None:
        """``message`` at INFO, throttled under ``reason``."""
        self.log(message, reason, logging.INFO)

    def log(self, message: str, reason: str = "", level: int | None = None) -> None:
        """Write ``message`` (a :func:`kv` line) at ``level`` (default: the stream's) unless a
        line of ``reason`` was written less than ``interval`` seconds ago."""
        lvl = self.level if level is None else level
        now = time.monotonic()
        r = self._reasons.get(reason)
        if r is None:
            r = self._reasons[reason] = _Reason()
        if now < r.next:
            if not r.held:
                self._later(reason, r.next, r.next - now)
            r.held += 1
            r.message, r.level = message, lvl
            self.held += 1
            return
        if r.held:
            message = f"{message} suppressed={r.held}"
        r.next, r.held, r.message = now + self.interval, 0, ""
        self.written += 1
        self.logger.log(lvl, message)

    def _later(self, reason: str, window: float, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(max(0.0, delay), self._flush, reason, window)

    def _flush(self, reason: str, window: float) -> None:
        """The interval of ``reason`` that ends at ``window`` ended with lines held back and
        none written since: write the last one held, with the count of the others. (A line
        written meanwhile started another interval, which has its own call.)"""
        r = self._reasons.get(reason)
        if r is None or not r.held or r.next != window:
            return
        others, message = r.held - 1, r.message
        r.next, r.held, r.message = time.monotonic() + self.interval, 0, ""
        self.written += 1
        self.held -= 1
        self.logger.log(r.level, f"{message} suppressed={others}" if others else message)
