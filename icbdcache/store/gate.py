"""The gate every LMDB transaction of a process passes, so that the map can be re-mapped safely.

LMDB maps the data file into the process. When another process grows the file past this
process's map (an ``import`` next to a running ``serve``), the next transaction fails with
``MDB_MAP_RESIZED`` and the answer is ``mdb_env_set_mapsize(0)``: map the file at its new size
and go on (py-lmdb: ``Environment.set_mapsize(0)``). Growing a map that is full is the same
call with a larger size. Either unmaps the old mapping: a transaction open in another thread
of the same process, and every buffer it handed out, would point at unmapped memory (measured
here: SIGBUS). So transactions enter a shared gate and a re-map takes it exclusively: it waits
until no transaction is open in the process, holding new ones back meanwhile. Transactions are
short (one request, one batch), so the wait is too.

A thread that already holds a transaction may open another (it passes the gate at once: the
re-map waits for its first one anyway); it cannot re-map itself (:meth:`TxnGate.exclusive`
returns False) and its caller reports the failure instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class TxnGate:
    """Counts the open transactions of one environment in this process and lets one re-map
    run when there are none."""

    def __init__(self) -> None:
        self._cv = threading.Condition(threading.Lock())
        self._active = 0
        self._remapping = False
        self._local = threading.local()

    def _held(self) -> int:
        return int(getattr(self._local, "n", 0))

    def enter(self) -> None:
        """A transaction is about to begin (waits while a re-map runs, unless this thread
        already holds one)."""
        held = self._held()
        with self._cv:
            while self._remapping and not held:
                self._cv.wait()
            self._active += 1
        self._local.n = held + 1

    def leave(self) -> None:
        """A transaction entered with :meth:`enter` has ended."""
        self._local.n = self._held() - 1
        with self._cv:
            self._active -= 1
            if self._remapping and self._active == 0:
                self._cv.notify_all()

    def exclusive(self, fn: Callable[[], None]) -> bool:
        """Run ``fn()`` while no transaction is open in this process. False (``fn`` not run)
        if the calling thread holds a transaction itself."""
        if self._held():
            return False
        with self._cv:
            while self._remapping:
                self._cv.wait()
            self._remapping = True
            try:
                while self._active:
                    self._cv.wait()
                fn()
            finally:
                self._remapping = False
                self._cv.notify_all()
        return True
