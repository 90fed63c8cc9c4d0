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
  store), one slice of ``SLICE_STEPS`` steps (32 chunks) at a time: it schedules a callback
  on the loop (``call_soon_threadsafe``) and waits, without the GIL, until the loop comes to it; the
  callback then blocks the loop's thread, without the GIL, while the writer puts the slice.
  Between two slices the loop runs a turn with the writer waiting: neither waits for the
  GIL. The commit (its ``fsync``) runs after the last slice, with the loop going again.
* Why slices: standing aside for a whole batch (the first version of this) paused the loop
  for 5-46 ms per batch, and once that pause hit its bound the loop waited for the GIL as the
  writer had (an attack measured a 4 KiB reader of a warm export beside a cold fill at a
  third of its reads). A slice is about 1 ms of puts here (32 chunks; about 5 ms for 240).
* Only when the batch is awaited (the writer decides, store/writer.py): another process may
  wait on the fault lease of one of its chunks, or the writer's queue is half full (before
  long a fault's chunk would be served and not kept). Otherwise the loop keeps the GIL first
  and the puts wait for it, as before: a 4 KiB reader of a warm export beside a cold fill of
  150 MiB/s by one worker read at 0.3x of its rate while every batch stood aside, 0.5x-0.6x
  with this condition (the queue then fills half and the loop stands aside to keep what is
  fetched).
* Bounded: the loop waits at most ``MAX_STALL`` seconds per slice, whatever the writer does.
  The writer waits at most ``PARK_WAIT`` for the loop to come (a loop busy for longer, or
  blocked waiting for the writer itself: a flush from the loop's thread); then it goes on
  without it for that batch, and does not ask it for ``MISSED_PAUSE`` seconds. (It holds
  LMDB's write lock meanwhile: another process's writer waits as long, at most.) A batch
  written from the loop's own thread never asks. Nothing can deadlock: each side waits for
  the other only with a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

#: The longest the loop waits for one slice of a batch's puts (seconds).
MAX_STALL = 0.02
#: Steps per slice (a step: a chunk put with its access tick, a tick alone, an eviction's
#: delete or 16 of its looks): the loop runs a turn between slices.
SLICE_STEPS = 32
#: The longest the writer waits for the loop to come to its turn (seconds); a loop that does
#: not (busy for longer, or waiting for the writer itself: a flush from the loop's thread)
#: is not asked again for the rest of the batch.
PARK_WAIT = 0.02
#: After a loop did not come within ``PARK_WAIT``, the seconds it is not asked again.
MISSED_PAUSE = 1.0


def no_step() -> None:
    """A put done, with no loop to stand aside."""


def not_aside() -> contextlib.AbstractContextManager[Callable[[], None]]:
    """What a store without an event loop runs a batch's puts under: nothing; its ``step``
    does nothing."""
    return contextlib.nullcontext(no_step)


class StandAside:
    """``with stand_aside() as step:`` in a writer thread, ``step()`` after each put: ``loop``
    stands aside (its thread waits without the GIL) for each slice of ``SLICE_STEPS`` steps and
    runs a turn between slices. ``asked`` counts the blocks, ``stood`` the slices the loop
    stood aside for, ``stood_seconds`` the time it stood aside (seconds), ``timeouts`` the
    slices that ended on ``MAX_STALL``, ``missed`` the blocks whose loop did not come within
    ``PARK_WAIT`` (they went on without it). Read by ``/metrics`` (docs/metrics.md)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: the loop's thread (made on it): a batch written from it never asks it
        self.thread = threading.get_ident()
        #: time.monotonic() until which the loop is not asked (it missed its turn)
        self.missed_until = 0.0
        self.asked = 0
        self.stood = 0
        self.stood_seconds = 0.0
        self.timeouts = 0
        self.missed = 0
        #: True while the loop's thread waits (for tests)
        self.standing = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Callable[[], None]]:
        self.asked += 1
        slices = _Slices(self)
        slices.begin()
        try:
            yield slices.step
        finally:
            slices.end()

    def _park(self, parked: threading.Event, done: threading.Event) -> None:
        """On the loop: wait (without the GIL) until the slice is put."""
        if done.is_set():
            return  # (the writer went on without us, or wrote from this very thread)
        self.standing = True
        t0 = time.monotonic()
        parked.set()
        try:
            if not done.wait(MAX_STALL):
                self.timeouts += 1
        finally:
            self.standing = False
            self.stood_seconds += time.monotonic() - t0
        self.stood += 1


class _Slices:
    """One block's slices (in the writer's thread)."""

    __slots__ = ("aside", "done", "off", "puts")

    def __init__(self, aside: StandAside) -> None:
        self.aside = aside
        self.done: threading.Event | None = None
        self.off = False
        self.puts = 0

    def begin(self) -> None:
        """Have the loop come to its turn and wait there; or give up on it."""
        aside = self.aside
        if (self.off or not aside.loop.is_running() or threading.get_ident() == aside.thread
                or time.monotonic() < aside.missed_until):
            self.off = True
            return
        parked, done = threading.Event(), threading.Event()
        try:
            aside.loop.call_soon_threadsafe(aside._park, parked, done)
        except RuntimeError:  # a closed loop
            self.off = True
            return
        if not parked.wait(PARK_WAIT):
            done.set()  # (its turn, when it comes, returns at once)
            self.off = True
            aside.missed += 1
            aside.missed_until = time.monotonic() + MISSED_PAUSE
            return
        self.done = done

    def end(self) -> None:
        """The slice is put: the loop goes on."""
        if self.done is not None:
            self.done.set()
            self.done = None

    def step(self) -> None:
        """One put done: at the end of a slice, the loop runs a turn before the next."""
        self.puts += 1
        if self.puts >= SLICE_STEPS:
            self.puts = 0
            if self.done is not None:
                self.end()
                self.begin()
