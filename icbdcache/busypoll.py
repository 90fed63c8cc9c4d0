"""Busy polling: the event loop keeps polling its sockets for a short window after a request
instead of sleeping, so the next request of a waiting client is read without a wake-up.

Notes on the design
-------------------
* Why. A client at iodepth 1 (a booting workstation reading its root disk) sends its next
  request a few tens of µs after a reply. A server asleep in ``epoll_wait`` is woken for it
  by the kernel: on the 2-vCPU machine of docs/bench.md that wake-up (an inter-processor
  interrupt to an idle vCPU) is the largest part of a 4 KiB read's latency; fio at iodepth 1
  measured 16,000 reads/s with it and 27,000 while the server polled (docs/bench.md, "Busy
  polling"). Linux offers the same trade for real NICs (``SO_BUSY_POLL``,
  ``net.core.busy_poll``, in µs); this does it in user space, so it works for every socket,
  loopback included.
* How. :meth:`BusyPoll.kick` (called for every batch of bytes a client in transmission
  sends; not in the handshake: a peer not yet past TLS or an export's allow list must not
  make the process poll) starts a
  callback that schedules itself with ``call_soon``. While one is scheduled, the loop polls
  with a zero timeout (uvloop/libuv and asyncio both do: ready callbacks mean "do not
  block"). The callback stops rescheduling once ``window`` seconds pass with no kick; the loop
  then sleeps as before. Each turn of the spin gives the CPU away (``sched_yield``) so that a
  process that shares the core (the client, another worker) is not held up by the spin.
* Cost. At most one core per worker, only while clients send requests less than ``window``
  apart; nothing when the server is idle. ``--busy-poll 0`` turns it off.
"""

from __future__ import annotations

import asyncio
import os
import time

#: Default window (µs) of ``serve --busy-poll``: longer than the gap between a reply and the
#: next request of a client at iodepth 1 on loopback (20-30 µs), short enough that a server
#: with nothing to do stops polling at once.
DEFAULT_WINDOW_US = 50


class BusyPoll:
    """Keeps ``loop`` polling for ``window`` seconds (> 0) after the last :meth:`kick`."""

    __slots__ = ("_began", "_loop", "_seen", "_since", "_window", "kicks", "seconds", "spinning",
                 "spins")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: float) -> None:
        self._loop = loop
        self._window = window
        #: Kicks so far (a count of client reads).
        self.kicks = 0
        #: Whether the poll callback is scheduled.
        self.spinning = False
        #: Turns of the poll callback so far.
        self.spins = 0
        #: Seconds spent polling so far (periods that have ended; :meth:`polled` adds the
        #: one under way).
        self.seconds = 0.0
        self._seen = 0
        self._since = 0.0
        self._began = 0.0

    def kick(self) -> None:
        """A client sent something: poll for at least ``window`` seconds more."""
        self.kicks += 1
        if not self.spinning:
            self.spinning = True
            self._seen = self.kicks
            self._since = self._began = time.monotonic()
            self._loop.call_soon(self._spin)

    def polled(self) -> float:
        """Seconds spent polling so far, the period under way included (a server whose
        clients keep it polling for hours is counted as it goes, not when it stops); never
        less than an earlier answer."""
        if self.spinning:
            return self.seconds + time.monotonic() - self._began
        return self.seconds

    def _spin(self) -> None:
        self.spins += 1
        now = time.monotonic()
        if self.kicks != self._seen:
            self._seen = self.kicks
            self._since = now
        elif now - self._since > self._window:
            self.spinning = False
            self.seconds += now - self._began
            return
        os.sched_yield()
        self._loop.call_soon(self._spin)
