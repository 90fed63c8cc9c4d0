"""The gate every LMDB transaction of a process passes, so that the map can be re-mapped safely.

LMDB maps the data file into the process. When another process grows the file past this
process's map (an ``import`` next to a running ``serve``), the next transaction fails with
``MDB_MAP_RESIZED`` and the answer is ``mdb_env_set_mapsize(0)``: map the file at its new size
and go on (py-lmdb: ``Environment.set_mapsize(0)``). Growing a map that is full is the same
call with a larger size. Either unmaps the old mapping: a transaction open in another thread
of the same process, and every buffer it handed out, would point at unmapped memory (measured
here: SIGBUS). So transactions are counted, under a lock, as they begin and end, and a re-map
runs holding that lock at a moment when none is open: a transaction cannot begin meanwhile
(it waits for the lock), and none that began before is still open. Transactions are short
(one request, one batch), so the re-map finds such a moment at once in practice; it gives up
after ``timeout`` seconds (a thread that holds a transaction itself can never see none open)
and its caller reports the failure instead of hanging.

The cost on the read path is one uncontended lock on each side of a transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TxnGate:
    """Counts the open transactions of one environment in this process and lets a re-map run
    when there are none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0

    def enter(self) -> None:
        """A transaction is about to begin (waits while a re-map runs)."""
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        """A transaction entered with :meth:`enter` has ended."""
        with self._lock:
            self._active -= 1

    @property
    def active(self) -> int:
        """Transactions open now."""
        return self._active

    def exclusive(self, fn: Callable[[], None], timeout: float = 30.0) -> bool:
        """Run ``fn()`` at a moment when no transaction is open in this process, no new one
        beginning until it returns. False (``fn`` not run) if no such moment came within
        ``timeout`` seconds (the calling thread holds a transaction, or others never end)."""
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while True:
            with self._lock:
                if self._active == 0:
                    fn()
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
