"""Structured, quiet-by-default logging: one line per event, as ``key=value`` text or JSON.

Code logs ``log.info(kv(event="connect", conn=3, peer=...))``: :func:`kv` renders the fields
as ``k=v`` text and keeps them (:class:`Fields`), so :class:`EventFormatter` can write the same
line as text or as one JSON object (``--log-format json``). Every line carries an ``event``
key (a call that names none gets its first field's name, or ``message`` for plain text), a
timezone-aware timestamp (ISO 8601 with the UTC offset), the level and the logger's name.

Every value is escaped in both formats, from one table (:func:`escape` in :func:`kv` for text,
:func:`json_line` for JSON, lossless there), so a value that came from the network (an export
name, a peer's error text, a URL path) cannot break a line in two or hide in control
characters: one event is one line, whatever a client sends.

Refusals and errors that a peer can cause at will go through :class:`Throttled`: at most one
line a second per reason, with the count of the lines held back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: The formats of ``--log-format``.
FORMATS = ("text", "json")


class Fields(str):
    """The text of :func:`kv` with the fields it was made of (``fields``)."""

    fields: dict[str, object]

    def __new__(cls, text: str, fields: dict[str, object]) -> Fields:
        obj = super().__new__(cls, text)
        obj.fields = fields
        return obj


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
    quotes or ``=`` (or empty) are quoted. The result is a :class:`Fields` (a str) that keeps
    ``fields`` (unescaped) for the JSON format."""
    parts = []
    for k, v in fields.items():
        s = escape(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return Fields(" ".join(parts), dict(fields))


def _json_value(v: object) -> object:
    if v is None or isinstance(v, bool | int | float):
        return v
    return str(v)


#: What ``json.dumps(..., ensure_ascii=False)`` leaves raw of what :func:`escape` escapes
#: (DEL, C1 controls, the Unicode line separators), as JSON escapes: lossless, since a JSON
#: reader decodes them; json.dumps escapes the C0 controls, quotes and backslashes itself.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _ESCAPES if c >= 0x7F}


def json_line(obj: dict[str, object]) -> str:
    """``obj`` as one line of JSON: every control character and line separator in its
    strings written as a JSON escape (the JSON format's counterpart of :func:`escape`)."""
    return json.dumps(obj, ensure_ascii=False).translate(_JSON_ESCAPES)


class EventFormatter(logging.Formatter):
    """One line per record: ``fmt`` ``text`` (``TIME LEVEL LOGGER [pid=N] event=E k=v ...``)
    or ``json`` (``{"ts", "level", "logger", ["pid",] "event", ...fields}``); an exception's
    traceback follows the text line, or is the ``exc`` field in JSON. ``pid``: add the
    process id (worker processes of ``serve --workers``). ``journal``: stderr goes to the
    journal (:func:`journald`): text lines start with the syslog priority (``<6>``, which
    journald reads as the line's priority) instead of a time, which journald adds itself."""

    def __init__(self, fmt: str = "text", *, pid: bool = False, journal: bool = False) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.json = fmt == "json"
        self.pid = pid
        self.journal = journal

    @staticmethod
    def fields(record: logging.LogRecord) -> dict[str, object]:
        """The record's fields with ``event`` first."""
        msg = record.msg
        if isinstance(msg, Fields) and not record.args:
            fields = dict(msg.fields)
            event = fields.pop("event", None)
            if event is None:
                event = next(iter(fields), "message")
            return {"event": event, **fields}
        return {"event": "message", "msg": record.getMessage()}

    @staticmethod
    def timestamp(created: float) -> str:
        """``created`` (seconds since the epoch) as local ISO 8601 time with its offset,
        to the millisecond."""
        return datetime.fromtimestamp(created, UTC).astimezone().isoformat(
            timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        fields = self.fields(record)
        exc = self.formatException(record.exc_info) if record.exc_info else ""
        if self.json:
            head: dict[str, object] = {"ts": self.timestamp(record.created),
                                       "level": record.levelname.lower(),
                                       "logger": record.name}
            if self.pid:
                head["pid"] = record.process
            out = {**head, **{k: _json_value(v) for k, v in fields.items()}}
            if exc:
                out["exc"] = exc
            return json_line(out)
        pid = f" pid={record.process}" if self.pid else ""
        stamp = (f"<{_PRIORITY.get(record.levelno, 6)}>" if self.journal
                 else self.timestamp(record.created) + " ")
        line = f"{stamp}{record.levelname} {record.name}{pid} {kv(**fields)}"
        return f"{line}\n{exc}" if exc else line


#: syslog priorities of the logging levels (sd-daemon(3)).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

_format = "text"
#: this process is a worker of ``serve --workers`` (:func:`tag_process`): its lines say pid=N,
#: also after :func:`setup` is called again (SIGHUP)
_tagged = False


def setup(verbosity: int = 0, fmt: str = "text") -> None:
    """Configure the root logger on stderr. ``verbosity``: -1 warnings only, 0 info (one line
    per connection), 1 debug. ``fmt``: ``text`` or ``json`` (:class:`EventFormatter`).
    Raises ValueError for another format."""
    global _format
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(fmt, pid=_tagged, journal=journald()))
    _format = fmt
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def tag_process() -> None:
    """Put ``pid=N`` in every log line (worker processes of ``serve --workers``)."""
    global _tagged
    _tagged = True
    for h in logging.getLogger().handlers:
        h.setFormatter(EventFormatter(_format, pid=True, journal=journald()))


def current_format() -> str:
    """The format :func:`setup` was last called with."""
    return _format


def journald() -> bool:
    """Whether stderr goes to the journal (systemd sets ``JOURNAL_STREAM`` to its device
    and inode): journald then stamps each line itself."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


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
        """``message`` at the stream's level (WARNING unless given), throttled under
        ``reason``."""
        self.log(message, reason)

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
            message = _with(message, suppressed=r.held)
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
        self.logger.log(r.level, _with(message, suppressed=others) if others else message)


def _with(message: str, **more: Any) -> str:
    """``message`` with more fields (a :class:`Fields` stays one)."""
    if isinstance(message, Fields):
        return kv(**message.fields, **more)
    return f"{message} {kv(**more)}"
