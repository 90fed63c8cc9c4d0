"""The master's chunk streams (``POST /v1/chunks``): who may hold how many, which waiting one
goes next, and which are released when their site comes back (docs/replication.md, 'Limits').

* A stream belongs to a **party**: the site its token names when tokens identify sites
  (``site:NAME``), otherwise its peer address (``addr:IP``; several sites behind one NAT share
  it). A party holds at most its bound of streams, running or waiting; one more is refused
  (HTTP 429), after its abandoned ones (their connection closed) were let go.
* At most ``total`` streams run at once; more wait. The last ``total // RESERVE_PART`` slots
  go only to a party with no stream running, and a freed slot goes to the waiting stream whose
  party runs the fewest (the oldest first among equals): parties that hold many wait behind
  those that hold none.
* A site that registers (it came back: restarted, or its link did) gets its earlier streams
  released: those of its token, or those of its address that named it (``X-Icbd-Site``),
  that have not moved for :data:`STALE_AFTER` seconds (a replica that registers again while
  pulling, because the master forgot it, keeps the streams it is reading).

Releasing a stream aborts its connection: its handler sees the connection reset wherever it
is (waiting for a slot, reading the body, writing a slice) and ends.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

#: Part of the slots kept for parties with no stream running (1/RESERVE_PART of them).
RESERVE_PART = 4
#: Seconds without a byte taken (or waiting for a slot) after which a stream of a site that
#: registers again is taken for abandoned.
STALE_AFTER = 2.0


class StreamReleased(ConnectionResetError):
    """The stream was let go (its site came back, or it was abandoned)."""


@dataclass(eq=False)
class Stream:
    """One chunk stream: its ``party``, the ``site`` it is known to belong to (a token's
    site, or the site its client named; None: unknown), the peer ``address``, whether its
    connection is still there (``alive``), ``abort`` to cut it, and when it last ``moved``
    (monotonic s: created, started, or its client took bytes)."""

    party: str
    site: str | None
    address: str
    alive: Callable[[], bool]
    abort: Callable[[], None]
    seq: int = 0
    moved: float = field(default_factory=lambda: time.monotonic())
    running: bool = False
    released: bool = False
    _grant: asyncio.Future[None] | None = field(default=None, repr=False)


class StreamSlots:
    """Slots for chunk streams: ``total`` running at once; a party holds at most the
    ``limit`` given to :meth:`enter`."""

    def __init__(self, total: int) -> None:
        self.total = max(1, total)
        self.reserve = self.total // RESERVE_PART
        self.running = 0
        self.streams: dict[str, list[Stream]] = {}  # party -> its streams, oldest first
        self.running_by: Counter[str] = Counter()
        self._waiting: list[Stream] = []
        self._seq = itertools.count()

    def enter(self, party: str, limit: int, site: str | None, address: str,
              alive: Callable[[], bool], abort: Callable[[], None]) -> Stream | None:
        """A new stream of ``party``, or None when the party holds ``limit`` live ones
        (abandoned ones are let go first)."""
        mine = self.streams.get(party, [])
        for s in [s for s in mine if not s.alive()]:
            self.release(s)
        if len(self.streams.get(party, [])) >= limit:
            return None
        s = Stream(party, site, address, alive, abort, next(self._seq))
        self.streams.setdefault(party, []).append(s)
        return s

    def _may_run(self, party: str) -> bool:
        if self.running >= self.total:
            return False
        return self.running < self.total - self.reserve or not self.running_by[party]

    async def run(self, s: Stream) -> None:
        """Wait until ``s`` may run. Raises StreamReleased if it is let go meanwhile."""
        if s.released:
            raise StreamReleased("stream released")
        if not self._waiting and self._may_run(s.party):
            self._start(s)
            return
        grant = s._grant = asyncio.get_running_loop().create_future()
        self._waiting.append(s)
        self._grant_next()  # it may come first: its holder may run fewer than those waiting
        try:
            await grant
        finally:
            s._grant = None
            if s in self._waiting:
                self._waiting.remove(s)

    def _start(self, s: Stream) -> None:
        s.moved = time.monotonic()
        s.running = True
        self.running += 1
        self.running_by[s.party] += 1

    def leave(self, s: Stream) -> None:
        """``s`` ended (whatever way): its slot goes to a waiting stream."""
        mine = self.streams.get(s.party)
        if mine is not None and s in mine:
            mine.remove(s)
            if not mine:
                del self.streams[s.party]
        if s in self._waiting:
            self._waiting.remove(s)
        if s._grant is not None and not s._grant.done():
            s._grant.set_exception(StreamReleased("stream released"))
        if s.running:
            s.running = False
            self.running -= 1
            n = self.running_by[s.party] - 1
            if n > 0:
                self.running_by[s.party] = n
            else:
                del self.running_by[s.party]
        self._grant_next()

    def _grant_next(self) -> None:
        while self._waiting:
            # the waiting stream whose party runs the fewest, oldest first among equals
            nxt = min(self._waiting, key=lambda w: (self.running_by[w.party], w.seq))
            if not self._may_run(nxt.party):
                return
            self._waiting.remove(nxt)
            self._start(nxt)
            if nxt._grant is not None and not nxt._grant.done():
                nxt._grant.set_result(None)

    def release(self, s: Stream) -> None:
        """Let ``s`` go: its connection is aborted and it stops counting at once."""
        if s.released:
            return
        s.released = True
        s.abort()
        self.leave(s)

    def site_back(self, site: str, address: str, by_token: bool) -> int:
        """Site ``site`` registered (from ``address``; ``by_token``: its token names it):
        release the streams it held before that have not moved for :data:`STALE_AFTER`
        seconds. Their count."""
        before = time.monotonic() - STALE_AFTER
        gone = [s for streams in self.streams.values() for s in streams
                if s.site == site and s.moved <= before
                and ((by_token and s.party == f"site:{site}")
                     or (not by_token and s.address == address))]
        for s in gone:
            self.release(s)
        return len(gone)

    def held(self, party: str) -> int:
        """Streams ``party`` holds, running or waiting."""
        return len(self.streams.get(party, []))
