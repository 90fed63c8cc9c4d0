"""One fetch per chunk across the processes sharing a store (``serve --workers N``, ``warm``).

Notes on the design
-------------------
* The fault layer's single-flight covers one process; this covers the processes: before a
  fetch, the fault takes the chunk's **fault lease** in the store
  (:class:`~icbdcache.store.leases.FaultLeases`, a lock the kernel drops when its process
  dies). The holder fetches, hands the chunk to the store's writer and gives the lease back
  once the writer has committed it (:meth:`~icbdcache.store.writer.BatchWriter.after_queued`):
  from then on every process reads it from LMDB.
* A process that finds the lease taken tries again every 1 ms doubling to 5 ms (one
  ``fcntl`` each, a few microseconds). Once it gets the lease, it looks in the store: the
  chunk is there (or, for a chunk not learned yet, its map entry): it is read from there and
  the lease given back. Still missing (the holder failed, or died: ``kill -9`` included):
  this process fetches it itself. A wait longer than the fault deadline fails with EIO, like
  a fetch that takes too long.
* The writer holds a batch open for at most ``after_delay`` (2 ms) while a lease waits on
  it (``after_queued``), not its usual 20 ms: a waiting process pays the commit (an fsync)
  and those 2 ms; batches still form from what is queued meanwhile.
* The cost on a fault nobody else is fetching: one ``fcntl`` to take the lease, one look in
  the store (the chunk, or for a chunk not learned yet its stored map entry), and one
  ``fcntl`` to give the lease back (from the writer's thread). The look must come after the
  lease is taken: a look before it (the caller's) can miss a chunk another process commits
  in between, and that process gives its lease back right after. A hit never gets here.
* While no other process faults on the store (the usual case: one ``serve``), the fault
  takes no lease and makes no look (:meth:`~icbdcache.store.leases.FaultLeases.begin` says
  ALONE; store/leases.py, "Faulting alone"), and its commit is not hurried.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable
from typing import Protocol

from icbdcache.store import UNKNOWN, ZERO
from icbdcache.store.leases import LOOK_EVERY, FaultLeases, Grant
from icbdcache.store.reader import StoreReader

#: Polling of a chunk another process is fetching: first and longest interval (seconds).
POLL_FIRST = 0.001
POLL_MAX = 0.005


class _Deadline(Protocol):
    @property
    def fault_timeout(self) -> float: ...


class _Version(Protocol):
    def chunk_length(self, index: int) -> int: ...


class Faulting(Protocol):
    """What of a fault layer the lease protocol uses."""

    @property
    def reader(self) -> StoreReader: ...

    @property
    def faults(self) -> _Deadline: ...

    @property
    def version(self) -> _Version: ...

    def _fetch(self, index: int, want: bytes) -> Awaitable[bytes]: ...

    def _stored_entry(self, index: int) -> bytes: ...


def _held(layer: Faulting, index: int, want: bytes) -> tuple[bytes | None, bytes]:
    """(the chunk's bytes if the store holds them now else None, its digest: ``want``, or
    for UNKNOWN the stored map's entry, which another process may have learned since)."""
    if want == UNKNOWN:
        want = layer._stored_entry(index)
        if want == UNKNOWN:
            return None, want
        if want == ZERO:
            return bytes(layer.version.chunk_length(index)), want
    return layer.reader.lookup(want), want


def _keep_looking(leases: FaultLeases) -> None:
    """Have ``leases`` look for newcomers every LOOK_EVERY while faults alone are in flight
    (a newcomer waits for this process's ALONE; without these looks it waited until the next
    fault began or every fault in flight ended: seconds behind a slow upstream)."""
    loop = asyncio.get_running_loop()
    leases.looking = True

    def tick() -> None:
        try:
            again = leases.look() and leases.in_flight
        except OSError:
            again = False
        if again:
            loop.call_later(LOOK_EVERY, tick)
        else:
            leases.looking = False

    loop.call_later(LOOK_EVERY, tick)


async def fetch_once(layer: Faulting, key: object, index: int, want: bytes) -> bytes:
    """Chunk ``index``'s bytes (``want``: its digest, or UNKNOWN), fetched by ``layer`` only
    if no other process sharing the store is fetching it (``key``: the fault's single-flight
    key). Raises OSError(EIO) as the fetch does, or when another process's fetch does not
    land within the fault deadline."""
    leases = layer.reader.leases
    lease = want if want != UNKNOWN else repr(key).encode()
    deadline = time.monotonic() + layer.faults.fault_timeout
    delay = POLL_FIRST
    waited = False
    while (grant := leases.begin(lease)) is Grant.BUSY:
        # the holder gives the lease back once the chunk is committed (or its fetch failed)
        if not waited:
            waited = True
            layer.reader.count("lease_waits")
        if time.monotonic() >= deadline:
            raise OSError(errno.EIO, f"chunk {index}: another process's fetch did not end "
                                     "within the fault deadline")
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX)
    if grant is Grant.ALONE and not leases.looking:
        _keep_looking(leases)
    try:
        if grant is Grant.HELD or waited or (want == UNKNOWN and leases.learned_elsewhere()):
            # stored by another process since the caller looked (it gave the lease back once
            # the chunk was committed): looked at again under the lease, whether it waited
            # for it or not. Without this look a fault taken at once after another
            # process's commit fetched the chunk a second time (seen with two workers).
            # Alone, the look is for an entry learned by a process gone since (``warm``).
            data, want = _held(layer, index, want)
            if data is not None:
                leases.end(lease)
                return data
            if waited:
                layer.reader.count("lease_takeovers")
        data = await layer._fetch(index, want)  # (checked against a digest learned since)
    except BaseException:
        leases.end(lease)
        raise
    # a lease another process may wait for hurries the commit; a fault alone does not
    layer.reader.writer.after_queued(lambda: leases.end(lease),
                                     urgent=grant is Grant.HELD)
    return data
