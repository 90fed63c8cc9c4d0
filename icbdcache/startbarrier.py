"""The workers of a successor (``serve --workers N --handover``) take over together or not at
all.

Each worker of the successor takes over from the predecessor's worker of its index on its own
(:mod:`icbdcache.handover`). Without a common step, a successor whose worker 0 could not start
(its PXE port taken) stopped after worker 1 had taken its clients over: the predecessor's
worker 0 rolled back, and worker 1's clients were lost with the successor. So each worker,
once its services run and it accepts on the sockets it was given, says so here and waits
until every worker has (:meth:`StartBarrier.wait`); only then does it tell its predecessor
``ready`` and take connections. A worker that exits before it said so (it failed, it was
killed) makes the parent mark the start failed, and every waiting worker aborts its
hand-over: each predecessor's worker rolls back and keeps its clients.

The state is an anonymous shared mapping the parent makes before its first fork: one byte
"failed", then one byte per worker.
"""

from __future__ import annotations

import asyncio
import mmap
import time


class StartAborted(Exception):
    """Another worker of this server failed to start: the hand-over is called off."""


class StartBarrier:
    """``workers`` workers arrive; :meth:`wait` returns when all have, or raises."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, 1 + workers)  # shared, anonymous, zeroed

    def arrive(self, worker: int) -> None:
        """Worker ``worker`` serves (its services started, accepting)."""
        self._map[1 + worker] = 1

    def arrived(self, worker: int) -> bool:
        return self._map[1 + worker] == 1

    def reset(self, worker: int) -> None:
        """Worker ``worker`` is being started again (in the parent, before its fork)."""
        self._map[1 + worker] = 0

    def fail(self) -> None:
        """A worker exited before it arrived (in the parent)."""
        self._map[0] = 1

    async def wait(self, timeout: float) -> None:
        """Until every worker arrived. Raises StartAborted when one failed or ``timeout``
        seconds passed."""
        deadline = time.monotonic() + timeout
        while not all(self._map[1 + i] == 1 for i in range(self.workers)):
            if self._map[0]:
                raise StartAborted("another worker of this server failed to start")
            if time.monotonic() >= deadline:
                raise StartAborted(f"the other workers of this server did not start within "
                                   f"{timeout:.0f} s")
            await asyncio.sleep(0.01)


__all__ = ["StartAborted", "StartBarrier"]
