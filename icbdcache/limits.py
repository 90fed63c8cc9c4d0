"""What one client may hold of a server: connections and the memory of replies in flight.

Both are counted per client address (the peer's IP, or for a Unix socket the peer process)
and for the whole server, and both keep the last part of the server's share for addresses
that hold little, so that a few addresses at their own bound cannot lock out the rest:

* :class:`ConnectionLimits`: connections (all of an address, and those of an address still in
  the handshake), ``--max-connections`` for the server, of which the last ``reserved`` go only
  to an address holding fewer than :data:`RESERVE_SHARE` connections.
* :class:`ReplyBudget`: bytes of replies in flight (a request counts from when it is started
  until its reply has left the process), per connection, per address and per server; the
  last quarter of the server's bytes go only to an address holding less than one
  connection's budget. A
  request that does not fit waits (its connection stops reading); a connection or server that
  holds nothing always takes one, so a request bigger than a budget still goes, alone.

Nothing here does I/O: icbdcache/server.py asks and tells. docs/architecture.md ("What one
client may hold") describes the calls, how a request is charged and released, and what the
budget does not count.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import socket
import struct
from collections import Counter
from typing import Protocol

#: An address holding fewer connections than this may take one of the reserved ones (a
#: workstation's kernel client opens one to four).
RESERVE_SHARE = 4
#: Part of the server's reply budget kept for addresses that hold less than one
#: connection's budget (1/RESERVE_PART of it).
RESERVE_PART = 4
#: Once the budget held this many bytes and then nothing, the C heap gives its free pages
#: back (:func:`trim_heap`, seconds later): replies are copied out of the store in pieces
#: small enough for the heap, whose free pages otherwise stay with the process.
TRIM_AFTER = 32 << 20
TRIM_DELAY = 1.0


class ConnectionLimits:
    """Connections counted per address. ``max_connections``: the server's bound;
    ``per_address``: all connections of one address; ``per_address_handshake``: those of one
    address not in transmission yet; ``reserved``: the last connections of ``max_connections``
    (at most half of them), which only an address holding fewer than :data:`RESERVE_SHARE`
    may take."""

    def __init__(self, max_connections: int, per_address: int, per_address_handshake: int,
                 reserved: int) -> None:
        self.max_connections = max_connections
        self.per_address = per_address
        self.per_address_handshake = per_address_handshake
        self.reserved = max(0, min(reserved, max_connections // 2))
        self.total = 0
        self.by_address: Counter[str] = Counter()
        self.handshaking: Counter[str] = Counter()

    def refusal(self, address: str) -> str | None:
        """Why a new connection from ``address`` is refused (a fixed phrase), or None."""
        if self.total >= self.max_connections:
            return "connection limit"
        held = self.by_address[address]
        if held >= self.per_address:
            return "address connection limit"
        if self.handshaking[address] >= self.per_address_handshake:
            return "address handshake limit"
        if self.total >= self.max_connections - self.reserved and held >= RESERVE_SHARE:
            return "reserved for other addresses"
        return None

    def admit(self, address: str) -> str | None:
        """Count a new connection in the handshake, or say why it is refused (not counted)."""
        why = self.refusal(address)
        if why is None:
            self.total += 1
            self.by_address[address] += 1
            self.handshaking[address] += 1
        return why

    def adopt(self, address: str) -> None:
        """Count a connection in transmission carried on from another process (never
        refused: the predecessor admitted it)."""
        self.total += 1
        self.by_address[address] += 1

    def negotiated(self, address: str) -> None:
        """A counted connection of ``address`` left the handshake for transmission."""
        _drop(self.handshaking, address)

    def release(self, address: str, handshaking: bool) -> None:
        """A counted connection of ``address`` closed (``handshaking``: before transmission)."""
        self.total -= 1
        _drop(self.by_address, address)
        if handshaking:
            _drop(self.handshaking, address)


def _drop(counter: Counter[str], key: str) -> None:
    n = counter[key] - 1
    if n > 0:
        counter[key] = n
    else:
        del counter[key]


class Waiter(Protocol):
    """A connection with requests waiting for room in the budget."""

    def budget_freed(self) -> None:
        """Room was freed: start what now fits (and stay a waiter if something still waits)."""


class ReplyBudget:
    """Bytes of replies in flight: ``total`` bytes for the server, ``per_address`` for the
    connections of one address, ``per_connection`` for one connection. Callers
    :meth:`charge` a request's bytes when it starts and :meth:`release` them when its reply
    has left; a request that does not :meth:`fits` waits (:meth:`wait`) and is told when room
    was freed, at most once per event-loop turn."""

    def __init__(self, total: int, per_connection: int, per_address: int) -> None:
        self.total = max(1, total)
        self.per_connection = max(1, per_connection)
        self.per_address = max(1, per_address)
        self.used = 0
        #: bytes held per address (a plain dict: a Counter's lookup of a missing address
        #: calls ``__missing__`` in Python, on every request of an idle address)
        self.by_address: dict[str, int] = {}
        self._waiters: dict[Waiter, None] = {}  # in arrival order
        self._wake_scheduled = False
        #: Most bytes held since the heap was last trimmed.
        self.peak = 0
        self._trim: asyncio.TimerHandle | None = None

    def fits(self, connection_used: int, address: str, cost: int) -> bool:
        """May a request of ``cost`` bytes start on a connection holding ``connection_used``
        bytes, from ``address``."""
        if connection_used and connection_used + cost > self.per_connection:
            return False
        held = self.by_address.get(address, 0)
        if held and held + cost > self.per_address:
            return False
        if not self.used:
            return True
        after = self.used + cost
        if after > self.total:
            return False
        return (after <= self.total - self.total // RESERVE_PART
                or held + cost <= self.per_connection)

    def take(self, connection_used: int, address: str, cost: int) -> bool:
        """:meth:`fits`, and if it does :meth:`charge`: in one call (once per request)."""
        by = self.by_address
        held = by.get(address, 0)
        if ((connection_used and connection_used + cost > self.per_connection)
                or (held and held + cost > self.per_address)):
            return False
        used = self.used
        if used:
            after = used + cost
            if after > self.total or (after > self.total - self.total // RESERVE_PART
                                      and held + cost > self.per_connection):
                return False
        self.used = used = used + cost
        by[address] = held + cost
        if used > self.peak:
            self.peak = used
        return True

    def charge(self, address: str, cost: int) -> None:
        """``cost`` bytes of ``address`` are now in flight."""
        self.used += cost
        by = self.by_address
        by[address] = by.get(address, 0) + cost
        if self.used > self.peak:
            self.peak = self.used

    def release(self, address: str, n: int) -> None:
        """``n`` bytes of ``address`` left; waiters are told (soon)."""
        if n <= 0:
            return
        self.used -= n
        by = self.by_address
        left = by.get(address, 0) - n
        if left > 0:
            by[address] = left
        else:
            by.pop(address, None)
        if self._waiters and not self._wake_scheduled:
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)
        if not self.used and self.peak >= TRIM_AFTER and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim_now)

    def _trim_now(self) -> None:
        self._trim = None
        if not self.used:
            self.peak = 0
            trim_heap()

    def close(self) -> None:
        """Cancel the pending heap trim."""
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None

    def wait(self, waiter: Waiter) -> None:
        """``waiter`` has a request that did not fit."""
        self._waiters[waiter] = None

    def done_waiting(self, waiter: Waiter) -> None:
        """``waiter`` has nothing waiting any more (or closed)."""
        self._waiters.pop(waiter, None)

    @property
    def waiting(self) -> int:
        """Connections with requests waiting."""
        return len(self._waiters)

    def _wake(self) -> None:
        self._wake_scheduled = False
        self.wake()

    def wake(self) -> None:
        """Tell every waiter, in arrival order, that room may have been freed."""
        for w in list(self._waiters):
            if w in self._waiters:
                w.budget_freed()


#: SO_LINGER on, 0 s: close() sends a reset and drops what is unsent.
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: asyncio.BaseTransport) -> None:
    """Close ``transport`` with a TCP reset: what its peer has not taken is dropped at once
    (a FIN would wait behind it in the kernel for as long as the peer does not read, and the
    peer would not learn that we gave up)."""
    sock = transport.get_extra_info("socket")
    # (uvloop hands out a stand-in socket, ValueError once its descriptor is gone)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:
        transport.close()


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``); False where
    the C library has no such call."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
