"""Structured, quiet-by-default logging: one line per event, as ``key=value`` text or JSON.

Code logs ``log.info(kv(event="connect", conn=3, peer=...))``: :func:`kv` renders the fields
as ``k=v`` text and keeps them (:class:`Fields`), so :class:`EventFormatter` can write the same
line as text or as one JSON object (``--log-format json``). Every line carries an ``event``
key (a call that names none gets its first field's name, or ``message`` for plain text), a
timezone-aware timestamp (ISO 8601 with the UTC offset), the level and the logger's name.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
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


def kv(**fields: object) -> str:
    """Render fields as ``k=v`` pairs; values with spaces are quoted. The result is a
    :class:`Fields` (a str) that keeps ``fields`` for the JSON format."""
    parts = []
    for k, v in fields.items():
        s = str(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return Fields(" ".join(parts), dict(fields))


def _json_value(v: object) -> object:
    if v is None or isinstance(v, bool | int | float):
        return v
    return str(v)


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
            return json.dumps(out, ensure_ascii=False)
        pid = f" pid={record.process}" if self.pid else ""
        stamp = (f"<{_PRIORITY.get(record.levelno, 6)}>" if self.journal
                 else self.timestamp(record.created) + " ")
        line = f"{stamp}{record.levelname} {record.name}{pid} {kv(**fields)}"
        return f"{line}\n{exc}" if exc else line


#: syslog priorities of the logging levels (sd-daemon(3)).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

_format = "text"


def setup(verbosity: int = 0, fmt: str = "text") -> None:
    """Configure the root logger on stderr. ``verbosity``: -1 warnings only, 0 info (one line
    per connection), 1 debug. ``fmt``: ``text`` or ``json`` (:class:`EventFormatter`).
    Raises ValueError for another format."""
    global _format
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(fmt, journal=journald()))
    _format = fmt
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def tag_process() -> None:
    """Put ``pid=N`` in every log line (worker processes of ``serve --workers``)."""
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


class Throttled:
    """A warning stream that logs at most one line per ``interval`` seconds and says how many
    it held back, so an outage that fails thousands of requests does not flood the log."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        self._next = 0.0
        self._held = 0

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message = _with(message, suppressed=self._held)
            self._held = 0
        self._next = now + self.interval
        self.logger.log(self.level, message)


def _with(message: str, **more: Any) -> str:
    """``message`` with more fields (a :class:`Fields` stays one)."""
    if isinstance(message, Fields):
        return kv(**message.fields, **more)
    return f"{message} {kv(**more)}"
