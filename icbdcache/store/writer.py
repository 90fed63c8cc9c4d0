"""The store's one batched writer: a thread that commits many faulted chunks per transaction.

Readers never wait for it: a chunk handed to :meth:`BatchWriter.put` is readable at once through
:meth:`BatchWriter.pending` until its transaction commits. Access ticks (for eviction) and
counters are gathered in memory and written with the next batch, or every ``idle_flush``
seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

from icbdcache.log import kv
from icbdcache.store.lmdbstore import ChunkMismatch, Store, StoreError

log = logging.getLogger("icbdcache.store")


class BatchWriter:
    """Batches writes to ``store``: at most ``max_items`` chunks or ``max_bytes`` bytes per
    transaction, waiting at most ``max_delay`` seconds to fill one. ``protect``: the pending
    version (``IMI@VERSION``, :meth:`Store.reserve_version`) whose chunks these are; each
    batch notes them under it in its own transaction, so no eviction takes them before the
    version exists."""

    def __init__(self, store: Store, *, max_items: int = 256, max_bytes: int = 16 << 20,
                 max_delay: float = 0.02, idle_flush: float = 5.0,
                 protect: str | None = None) -> None:
        self.store = store
        self.protect = protect
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.idle_flush = idle_flush
        self._cv = threading.Condition()
        self._chunks: dict[bytes, bytes] = {}  # queued, not yet committed
        self._writing: dict[bytes, bytes] = {}  # in the transaction being written
        self._updates: list[tuple[str, int, bytes]] = []
        self._touched: set[bytes] = set()
        self._stats: Counter[str] = Counter()
        self._stop = False
        self.batches = 0
        self.errors = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="icbd-store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producers (any thread)

    def put(self, key: bytes, data: bytes,
            updates: Sequence[tuple[str, int, bytes]] = ()) -> None:
        """Queue chunk ``key`` (already verified by the caller) and learned map entries."""
        with self._cv:
            self._chunks[key] = data
            self._updates.extend(updates)
            self._idle.clear()
            self._cv.notify()

    def put_updates(self, updates: Sequence[tuple[str, int, bytes]]) -> None:
        """Queue learned map entries that come with no chunk (all-zero chunks)."""
        with self._cv:
            self._updates.extend(updates)
            self._idle.clear()
            self._cv.notify()

    def touch(self, key: bytes) -> None:
        """Note a read of chunk ``key`` (recorded as its access tick with the next batch)."""
        with self._cv:
            self._touched.add(key)

    def touch_many(self, keys: set[bytes]) -> None:
        """Note reads of the chunks ``keys`` (:meth:`touch` for a batch of them)."""
        with self._cv:
            self._touched |= keys

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the persistent counter ``name``."""
        with self._cv:
            self._stats[name] += n

    def pending(self, key: bytes) -> bytes | None:
        """A queued chunk not yet committed, or None."""
        return self._chunks.get(key) or self._writing.get(key)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        with self._cv:
            self._cv.notify()
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------ the thread

    def _take(self) -> tuple[dict[bytes, bytes], list[tuple[str, int, bytes]]]:
        chunks: dict[bytes, bytes] = {}
        size = 0
        for k in list(self._chunks):
            if len(chunks) >= self.max_items or size >= self.max_bytes:
                break
            v = self._chunks.pop(k)
            chunks[k] = v
            size += len(v)
        updates = self._updates
        self._updates = []
        return chunks, updates

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            with self._cv:
                if not self._chunks and not self._updates and not self._stop:
                    self._idle.set()
                    self._cv.wait(self.idle_flush)
                if self._chunks and len(self._chunks) < self.max_items and not self._stop:
                    self._cv.wait(self.max_delay)  # let a batch fill
                chunks, updates = self._take()
                self._writing = chunks
                stop = self._stop and not self._chunks and not self._updates
                touched, self._touched = self._touched, set()
                stats, self._stats = self._stats, Counter()
            if chunks or updates or stats or (touched and (stop or time.monotonic() - last > 1.0)):
                self._commit(chunks, updates, touched, dict(stats))
                last = time.monotonic()
            with self._cv:
                self._writing = {}
            if stop:
                self._idle.set()
                return

    def _commit(self, chunks: dict[bytes, bytes], updates: list[tuple[str, int, bytes]],
                touched: set[bytes], stats: dict[str, int]) -> None:
        try:
            self.store.write_batch(chunks.items(), updates, touched, stats,
                                   protect=self.protect)
            self.batches += 1
        except ChunkMismatch as e:  # a caller's bug: verification happens before put()
            self.errors += 1
            log.error(kv(store="write", error=e))
        except (StoreError, OSError) as e:
            self.errors += 1
            log.error(kv(store="write", error=e, chunks=len(chunks)))
