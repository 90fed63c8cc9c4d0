"""Who holds what in a store shared by processes: an owner's identity that survives PID reuse,
and the records serving processes keep of the clients that run each version.

Pure functions and data: nothing here opens the store (:mod:`icbdcache.store.lmdbstore` reads
these records inside its own transactions, :mod:`icbdcache.store.inuse` writes them).

**Owners.** A pending version (an import or publish being copied) and an in-use record name the
process that wrote them: its PID and its start time in clock ticks since boot (field 22 of
``/proc/PID/stat``), so that a PID reused by another process does not count as the owner.

**In use.** A serving process keeps one record ``inuse/PID`` (JSON, see :func:`use_record`)
listing, per client (its address, and its MAC where the host's ARP table knows it), the
version it runs, how many connections it has open, when it first and last used it. A client
*runs* a version while it has a connection open to it, and for :data:`IN_USE_LINGER`
seconds after its last one closed (a workstation reconnecting after a network blip or a server
restart still runs it). A record whose process is gone counts its clients as last seen at the
record's last update, so a crashed server's clients still run their versions for the linger,
then not at all.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

#: Seconds a client still runs a version after its last connection to it closed.
IN_USE_LINGER = 300.0
#: Prefix of the in-use records in the store's ``records`` database (``inuse/PID``).
INUSE_PREFIX = "inuse/"


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, or None if there is no such
    process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields follow the last ')'
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])  # field 22 (starttime); rest starts at field 3
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Owner:
    """A process: ``pid`` and ``start`` (see :func:`process_start`; None where unknown)."""

    pid: int
    start: int | None = None

    @classmethod
    def me(cls) -> Owner:
        """This process."""
        return cls(os.getpid(), process_start(os.getpid()))

    def alive(self) -> bool:
        """Whether this process still runs (the same process, not a reuse of its PID)."""
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        if self.start is None:
            return True
        return process_start(self.pid) in (self.start, None)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, d: Any) -> Owner:
        """The owner in a record (``{"pid", "start"}``); PID 0 (never alive) if malformed."""
        if not isinstance(d, dict):
            return cls(0)
        pid, start = d.get("pid"), d.get("start")
        return cls(pid if isinstance(pid, int) else 0, start if isinstance(start, int) else None)


@dataclass
class ClientUse:
    """One client of one version, as a serving process records it. Times are seconds since the
    epoch; ``connections`` open now (as of ``updated`` of its record)."""

    version: str
    address: str
    mac: str = ""
    instance: str = ""
    connections: int = 0
    first: float = 0.0
    last: float = 0.0
    #: set when read: the PID of the serving process, and whether it still runs
    server_pid: int = field(default=0, compare=False)
    server_alive: bool = field(default=True, compare=False)

    def running(self, now: float, linger: float = IN_USE_LINGER) -> bool:
        """Whether the client runs the version at ``now``: a connection open, or its last
        one closed at most ``linger`` seconds ago."""
        if self.connections > 0 and self.server_alive:
            return True
        return now - self.last <= linger

    def label(self) -> str:
        """``ADDRESS`` or ``ADDRESS (MAC)``, for messages."""
        return f"{self.address} ({self.mac})" if self.mac else self.address

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("server_pid")
        d.pop("server_alive")
        return d


def use_record(owner: Owner, clients: Iterable[ClientUse], now: float | None = None) -> bytes:
    """The record ``inuse/PID`` of a serving process: ``{"owner", "updated", "clients"}``."""
    return json.dumps({"owner": owner.to_json(), "updated": time.time() if now is None else now,
                       "clients": [c.to_json() for c in clients]}, sort_keys=True).encode()


def _client(d: Any) -> ClientUse | None:
    if not isinstance(d, dict):
        return None
    try:
        return ClientUse(version=str(d["version"]), address=str(d["address"]),
                         mac=str(d.get("mac") or ""), instance=str(d.get("instance") or ""),
                         connections=int(d.get("connections") or 0),
                         first=float(d.get("first") or 0.0), last=float(d.get("last") or 0.0))
    except (KeyError, TypeError, ValueError):
        return None


def read_uses(records: Iterable[tuple[str, bytes]], now: float | None = None,
              linger: float = IN_USE_LINGER) -> dict[str, list[ClientUse]]:
    """The clients running each version (key ``IMI@VERSION``) according to ``records``
    (``(key, value)`` of the ``inuse/`` records). Records of processes that are gone count
    their clients as last seen at the record's last update. Malformed records are skipped."""
    now = time.time() if now is None else now
    out: dict[str, list[ClientUse]] = {}
    for _key, raw in records:
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        owner = Owner.from_json(rec.get("owner"))
        alive = owner.alive()
        updated = rec.get("updated")
        updated = float(updated) if isinstance(updated, int | float) else 0.0
        for d in rec.get("clients") or []:
            c = _client(d)
            if c is None:
                continue
            c.server_pid, c.server_alive = owner.pid, alive
            if not alive and c.connections > 0:
                c.last = max(c.last, updated)  # connected until its server went away
            if c.running(now, linger):
                out.setdefault(c.version, []).append(c)
    return out


def stale_records(records: Iterable[tuple[str, bytes]], now: float | None = None,
                  linger: float = IN_USE_LINGER) -> list[str]:
    """Keys of ``inuse/`` records whose process is gone and whose clients no longer run
    anything (safe to delete)."""
    now = time.time() if now is None else now
    out = []
    for key, raw in records:
        try:
            rec = json.loads(raw)
        except ValueError:
            out.append(key)
            continue
        if not isinstance(rec, dict):
            out.append(key)
            continue
        if Owner.from_json(rec.get("owner")).alive():
            continue
        updated = rec.get("updated")
        updated = float(updated) if isinstance(updated, int | float) else 0.0
        if now - updated > linger:
            out.append(key)
    return out


def describe(clients: list[ClientUse], most: int = 8) -> str:
    """``10.0.0.5 (52:54:00:..), 10.0.0.6`` (at most ``most`` named, then ``and N more``)."""
    names = sorted({c.label() for c in clients})
    text = ", ".join(names[:most])
    return text + (f" and {len(names) - most} more" if len(names) > most else "")
