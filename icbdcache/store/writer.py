"""The store's one batched writer: a thread that commits many faulted chunks per transaction.

Readers never wait for it: a chunk handed to :meth:`BatchWriter.put` is readable at once through
:meth:`BatchWriter.pending` until its transaction commits. Access ticks (for eviction) and
counters are gathered in memory and written with the next batch, or every ``idle_flush``
seconds.

The queue is bounded: at most ``max_queued`` bytes of chunks wait for a transaction (plus the
one chunk that crossed the bound). A producer in a thread of its own (import, publish, bundle
import) blocks in :meth:`BatchWriter.put` until the writer catches up; the event loop's fault
layer never blocks: it asks :meth:`BatchWriter.over` before it fetches and keeps a chunk only in
memory when the queue is full (docs/store.md, "The writer's queue").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from icbdcache.log import kv
from icbdcache.store.lmdbstore import ChunkMismatch, Store, StoreError

log = logging.getLogger("icbdcache.store")


class BatchWriter:
    """Batches writes to ``store``: at most ``max_items`` chunks or ``max_bytes`` bytes per
    transaction, waiting at most ``max_delay`` seconds to fill one (``after_delay`` while a
    caller waits for the commit: :meth:`after_queued`). ``protect``: the pending
    version (``IMI@VERSION``, :meth:`Store.reserve_version`) whose chunks these are; each
    batch notes them under it in its own transaction, so no eviction takes them before the
    version exists. ``max_queued``: bytes of chunks the queue holds before :meth:`put`
    blocks and :meth:`over` says so."""

    def __init__(self, store: Store, *, max_items: int = 256, max_bytes: int = 16 << 20,
                 max_delay: float = 0.02, after_delay: float = 0.002, idle_flush: float = 5.0,
                 protect: str | None = None, max_queued: int = 64 << 20) -> None:
        self.store = store
        self.protect = protect
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.after_delay = after_delay
        self.idle_flush = idle_flush
        self.max_queued = max_queued
        #: bytes of the chunks in ``_chunks``
        self._queued_bytes = 0
        #: the most ``_queued_bytes`` has been (for tests and stats)
        self.queued_peak = 0
        self._cv = threading.Condition()
        self._chunks: dict[bytes, bytes] = {}  # queued, not yet committed
        self._writing: dict[bytes, bytes] = {}  # in the transaction being written
        self._updates: list[tuple[str, int, bytes]] = []
        #: map entries learned with a queued chunk: committed in the chunk's transaction,
        #: never before it (another process that reads the entry finds the chunk held)
        self._linked: dict[bytes, list[tuple[str, int, bytes]]] = {}
        self._touched: set[bytes] = set()
        self._stats: Counter[str] = Counter()
        #: Queue positions: every put is numbered; ``_first`` the number of each chunk still
        #: queued (insertion order, so the first is the oldest); ``_after`` callbacks waiting
        #: for a number to be committed (:meth:`after_queued`).
        self._seq = 0
        self._first: dict[bytes, int] = {}
        self._after: list[tuple[int, Callable[[], None], bool]] = []  # (number, fn, urgent)
        self._urgent = 0  # of ``_after``, those that hurry the batch (``after_delay``)
        #: called (in the writer's thread) after each commit with learned map entries
        self.on_learned: Callable[[], None] | None = None
        self._stop = False
        self._done = False  # the thread has ended
        self._died = False  # ... of an unexpected error
        self.batches = 0
        self.errors = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="icbd-store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ producers (any thread)

    def put(self, key: bytes, data: bytes,
            updates: Sequence[tuple[str, int, bytes]] = (), *, block: bool = True) -> None:
        """Queue chunk ``key`` (already verified by the caller) and learned map entries
        (committed in the chunk's transaction). With ``block``, first wait while
        ``max_queued`` bytes are queued (never on the event loop: pass ``block=False`` and
        ask :meth:`over` first)."""
        with self._cv:
            while block and self._queued_bytes >= self.max_queued and not self._done:
                self._cv.notify()
                self._cv.wait(0.5)
            if self._died:
                raise StoreError("the store's writer stopped after an error (see the log)")
            self._seq += 1
            idle = not self._chunks
            old = self._chunks.get(key)
            self._queued_bytes += len(data) - (len(old) if old is not None else 0)
            self.queued_peak = max(self.queued_peak, self._queued_bytes)
            self._chunks[key] = data
            self._first.setdefault(key, self._seq)
            if updates:
                self._linked.setdefault(key, []).extend(updates)
            self._idle.clear()
            # wake the writer only when it waits for this: an empty queue, or a full batch
            # (while a batch fills, its own timed wait ends it; a wake per chunk cost a
            # thread switch per fault)
            if (idle or len(self._chunks) >= self.max_items
                    or self._queued_bytes >= self.max_bytes):
                self._cv.notify_all()

    def put_updates(self, updates: Sequence[tuple[str, int, bytes]]) -> None:
        """Queue learned map entries that come with no chunk (all-zero chunks, chunks not
        kept). Dropped once the writer has stopped (nothing would commit them)."""
        with self._cv:
            if self._done:
                return
            self._seq += 1
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

    def after_queued(self, fn: Callable[[], None], *, urgent: bool = True) -> None:
        """Call ``fn()`` (in the writer's thread, or here when the writer has stopped) once
        everything queued so far is committed, or its transaction failed: the moment other
        processes can read it (the fault leases are given back then). ``urgent``: another
        process may wait for it, so the batch is committed within ``after_delay``, not
        ``max_delay``. ``fn`` must not raise."""
        with self._cv:
            if not self._done:
                self._after.append((self._seq, fn, urgent))
                if urgent:
                    self._urgent += 1
                    if self._urgent == 1:  # the writer may be idle, or filling a batch for
                        self._cv.notify_all()  # ``max_delay``: shortened to ``after_delay``
                return
        fn()

    def over(self) -> bool:
        """Whether ``max_queued`` bytes of chunks wait for the writer (a caller on the event
        loop then holds off fetching, or keeps what it fetched in memory only), or the writer
        has stopped."""
        return self._done or self._queued_bytes >= self.max_queued

    @property
    def stopped(self) -> bool:
        """Whether the writer's thread has ended (closed, or died of an error it logged):
        nothing more is committed."""
        return self._done

    @property
    def queued_bytes(self) -> int:
        """Bytes of chunks queued and not yet in a transaction."""
        return self._queued_bytes

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
        updates = self._updates
        self._updates = []
        size = 0
        for k in list(self._chunks):
            if len(chunks) >= self.max_items or size >= self.max_bytes:
                break
            v = self._chunks.pop(k)
            self._queued_bytes -= len(v)
            self._first.pop(k, None)
            updates.extend(self._linked.pop(k, ()))
            chunks[k] = v
            size += len(v)
        return chunks, updates

    def _run(self) -> None:
        """The thread: :meth:`_loop`, and whatever ends it, the end made known (producers
        stop waiting, callbacks waiting on a commit run: fault leases are given back)."""
        try:
            self._loop()
        except BaseException as e:
            log.error(kv(store="writer", error=f"{type(e).__name__}: {e}", stopped=True))
            with self._cv:
                self._died = True
        finally:
            while True:  # callbacks first, then the end is known (none is left behind)
                with self._cv:
                    rest, self._after = self._after, []
                    self._urgent = 0
                    if not rest:
                        self._done = True
                        self._cv.notify_all()
                        break
                for _, fn, _ in rest:
                    try:
                        fn()
                    except Exception as e:  # a callback's error must not hide the others
                        log.error(kv(store="writer", callback_error=e))
            self._idle.set()

    def _fill(self) -> None:
        """Let a batch fill (call holding ``_cv``): until ``max_items`` chunks or
        ``max_bytes`` are queued, or ``max_delay`` has passed, or ``after_delay`` once a
        caller waits for the commit (other processes waiting on fault leases pay the commit
        and at most ``after_delay``, even when the first of them comes during the wait)."""
        start = time.monotonic()
        while (self._chunks and len(self._chunks) < self.max_items
               and self._queued_bytes < self.max_bytes and not self._stop):
            left = start + (self.after_delay if self._urgent else self.max_delay) \
                - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def _loop(self) -> None:
        last = time.monotonic()
        while True:
            with self._cv:
                if (not self._chunks and not self._updates and not self._stop
                        and not self._after):
                    self._idle.set()
                    self._cv.wait(self.idle_flush)
                self._fill()
                chunks, updates = self._take()
                # committed once this batch is: every put before the oldest one left queued
                upto = next(iter(self._first.values())) - 1 if self._first else self._seq
                ready = [(fn, u) for n, fn, u in self._after if n <= upto]
                self._after = [a for a in self._after if a[0] > upto]
                self._urgent -= sum(u for _, u in ready)
                # the loop stands aside for the puts only when the batch is awaited: another
                # process waits on a lease of it, or the queue is half full (before long a
                # fault's chunk would be served unkept); else the loop keeps the GIL first
                aside = (any(u for _, u in ready)
                         or self._queued_bytes + sum(map(len, chunks.values()))
                         >= self.max_queued // 2)
                self._writing = chunks
                stop = self._stop and not self._chunks and not self._updates
                touched, self._touched = self._touched, set()
                stats, self._stats = self._stats, Counter()
            try:
                if chunks or updates or stats or (touched and (stop or time.monotonic() - last
                                                               > 1.0)):
                    self._commit(chunks, updates, touched, dict(stats), aside)
                    last = time.monotonic()
            finally:  # also when the commit raised what it does not expect
                with self._cv:
                    self._writing = {}
                    self._cv.notify_all()  # producers blocked in put() see room
                for fn, _ in ready:
                    try:
                        fn()
                    except Exception as e:  # a callback's error must not hide the others
                        log.error(kv(store="writer", callback_error=e))
            if stop:
                return  # (_run runs what still waits and makes the end known)

    def _commit(self, chunks: dict[bytes, bytes], updates: list[tuple[str, int, bytes]],
                touched: set[bytes], stats: dict[str, int], aside: bool = True) -> None:
        try:
            self.store.write_batch(chunks.items(), updates, touched, stats,
                                   protect=self.protect, aside=aside)
            self.batches += 1
        except ChunkMismatch as e:  # a caller's bug: verification happens before put()
            self.errors += 1
            log.error(kv(store="write", error=e))
            return
        except (StoreError, OSError) as e:
            self.errors += 1
            log.error(kv(store="write", error=e, chunks=len(chunks)))
            return
        if updates and self.on_learned is not None:
            try:
                self.on_learned()
            except Exception as e:  # others may fetch a chunk learned here once more; the
                log.warning(kv(store="write", learned_count=e))  # writer goes on
