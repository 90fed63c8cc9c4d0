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
* The writer does not hold a batch open for more chunks while a lease waits on it
  (``after_queued``): a waiting process pays the commit (an fsync), not the batching delay;
  batches still form from what is queued during the previous commit.
* The cost on a fault nobody else is fetching: one ``fcntl`` to take the lease and one to give
  it back (from the writer's thread). The store is looked at again only after a wait: the
  caller looked an instant before, in the same step of the event loop, so another process
  would have had to fetch, commit and give the lease back within those microseconds (then
  the chunk is fetched twice, and both copies are checked). A hit never gets here.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable
from typing import Protocol

from icbdcache.store import UNKNOWN, ZERO
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


def _held(layer: Faulting, index: int, want: bytes) -> bytes | None:
    """The chunk's bytes if another process put them in the store since, else None."""
    if want == UNKNOWN:
        want = layer._stored_entry(index)
        if want == UNKNOWN:
            return None
        if want == ZERO:
            return bytes(layer.version.chunk_length(index))
    return layer.reader.lookup(want)


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
    while not leases.take(lease):
        # the holder gives the lease back once the chunk is committed (or its fetch failed)
        if not waited:
            waited = True
            layer.reader.count("lease_waits")
        if time.monotonic() >= deadline:
            raise OSError(errno.EIO, f"chunk {index}: fetched by another process, not stored "
                                     "within the fault deadline")
        await asyncio.sleep(delay)
        delay = min(delay * 2, POLL_MAX)
    try:
        # stored by another process while this one waited for its lease (it gave the lease
        # back once the chunk was committed). A lease taken at once needs no second look:
        # the caller looked an instant before, in the same step of the event loop.
        data = _held(layer, index, want) if waited else None
        if data is not None:
            leases.release(lease)
            return data
        if waited:
            layer.reader.count("lease_takeovers")
        data = await layer._fetch(index, want)
    except BaseException:
        leases.release(lease)
        raise
    layer.reader.writer.after_queued(lambda: leases.release(lease))
    return data
