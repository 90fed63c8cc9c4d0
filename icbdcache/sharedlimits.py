"""Connection limits across the workers of ``serve --workers N``: ``--max-connections`` and
the per-address limits hold for the server, not for each worker.

The parent maps one table of counters shared with every worker it forks (an anonymous shared
mapping, :class:`SharedCounts`): a row per worker, each row the worker's connections in all,
then its connections and its connections still in the handshake per address slot. An address
goes to a slot by a hash keyed with a secret of this server run (``xxh64``): two addresses
that share a slot are counted together, which can only refuse early, never admit beyond a
limit, and a client cannot choose whom it collides with. A worker writes its own row only
and reads every row to decide (:class:`SharedConnectionLimits`). Admitting (read every row,
then count) holds a POSIX record lock on a descriptor the workers share (``lockf``): two
workers cannot both take the last place, and the kernel lets go of the lock of a worker that
dies holding it. A worker never waits for it more than about 2 ms: one stopped while holding
it (SIGSTOP, a debugger) would otherwise stop every other worker's event loop; past that it
admits without the lock, and a limit may be passed by one connection. A worker started again
after a crash zeroes its row first (its connections died with it).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import time

import xxhash

from icbdcache.limits import RESERVE_SHARE, ConnectionLimits

#: Address slots per worker row (a power of two).
SLOTS = 1 << 16
_INT = 4  # bytes of one counter (a C int)


class SharedCounts:
    """The table, made by the parent before its first fork: ``workers`` rows of
    1 + 2 x :data:`SLOTS` C ints (``workers`` x 512 KiB of address space, touched only
    where counted)."""

    def __init__(self, workers: int, slots: int = SLOTS) -> None:
        self.workers = workers
        self.slots = slots
        self.row = 1 + 2 * slots
        self._map = mmap.mmap(-1, workers * self.row * _INT)  # shared, anonymous
        self.cells = memoryview(self._map).cast("i")
        self.key = int.from_bytes(secrets.token_bytes(8), "little")
        #: What :meth:`SharedConnectionLimits.admit` locks (record locks are per process).
        self.lock_fd = os.memfd_create("icbd-connection-limits", os.MFD_CLOEXEC)

    def zero(self, offset: int, length: int) -> None:
        """Zero ``length`` bytes of the table from byte ``offset``."""
        self._map[offset:offset + length] = bytes(length)

    def slot(self, address: str) -> int:
        """The slot of ``address`` (0 .. slots-1)."""
        return xxhash.xxh64_intdigest(address.encode(), seed=self.key) & (self.slots - 1)


#: Tries (:data:`LOCK_PAUSE` seconds apart) to take the admit lock before admitting without
#: it: a worker stopped while it holds the lock (SIGSTOP, a debugger) must not stop the
#: others' event loops, which call this.
LOCK_TRIES = 20
LOCK_PAUSE = 0.0001


def _lock(fd: int) -> bool:
    """Take the admit lock without blocking for long; False when it stayed held (the
    caller admits without it: a limit may then be passed by one connection)."""
    for _ in range(LOCK_TRIES):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            time.sleep(LOCK_PAUSE)
    return False


class SharedConnectionLimits(ConnectionLimits):
    """:class:`~icbdcache.limits.ConnectionLimits` of worker ``worker`` counted in ``table``
    for the whole server (the same limits, the same refusal phrases)."""

    def __init__(self, table: SharedCounts, worker: int, max_connections: int,
                 per_address: int, per_address_handshake: int, reserved: int) -> None:
        super().__init__(max_connections, per_address, per_address_handshake, reserved)
        self.table = table
        self.base = worker * table.row
        start = self.base * _INT  # a crashed predecessor's counts
        table.zero(start, table.row * _INT)

    def _sum(self, offset: int) -> int:
        t = self.table
        cells, row = t.cells, t.row
        return sum(cells[w * row + offset] for w in range(t.workers))

    def refusal(self, address: str) -> str | None:
        slot = 1 + self.table.slot(address)
        total = self._sum(0)
        if total >= self.max_connections:
            return "connection limit"
        held = self._sum(slot)
        if held >= self.per_address:
            return "address connection limit"
        if self._sum(slot + self.table.slots) >= self.per_address_handshake:
            return "address handshake limit"
        if total >= self.max_connections - self.reserved and held >= RESERVE_SHARE:
            return "reserved for other addresses"
        return None

    def _add(self, address: str, conns: int, handshakes: int) -> None:
        cells, slot = self.table.cells, 1 + self.table.slot(address)
        cells[self.base] += conns
        cells[self.base + slot] += conns
        cells[self.base + slot + self.table.slots] += handshakes

    def admit(self, address: str) -> str | None:
        fd = self.table.lock_fd
        locked = _lock(fd)
        try:
            why = super().admit(address)
            if why is None:
                self._add(address, 1, 1)
            return why
        finally:
            if locked:
                fcntl.lockf(fd, fcntl.LOCK_UN)

    def adopt(self, address: str) -> None:
        super().adopt(address)
        self._add(address, 1, 0)

    def negotiated(self, address: str) -> None:
        super().negotiated(address)
        self._add(address, 0, -1)

    def release(self, address: str, handshaking: bool) -> None:
        super().release(address, handshaking)
        self._add(address, -1, -1 if handshaking else 0)

__all__ = ["SLOTS", "SharedConnectionLimits", "SharedCounts"]
