"""The event loop stands aside while the store's writer thread puts a batch into LMDB.

Notes on the design
-------------------
* py-lmdb lets the GIL go around every put (``UNLOCKED(... mdb_put ...)`` in its C source):
  a batch of 256 chunks is some 500 puts (a chunk and its access tick each), and the writer
  thread takes the GIL back after each.
* Taking it back is slow while an event loop runs in the same process. CPython (3.11) gives a
  waiting thread the GIL only after ``sys.getswitchinterval()`` (5 ms) of asking, and only if
  the holder did not let it go and take it back meanwhile: each such switch restarts the
  wait. A busy loop lets the GIL go at every turn (uvloop runs libuv without it), so the
  writer waited about a millisecond per put, and up to 5 ms. Measured (a cold
  ``serve --store`` filling from a loopback nbdkit, 15 connections of 64 KiB random reads):
  a batch took 110-240 ms to put and commit, about 1 ms per chunk, against 10-50 ms once
  the loop stands aside; with ``--workers 2`` a worker waiting on another's fault lease waits
  for that commit, and the two workers served 0.7x-0.9x of one (docs/bench.md, "The store's
  writer waiting for the GIL").
* So the writer asks the loop to stand aside (:class:`StandAside`, installed as
  :attr:`~icbdcache.store.lmdbstore.Store.stand_aside` by whoever runs a loop over the
  store): at the start of a batch's puts it schedules a callback on the loop
  (``call_soon_threadsafe``) that blocks the loop's thread, without the GIL, until the
  puts are done. The commit (its ``fsync``) runs after, with the loop going again.
* Bounded: the loop waits at most ``MAX_STALL`` seconds, whatever the writer does (a batch
  of 16 MiB puts in about 5 ms here). Nothing can deadlock: the writer never waits for the
  loop; only the loop waits for the writer, and never longer than that. A batch written from
  the loop's own thread finds its callback run after the batch: it returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

#: The longest the loop waits for a batch's puts (seconds).
MAX_STALL = 0.02


class StandAside:
    """``with stand_aside():`` in a writer thread: ``loop`` stands aside (its thread waits
    without the GIL) from its next turn until the block ends or ``MAX_STALL`` seconds pass.
    ``asked`` counts the blocks, ``stood`` the turns the loop stood aside (a block that ends
    before the loop's next turn needs none), ``timeouts`` those that ended on ``MAX_STALL``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.asked = 0
        self.stood = 0
        self.timeouts = 0
        #: True while the loop's thread waits (for tests)
        self.standing = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        done = threading.Event()
        self.asked += 1
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody to stand aside
            self.loop.call_soon_threadsafe(self._wait, done)
        try:
            yield
        finally:
            done.set()

    def _wait(self, done: threading.Event) -> None:
        if done.is_set():
            return  # (the batch ended first, or was written from this very thread)
        self.standing = True
        try:
            if not done.wait(MAX_STALL):
                self.timeouts += 1
        finally:
            self.standing = False
        self.stood += 1

