"""The store as the read path sees it: chunk bytes from three tiers, fastest first.

1. the hot set (:mod:`icbdcache.store.hotset`, process memory),
2. chunks queued in the batched writer and not yet committed,
3. LMDB, through one short read transaction per request (:class:`ReadTxn`).

A chunk read from LMDB enters the hot set on its second read only, so one-time reads (a scan,
``nbdcopy`` of a whole version) do not flush what the boot storm needs; until then only the
requested slice is copied out of the transaction (py-lmdb: a buffer dies with its
transaction). Every read notes the chunk's access for the store's eviction: in a set in memory
(:attr:`StoreReader.recent`, one ``set.add`` on the read path), handed to the writer by
:meth:`StoreReader.flush_recent` (the node calls it every second; :meth:`StoreReader.close`
once more), which writes the access ticks with its next batch or within its ``idle_flush``;
a chunk handed in the last :data:`TOUCH_AGAIN` seconds or so is not handed again.
The hot set's hit (:class:`~icbdcache.store.hotset.HotSet`) is two dict methods called from
the read path without a Python frame (``peek``, ``used_now``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icbdcache.log import kv
from icbdcache.store.hotset import HotSet
from icbdcache.store.leases import FaultLeases
from icbdcache.store.lmdbstore import Store
from icbdcache.store.writer import BatchWriter

log = logging.getLogger("icbdcache.store")

Buffer = bytes | bytearray | memoryview


@dataclass
class TierHits:
    """Chunk reads answered from each tier (the read path's hits by where the bytes were):
    ``hits_hot`` the hot set, ``hits_queued`` the writer's queue, ``hits_lmdb`` LMDB."""

    hits_hot: int = 0
    hits_queued: int = 0
    hits_lmdb: int = 0


class ReadTxn:
    """One LMDB read transaction, opened on the first chunk not found in memory and ended by
    :meth:`close`."""

    __slots__ = ("_txn", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self._txn: Any = None

    def buffer(self, key: bytes) -> memoryview | None:
        """The chunk's bytes inside the transaction: valid until :meth:`close`."""
        if self._txn is None:
            self._txn = self.store.begin_chunks()
        buf = self._txn.get(key)
        return memoryview(buf) if buf is not None else None

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None


#: Seconds after a chunk's read was handed to the writer during which its reads are not
#: handed again (:meth:`StoreReader.flush_recent`): its access tick is at most twice this
#: old while it is being read.
TOUCH_AGAIN = 60.0
#: Most chunks remembered per period of :data:`TOUCH_AGAIN` (beyond: forgotten, and their
#: ticks written again), so that a scan of a huge store does not grow the memory.
TICKED_MAX = 1 << 18

#: The writer's queue holds at least this many bytes of chunks (:func:`queue_bound`).
MIN_QUEUE = 64 << 20


def queue_bound(hot_bytes: int) -> int:
    """Bytes of chunks the store writer's queue of a reader with a hot set of ``hot_bytes``
    holds: as many as the hot set, at least :data:`MIN_QUEUE`. A chunk faulted enters the
    hot set and the queue as one object, and the queue holds the newest of them, so it adds
    memory only for queued chunks the hot set has dropped already: at most ``hot_bytes``
    (docs/store.md, "The writer's queue")."""
    return max(MIN_QUEUE, hot_bytes)


class StoreReader:
    """Reads chunks of ``store`` through the hot set (``hot_bytes`` bytes) and ``writer``
    (made here when not given; closed by :meth:`close`); :meth:`read` counts its answers by
    tier in ``hits`` (made here when not given)."""

    def __init__(self, store: Store, *, hot_bytes: int = 1 << 30,
                 writer: BatchWriter | None = None, hits: TierHits | None = None) -> None:
        self.store = store
        self.writer = writer or BatchWriter(store, max_queued=queue_bound(hot_bytes))
        self.hits = hits if hits is not None else TierHits()
        self.hot = HotSet(hot_bytes)
        #: Chunks read since the last :meth:`flush_recent` (their access ticks, not yet with
        #: the writer). Only the thread that reads adds to it.
        self.recent: set[bytes] = set()
        #: Chunks handed to the writer since ``_ticked_since`` (monotonic seconds), and in the
        #: period before it (:meth:`flush_recent`).
        self._ticked: set[bytes] = set()
        self._ticked_before: set[bytes] = set()
        self._ticked_since = time.monotonic()
        #: Chunks read once from LMDB since they were last admitted (admission on 2nd read).
        self._seen: set[bytes] = set()
        self._seen_max = 1 << 18
        #: Which process sharing the store fetches a missing chunk (fault layer).
        self.leases = FaultLeases(store.path)
        try:  # before any chunk map is read through this reader
            self.leases.watch()
            self.writer.on_learned = self.leases.learned
        except OSError as e:  # (a read-only store: faults look at the stored map)
            log.debug(kv(store="leases", watch=e))

    def txn(self) -> ReadTxn:
        """A read transaction for one request's chunks (opened lazily)."""
        return ReadTxn(self.store)

    def holds(self, key: bytes) -> bool:
        """Whether chunk ``key`` is held (in memory, queued, or in LMDB), without copying it."""
        return (key in self.hot or self.writer.pending(key) is not None
                or self.store.has_chunk(key))

    def lookup(self, key: bytes) -> bytes | None:
        """A held chunk's bytes (entering the hot set), or None. Never blocks on the network."""
        data = self.hot.get(key)
        if data is None:
            data = self.writer.pending(key)
            if data is None:
                data = self.store.get_chunk(key)
                if data is None:
                    return None
            self.hot.put(key, data)
        self.recent.add(key)
        return data

    def read(self, key: bytes, lo: int, hi: int, txn: ReadTxn) -> Buffer | None:
        """Bytes ``lo:hi`` of a held chunk, or None if it is not held."""
        data = self.hot.peek(key)
        if data is None:
            data = self.writer.pending(key)
            if data is None:
                buf = txn.buffer(key)
                if buf is None:
                    return None
                self.hits.hits_lmdb += 1
                seen = self._seen
                if self.hot.budget <= 0:  # no hot set: never copy a whole chunk to admit it
                    self.recent.add(key)
                    return bytes(buf[lo:hi])
                if key not in seen:
                    if len(seen) >= self._seen_max:
                        seen.clear()
                    seen.add(key)
                    self.recent.add(key)
                    return bytes(buf[lo:hi])
                seen.discard(key)
                data = bytes(buf)
            else:
                self.hits.hits_queued += 1
            self.hot.put(key, data)
        else:
            self.hot.used_now(key)
            self.hits.hits_hot += 1
        self.recent.add(key)
        return memoryview(data)[lo:hi]

    def preload(self, keys: Sequence[bytes], limit: int) -> tuple[int, int]:
        """Copy the chunks ``keys`` (those held in LMDB and not in memory yet) into the hot
        set, in order, until it holds ``limit`` bytes; no access tick, no hit counted (no
        client read them). In one read transaction. Returns (chunks, bytes) added."""
        hot = self.hot
        n = added = 0
        txn = self.txn()
        try:
            for key in keys:
                if hot.used >= limit:
                    break
                if key in hot:
                    continue
                buf = txn.buffer(key)
                if buf is None:
                    continue
                data = bytes(buf)
                hot.put(key, data)
                n += 1
                added += len(data)
        finally:
            txn.close()
        return n, added

    def flush_recent(self) -> int:
        """Hand the chunks read since the last call to the writer (their access ticks go with
        its next batch), but not those handed to it in the last :data:`TOUCH_AGAIN` to twice
        that many seconds: their tick is recent enough for eviction, and a boot storm reads
        the same chunks again and again (writing their ticks every second took 8% of a warm
        server's samples, in the writer's thread, at 40,000 reads a second). Call it from the
        thread that reads. Returns how many were handed."""
        recent = self.recent
        if not recent:
            return 0
        self.recent = set()
        now = time.monotonic()
        if now - self._ticked_since >= TOUCH_AGAIN or len(self._ticked) > TICKED_MAX:
            self._ticked_before = self._ticked if len(self._ticked) <= TICKED_MAX else set()
            self._ticked = set()
            self._ticked_since = now
        fresh = recent - self._ticked
        if self._ticked_before:
            fresh -= self._ticked_before
        if fresh:
            self._ticked |= fresh
            self.writer.touch_many(fresh)
        return len(fresh)

    def keep(self, key: bytes, data: bytes,
             updates: Sequence[tuple[str, int, bytes]] = (), *, force: bool = False) -> bool:
        """Store a verified chunk (queued for the writer, readable at once, in the hot set)
        with learned map entries ((version key, index, digest)). Never blocks: when the
        writer's queue is full (:meth:`BatchWriter.over`; with ``force`` only when the writer
        has stopped) the chunk goes to the hot set only, its entries are not queued with it
        (the caller may :meth:`learn` them), and this returns False (a later read faults it
        again)."""
        self.hot.put(key, data)
        if self.writer.stopped or (self.writer.over() and not force):
            return False
        self.writer.put(key, data, updates, block=False)
        return True

    def learn(self, updates: Sequence[tuple[str, int, bytes]]) -> None:
        """Store learned map entries that come with no chunk (all-zero chunks)."""
        self.writer.put_updates(updates)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the store's persistent counter ``name``."""
        self.writer.count(name, n)

    def close(self) -> None:
        """Commit what the writer holds (the access ticks of every read too) and stop it."""
        self.flush_recent()
        self.writer.close()
        self.leases.close()
