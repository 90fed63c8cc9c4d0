"""The node's store: one LMDB environment holding chunks, chunk maps and metadata.

Databases (LMDB named sub-databases), their records, and the :class:`Store` methods that
reach them:

==========  =========================  ======================================  ===================
db          key                        value                                   methods
==========  =========================  ======================================  ===================
chunks      digest (16 bytes)          the chunk's bytes (never all zeros)     get_chunk,
                                                                               has_chunk,
                                                                               missing,
                                                                               chunk_lengths,
                                                                               held_bytes,
                                                                               with_chunks,
                                                                               write_batch, verify
atime       digest                     u64 big-endian access tick (eviction)   write_batch
maps        ``IMI@VERSION`` (UTF-8)    digests, 16 bytes per chunk index       chunk_map,
                                       (ZERO, UNKNOWN)                         map_entry,
                                                                               commit_version,
                                                                               create_version
strong      ``IMI@VERSION``            BLAKE3-256 digests, 32 bytes per chunk  strong_map,
                                       index (STRONG_ZERO, STRONG_UNKNOWN)     adopt_signed
versions    ``IMI@VERSION``            JSON :class:`VersionMeta`               version, versions,
                                                                               update_version,
                                                                               delete_version
pending     ``IMI@VERSION``            JSON :class:`Pending` (a version        reserve_version,
            ``IMI@VERSION/TICK``       being copied) and the digests it        commit_version,
                                       protects, one record per batch          pending_versions
meta        text key                   ``held`` (u64 bytes of chunks),         held, stats,
                                       ``tick``, ``latest:IMI``, ``stats``     latest, set_latest,
                                       (JSON counters), ``store_id``,          identity, bound,
                                       ``bound`` (u64, the served bound),      set_bound,
                                       ``format`` (storeformat.py)             upgrade
profiles    ``IMI@VERSION``            u32 big-endian chunk indexes in         profile,
                                       first-read order                        put_profile
records     text key                   opaque bytes of other parts (the        record, records,
                                       embedded registry, the replica's        put_record,
                                       state, ``inuse/PID`` of servers)        update_records
==========  =========================  ======================================  ===================

Rules (py-lmdb): a buffer from a read transaction is only valid inside it, so every read here
copies out what it returns before the transaction ends (:meth:`Store.with_chunks` hands its
caller the buffers and ends the transaction when the caller returns); one environment per
process, opened after any fork; writes go through one writer at a time (:class:`~icbdcache.
store.writer.BatchWriter` batches many chunks per transaction). Every chunk is checked against
its digest before it is stored. The ``held`` counter changes in the same transaction as the
chunks, so a killed process leaves it consistent.

Many processes share a store (docs/store.md, 'CONCURRENCY'): every change that checks
something and writes (a version's creation, its pin, ``latest``, eviction) is one write
transaction, and LMDB serialises write transactions across processes. Every transaction passes
the process's :class:`~icbdcache.store.gate.TxnGate`: when another process grew the file past
this process's map (``MDB_MAP_RESIZED``), the store maps it again at its new size and goes on.

The store is sealed: ``lmdb`` is imported, and environments and transactions are opened, only
in this package (``tests/store/test_sealed.py`` checks the imports); ``Store.env`` and
``Store.db`` are its own. Every method raises :class:`StoreError` where LMDB fails, so callers
never see ``lmdb.Error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import lmdb

from icbdcache.store import storeformat
from icbdcache.store.chunks import (
    DIGEST_SIZE,
    STRONG_SIZE,
    STRONG_UNKNOWN,
    UNKNOWN,
    ZERO,
    digest,
    strong_digest,
    strong_hex,
)
from icbdcache.store.gate import TxnGate
from icbdcache.store.lifecycle import VersionLifecycle
from icbdcache.store.meta import (
    ChunkMismatch,
    Pending,
    StoreError,
    StoreFull,
    VersionBusy,
    VersionExists,
    VersionInUse,
    VersionMeta,
    split_key,
    version_key,
)
from icbdcache.store.standaside import StandAside, no_step, not_aside
from icbdcache.store.txns import U64, get_u64, held_in, lmdb_errors, scan

__all__ = ["ChunkGet", "ChunkMismatch", "ChunkTxn", "Pending", "RecordGet", "RecordPut",
           "Store", "StoreError", "StoreFull", "VersionBusy", "VersionExists", "VersionInUse",
           "VersionMeta", "split_key", "version_key"]

_DBS = ("chunks", "atime", "maps", "versions", "meta", "profiles", "records", "pending",
        "strong")
#: Databases a store made by an older release may lack (a read-only open sees them empty).
_LATER_DBS = frozenset({"pending", "strong"})

T = TypeVar("T")

#: Puts of access ticks and map entries from which a batch without chunks may also be
#: written with the event loop standing aside (``write_batch(aside=True)``, as a batch with
#: chunks may; store/standaside.py).
ASIDE_PUTS = 256
#: Chunks an eviction looks at per ``step()`` (a look costs a few µs; a chunk's put tens).
SCAN_STEP = 16

#: ``get(digest)``: a held chunk's bytes as a buffer into LMDB (valid only inside the read
#: transaction that handed out ``get``), or None if the chunk is not held.
ChunkGet = Callable[[bytes], memoryview | None]
#: ``get(key)``: the value of record ``key``, or None.
RecordGet = Callable[[str], bytes | None]
#: ``put(key, value)``: set record ``key``; a value of None deletes it.
RecordPut = Callable[[str, bytes | None], None]


class ChunkTxn:
    """A read transaction on the chunks whose buffers are valid until :meth:`abort` (the read
    path's one transaction per request, :class:`~icbdcache.store.reader.ReadTxn`)."""

    __slots__ = ("_gate", "_txn", "get")

    def __init__(self, txn: Any, gate: TxnGate) -> None:
        self._txn = txn
        self._gate = gate
        self.get: Callable[[bytes], Any] = txn.get

    def abort(self) -> None:
        if self._txn is not None:
            try:
                self._txn.abort()
            finally:
                self._txn = None
                self._gate.leave()


class Store(VersionLifecycle):
    """An LMDB store at ``path`` (a directory, created if missing unless ``readonly``; kept
    as an absolute path).

    ``size_limit`` bounds the bytes of chunks held (None: unbounded); chunks of pinned
    versions, of versions being created and of versions clients run are never evicted.
    ``map_size`` is LMDB's address-space reservation (grown on demand; a map another process
    grew is followed). Raises StoreError if the environment cannot be opened, StoreFormatError
    (a StoreError naming ``icbd-cache store upgrade`` for an older store) when the store has a
    format this release does not read, unless ``allow_old`` (the upgrade itself: an older
    store is opened to be upgraded, :meth:`upgrade`); every method raises StoreError when LMDB
    fails (an I/O error, a key too long, ...). :attr:`format` is the store's format.
    """

    def __init__(self, path: str | os.PathLike[str], *, size_limit: int | None = None,
                 map_size: int | None = None, readonly: bool = False,
                 allow_old: bool = False) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.size_limit = size_limit
        self.readonly = readonly
        if not readonly:
            os.makedirs(self.path, exist_ok=True)
        if map_size is None:
            map_size = max(1 << 30, int((size_limit or (64 << 30)) * 1.5))
        try:
            self.env = lmdb.open(
                self.path, map_size=map_size, max_dbs=len(_DBS) + 4, max_readers=512,
                readonly=readonly, readahead=False, metasync=True, sync=True, lock=True,
                create=not readonly,
            )
        except lmdb.Error as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        self._gate = TxnGate()
        self._write_lock = threading.Lock()
        #: what a batch's puts run under (:meth:`write_batch`): an event loop of this
        #: process standing aside (:meth:`stand_aside_for`), or nothing
        self.stand_aside: Callable[[], AbstractContextManager[Callable[[], None]]] = not_aside
        self._fd: int | None = None  # data.mdb, for write_batch(uncached=True)
        #: version key -> (its stored metadata's bytes, their instance): a fault's look at
        #: the stored map (:meth:`map_entry`) decodes a version's JSON once, not every time
        self._instances: dict[bytes, tuple[bytes, str]] = {}
        try:
            self.env.reader_check()
            self.db: dict[str, Any] = {}
            found = self._format()
            if found is not None and not (allow_old and found < storeformat.FORMAT):
                storeformat.check(self.path, found)
            self.format = found if found is not None else storeformat.FORMAT
            for name in _DBS:
                try:
                    self.db[name] = self.env.open_db(name.encode(), create=not readonly)
                except lmdb.NotFoundError:
                    if not readonly or name not in _LATER_DBS:
                        raise
                    self.db[name] = None  # an older store, read-only: nothing pending
            if found is None and not readonly:
                self._transact(lambda txn: txn.put(
                    storeformat.FORMAT_KEY, str(storeformat.FORMAT).encode(),
                    db=self.db["meta"]))
            self.identity = self._identity()
        except storeformat.StoreFormatError:
            self.env.close()
            raise
        except (lmdb.Error, StoreError) as e:  # read-only, and a database not created yet
            self.env.close()
            raise StoreError(f"cannot open store {self.path}: {e}") from e

    def _format(self) -> int | None:
        """The store's format as recorded, read before any database but ``meta`` is opened
        (an older store is not changed by being refused); None for a new, empty store."""
        self.db["meta"] = self.env.open_db(b"meta", create=not self.readonly)
        with self._txn() as txn:
            names = [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
            raw = txn.get(storeformat.FORMAT_KEY, db=self.db["meta"])
            has_id = txn.get(b"store_id", db=self.db["meta"]) is not None
        others = has_id or any(n != b"meta" for n in names)
        return storeformat.parse(bytes(raw) if raw is not None else None, others)

    def _failed(self, e: Exception) -> StoreError:
        """The StoreError for LMDB's failure ``e`` in this store."""
        return StoreError(f"store {self.path}: {e}")

    @lmdb_errors
    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self.env.close()

    # ------------------------------------------------------------------ transactions

    def _begin(self, **kw: Any) -> Any:
        """``env.begin(**kw)`` through the gate (the caller ends it and leaves the gate); a
        map another process grew is mapped again first. Raises lmdb.Error, StoreError."""
        self._gate.enter()
        try:
            return self.env.begin(**kw)
        except lmdb.MapResizedError:
            self._gate.leave()
        except BaseException:
            self._gate.leave()
            raise
        self._remap(0)
        self._gate.enter()
        try:
            return self.env.begin(**kw)
        except BaseException:
            self._gate.leave()
            raise

    def _remap(self, size: int) -> None:
        """Map the file again: at its current size (``size`` 0: another process grew it) or
        at ``size`` bytes, at a moment no transaction of this process is open (gate.py).
        Raises StoreError when no such moment comes (a transaction held meanwhile)."""
        if not self._gate.exclusive(lambda: self.env.set_mapsize(size)):
            raise StoreError(f"store {self.path}: the file grew and the map must follow, but "
                             "transactions of this process stayed open; try again")

    @contextlib.contextmanager
    def _txn(self, **kw: Any) -> Iterator[Any]:
        """A transaction (``env.begin(**kw)``) through the gate: committed when the block
        ends normally (a write), aborted when it raises."""
        txn = self._begin(**kw)
        try:
            with txn:
                yield txn
        finally:
            self._gate.leave()

    def _retry(self, fn: Callable[[Any], T]) -> T:
        """``fn(txn)`` in one write transaction, run again in a new one after growing the map
        if it was full (at most 8 times). Call with ``_write_lock`` held."""
        for _ in range(8):
            try:
                with self._txn(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._remap(self.env.info()["map_size"] * 2)
        raise StoreError("LMDB map full after growing it 8 times")

    def _transact(self, fn: Callable[[Any], T]) -> T:
        """``fn(txn)`` as one write transaction under this process's writer lock."""
        with self._write_lock:
            return self._retry(fn)

    # ------------------------------------------------------------------ identity, bound

    def _identity(self) -> str | None:
        """The store's random id, made when the store is first opened for writing (None for
        a read-only open of a store that never had one)."""
        with self._txn(db=self.db["meta"]) as txn:
            raw = txn.get(b"store_id")
        if raw is not None:
            return bytes(raw).decode()
        if self.readonly:
            return None

        def fn(txn: Any) -> str:
            old = txn.get(b"store_id", db=self.db["meta"])
            if old is not None:
                return bytes(old).decode()
            new = secrets.token_hex(16)
            txn.put(b"store_id", new.encode(), db=self.db["meta"])
            return new

        return self._transact(fn)

    @lmdb_errors
    def set_bound(self, limit: int | None) -> None:
        """Record ``limit`` (bytes; None: none) as the bound the store is served with, so that
        an ``import`` or ``publish`` without ``--store-size`` refuses what cannot fit."""
        def fn(txn: Any) -> None:
            if limit is None:
                txn.delete(b"bound", db=self.db["meta"])
            else:
                txn.put(b"bound", U64.pack(limit), db=self.db["meta"])

        self._transact(fn)

    @property
    @lmdb_errors
    def bound(self) -> int | None:
        """The bound in force for fit checks: this process's ``size_limit``, else the one the
        store is served with (:meth:`set_bound`), else None."""
        if self.size_limit is not None:
            return self.size_limit
        with self._txn(db=self.db["meta"]) as txn:
            raw = txn.get(b"bound")
            return int(U64.unpack(bytes(raw))[0]) if raw is not None else None

    # ------------------------------------------------------------------ chunks

    # get_chunk, has_chunk and map_entry run on each read that misses the hot set: they
    # catch lmdb.Error themselves (free in Python 3.11) instead of paying _lmdb_errors' call.

    def get_chunk(self, key: bytes) -> bytes | None:
        """The bytes of chunk ``key`` (copied out of LMDB), or None if not held."""
        try:
            txn = self._begin(db=self.db["chunks"], buffers=True)
            try:
                buf = txn.get(key)
                return bytes(buf) if buf is not None else None
            finally:
                txn.abort()
                self._gate.leave()
        except lmdb.Error as e:
            raise self._failed(e) from e

    def has_chunk(self, key: bytes) -> bool:
        """Whether chunk ``key`` is held."""
        try:
            txn = self._begin(db=self.db["chunks"], buffers=True)
            try:
                return txn.get(key) is not None
            finally:
                txn.abort()
                self._gate.leave()
        except lmdb.Error as e:
            raise self._failed(e) from e

    def begin_chunks(self) -> ChunkTxn:
        """A read transaction on the chunks (``get(digest) -> buffer | None``, ``abort()``)
        whose buffers are valid until it is aborted: for :class:`~icbdcache.store.reader.
        ReadTxn`, the read path's one transaction per request. Raises StoreError."""
        try:
            return ChunkTxn(self._begin(db=self.db["chunks"], buffers=True), self._gate)
        except lmdb.Error as e:
            raise self._failed(e) from e

    @lmdb_errors
    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys in ``keys`` (not ZERO or UNKNOWN) that are not held, without duplicates."""
        out: list[bytes] = []
        seen: set[bytes] = set()
        with self._txn(db=self.db["chunks"], buffers=True) as txn, txn.cursor() as cur:
            has = cur.set_key  # no value returned: not every page of it touched (held_of)
            for k in keys:
                if k in seen or k in (ZERO, UNKNOWN):
                    continue
                seen.add(k)
                if not has(k):
                    out.append(k)
        return out

    @lmdb_errors
    def chunk_lengths(self, keys: Iterable[bytes]) -> list[int | None]:
        """The length in bytes of each chunk of ``keys`` (None where not held), in order, read
        in one read transaction without copying the chunks."""
        with self._txn(db=self.db["chunks"], buffers=True) as txn:
            out: list[int | None] = []
            for k in keys:
                buf = txn.get(k)
                out.append(len(buf) if buf is not None else None)
        return out

    @lmdb_errors
    def held_bytes(self, keys: Iterable[bytes]) -> int:
        """Bytes of the chunks of ``keys`` that are held, each distinct digest counted once,
        read in one read transaction."""
        with self._txn(db=self.db["chunks"], buffers=True) as txn:
            return held_in(txn, self.db["chunks"], set(keys))

    @lmdb_errors
    def with_chunks(self, fn: Callable[[ChunkGet], T]) -> T:
        """``fn(get)`` inside one read transaction, returning what it returns: ``get(digest)``
        is the held chunk's bytes as a buffer into LMDB, or None. The buffers are valid only
        until ``fn`` returns (py-lmdb), so ``fn`` copies out what it keeps; this is how a
        caller moves chunks with one copy. The chunks seen are one consistent snapshot.
        Exceptions of ``fn`` pass through; an LMDB failure raises StoreError."""
        with self._txn(db=self.db["chunks"], buffers=True) as txn:
            return fn(txn.get)

    @lmdb_errors
    def write_batch(
        self,
        chunks: Iterable[tuple[bytes, bytes | bytearray | memoryview]] = (),
        map_updates: Iterable[tuple[str, int, bytes]] = (),
        touched: Iterable[bytes] = (),
        stats: dict[str, int] | None = None,
        *,
        protect: str | None = None,
        verified: bool = False,
        uncached: bool = False,
        aside: bool = True,
    ) -> int:
        """One write transaction: store ``chunks`` ((digest, bytes), each verified; raises
        ChunkMismatch before anything is written if one does not match; ``verified``: the
        caller checked every chunk's digest already, so it is not computed again), set learned map
        entries ((version key, index, digest); only entries still UNKNOWN are set), record
        access ticks for ``touched`` digests, add ``stats`` counters, note the chunks as
        protected by the pending version ``protect`` (an import or publish copying them: no
        eviction takes them), then evict cold chunks while over ``size_limit``. Returns the
        bytes of chunks added. A chunk given as bytes or a read-only memoryview is not copied
        before LMDB copies it into its pages (a bytearray, which may change, is).
        ``uncached``: once the transaction is committed (and synced), the pages it appended to
        the store's file are dropped from the page cache (:meth:`_drop_cached`), for a bulk
        writer whose chunks no reader has asked for (a replica's pull): its next transaction's
        pages are then the ones just freed. Only a cache: what a process maps of them stays,
        and a later read takes them from the disk. ``aside``: the batch's puts run with this
        process's event loop standing aside (:attr:`stand_aside`; False: the loop keeps the
        GIL first and the puts wait for it, store/standaside.py)."""
        items = [(k, v if type(v) is bytes or (type(v) is memoryview and v.readonly)
                  else bytes(v)) for k, v in chunks]
        if not verified:
            for k, v in items:
                if digest(v) != k:
                    raise ChunkMismatch(f"chunk {k.hex()} does not match its bytes")
        updates = list(map_updates)
        if not isinstance(touched, Collection):
            touched = list(touched)
        # a batch of chunks, or of many ticks or entries: its puts may run with the loop aside
        aside_of = (self.stand_aside if aside and (
            items or len(touched) + len(updates) >= ASIDE_PUTS) else not_aside)
        if not uncached:
            def puts(txn: Any) -> int:
                with aside_of() as step:
                    return self._write(txn, items, updates, touched, stats, protect, step)

            return self._transact(puts)
        start: list[int] = []

        def fn(txn: Any) -> int:
            start.append(self._file_size())  # LMDB's writer lock is held: no other appends
            with aside_of() as step:
                return self._write(txn, items, updates, touched, stats, protect, step)

        added = self._transact(fn)
        self._drop_cached(start[-1])
        return added

    def stand_aside_for(self, loop: asyncio.AbstractEventLoop) -> StandAside:
        """Have ``loop`` (of this process; call on its thread) stand aside while a batch's
        puts run from another thread (store/standaside.py); its :class:`StandAside`, kept
        as :attr:`stand_aside` (the one there already when it is for ``loop``)."""
        current = self.stand_aside
        if isinstance(current, StandAside) and current.loop is loop:
            return current
        aside = StandAside(loop)
        self.stand_aside = aside
        return aside

    def _data_fd(self) -> int:
        """A read-only descriptor of the store's ``data.mdb`` (opened once, closed by
        :meth:`close`), for its size and page-cache advice. Raises OSError."""
        if self._fd is None:
            self._fd = os.open(os.path.join(self.path, "data.mdb"),
                               os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def _file_size(self) -> int:
        """Bytes of the store's file now, or -1 when it cannot be looked at."""
        try:
            return os.fstat(self._data_fd()).st_size
        except OSError:
            return -1

    def _drop_cached(self, start: int) -> None:
        """Drop from the page cache the pages of the store's file from byte ``start`` to its
        end (what a transaction appended: clean, LMDB synced them). Advice only: the pages a
        process maps stay, and a failure is ignored (the pages stay cached)."""
        if start < 0:
            return
        with contextlib.suppress(OSError):
            fd = self._data_fd()
            end = os.fstat(fd).st_size
            if end > start:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _write(self, txn: Any, items: list[tuple[bytes, bytes | memoryview]],
               updates: list[tuple[str, int, bytes]], touched: Iterable[bytes],
               stats: dict[str, int] | None, protect: str | None,
               step: Callable[[], None] = no_step) -> int:
        """The puts of :meth:`write_batch`; ``step()`` after each chunk or tick put
        (store/standaside.py)."""
        chunks_db, atime_db, meta_db = self.db["chunks"], self.db["atime"], self.db["meta"]
        held = get_u64(txn, meta_db, b"held")
        tick = get_u64(txn, meta_db, b"tick") + 1
        tick_b = U64.pack(tick)
        added = 0
        for k, v in items:
            if txn.put(k, v, db=chunks_db, overwrite=False):
                added += len(v)
            txn.put(k, tick_b, db=atime_db)
            step()
        for k in touched:
            if txn.get(k, db=chunks_db) is not None:
                txn.put(k, tick_b, db=atime_db)
                step()
        if updates:
            self._learn(txn, updates)
        if protect is not None and items:
            self._protect(txn, protect, tick, b"".join(k for k, _ in items))
        held += added
        if self.size_limit is not None and held > self.size_limit:
            held -= self._evict(txn, held - int(self.size_limit * 0.9), step)
        txn.put(b"held", U64.pack(held), db=meta_db)
        txn.put(b"tick", tick_b, db=meta_db)
        if stats:
            cur = json.loads(bytes(txn.get(b"stats", b"{}", db=meta_db)))
            for name, n in stats.items():
                cur[name] = cur.get(name, 0) + n
            txn.put(b"stats", json.dumps(cur).encode(), db=meta_db)
        return added

    def _learn(self, txn: Any, updates: list[tuple[str, int, bytes]]) -> None:
        """Set learned map entries that are still UNKNOWN (a version replaced meanwhile has
        a full map: what was learned of the old one never lands in it)."""
        maps_db = self.db["maps"]
        blobs: dict[str, bytearray] = {}
        for vkey, index, d in updates:
            blob = blobs.get(vkey)
            if blob is None:
                raw = txn.get(vkey.encode(), db=maps_db)
                if raw is None:
                    continue
                blob = blobs[vkey] = bytearray(raw)
            lo, hi = index * DIGEST_SIZE, (index + 1) * DIGEST_SIZE
            if blob[lo:hi] == UNKNOWN:
                blob[lo:hi] = d
        for vkey, blob in blobs.items():
            txn.put(vkey.encode(), bytes(blob), db=maps_db)

    def _evict(self, txn: Any, need: int, step: Callable[[], None] = no_step) -> int:
        """Delete the coldest chunks that nothing protects (:meth:`_protected`) until
        ``need`` bytes are freed; return bytes. ``step()`` after each delete and every
        ``SCAN_STEP`` chunks looked at (store/standaside.py)."""
        protected = self._protected(txn)
        chunks_db, atime_db = self.db["chunks"], self.db["atime"]
        candidates: list[tuple[int, bytes]] = []
        with txn.cursor(db=chunks_db) as cur:
            for n, k in enumerate(cur.iternext(keys=True, values=False)):
                if n % SCAN_STEP == SCAN_STEP - 1:
                    step()
                k = bytes(k)
                if k in protected:
                    continue
                t = txn.get(k, db=atime_db)
                candidates.append((U64.unpack(t)[0] if t is not None else 0, k))
        candidates.sort()
        freed = 0
        for _, k in candidates:
            if freed >= need:
                break
            v = txn.get(k, db=chunks_db)
            if v is None:
                continue
            freed += len(v)
            txn.delete(k, db=chunks_db)
            txn.delete(k, db=atime_db)
            step()
        self._count(txn, "evicted_bytes", freed)
        return freed

    def _count(self, txn: Any, name: str, n: int) -> None:
        meta_db = self.db["meta"]
        cur = json.loads(bytes(txn.get(b"stats", b"{}", db=meta_db)))
        cur[name] = cur.get(name, 0) + n
        txn.put(b"stats", json.dumps(cur).encode(), db=meta_db)

    @property
    @lmdb_errors
    def held(self) -> int:
        """Bytes of chunks held."""
        with self._txn(db=self.db["meta"]) as txn:
            return get_u64(txn, self.db["meta"], b"held")

    # ------------------------------------------------------------------ versions (reads)

    @lmdb_errors
    def version(self, key: str) -> VersionMeta | None:
        """The version ``IMI@VERSION``, or the latest of ``IMI``; None if unknown."""
        imi, ver = split_key(key)
        with self._txn() as txn:
            if ver is None:
                latest = txn.get(f"latest:{imi}".encode(), db=self.db["meta"])
                if latest is None:
                    return None
                key = version_key(imi, bytes(latest).decode())
            raw = txn.get(key.encode(), db=self.db["versions"])
            return VersionMeta.from_json(bytes(raw)) if raw is not None else None

    @lmdb_errors
    def versions(self) -> list[VersionMeta]:
        with self._txn() as txn:
            return list(self._versions(txn))

    def _versions(self, txn: Any) -> Iterator[VersionMeta]:
        with txn.cursor(db=self.db["versions"]) as cur:
            for _, v in cur:
                yield VersionMeta.from_json(bytes(v))

    @lmdb_errors
    def chunk_map(self, key: str) -> bytearray:
        """The chunk map of version ``key`` (a copy). Raises StoreError if unknown."""
        with self._txn(db=self.db["maps"]) as txn:
            raw = txn.get(key.encode())
            if raw is None:
                raise StoreError(f"no chunk map for {key}")
            return bytearray(raw)

    @lmdb_errors
    def strong_map(self, key: str) -> bytes | None:
        """The strong map of version ``key`` (STRONG_SIZE bytes per chunk index; a copy), or
        None when it has none (a map learned from a plain NBD upstream, an unknown version)."""
        db = self.db["strong"]
        if db is None:
            return None
        with self._txn(db=db) as txn:
            raw = txn.get(key.encode())
            return bytes(raw) if raw is not None else None

    @lmdb_errors
    def adopt_signed(self, key: str, strong_map: bytes, statement: str | None,
                     signature: str | None, instance: str | None = None) -> list[bytes]:
        """Give version ``key`` (of ``instance``, when given) the strong map and signed
        statement of a manifest (its chunk map is already that manifest's), and delete every
        held chunk of it that does not match its entry of ``strong_map``: one transaction.
        Returns the digests of the chunks deleted (fetched again like any missing chunk).
        Raises StoreError if the version is unknown, was replaced, or the map has the wrong
        length."""
        k = key.encode()

        def fn(txn: Any) -> list[bytes]:
            raw_meta = txn.get(k, db=self.db["versions"])
            if raw_meta is None:
                raise StoreError(f"unknown version {key}")
            meta = VersionMeta.from_json(bytes(raw_meta))
            if instance is not None and meta.instance != instance:
                raise StoreError(f"{key} was replaced meanwhile")
            if len(strong_map) != meta.chunks * STRONG_SIZE:
                raise StoreError(f"strong map of {key} has the wrong length")
            blob = bytes(txn.get(k, db=self.db["maps"]) or b"")
            chunks_db = self.db["chunks"]
            bad: dict[bytes, int] = {}
            for i in range(meta.chunks):
                d = blob[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                want = strong_map[i * STRONG_SIZE : (i + 1) * STRONG_SIZE]
                if d in (ZERO, UNKNOWN) or want == STRONG_UNKNOWN or d in bad:
                    continue
                data = txn.get(d, db=chunks_db)
                if data is not None and strong_digest(data) != want:
                    bad[d] = len(data)
            held = get_u64(txn, self.db["meta"], b"held")
            for d, n in bad.items():
                txn.delete(d, db=chunks_db)
                txn.delete(d, db=self.db["atime"])
                held -= n
            if bad:
                txn.put(b"held", U64.pack(max(0, held)), db=self.db["meta"])
            meta.strong = strong_hex(strong_map)
            meta.statement, meta.signature = statement, signature
            txn.put(k, meta.to_json(), db=self.db["versions"])
            txn.put(k, strong_map, db=self.db["strong"])
            return list(bad)

        return self._transact(fn)

    def map_entry(self, key: str, index: int, instance: str | None = None) -> bytes:
        """Entry ``index`` of the stored chunk map of version ``key`` (a digest, ZERO or
        UNKNOWN); UNKNOWN if there is no such map or index, or (``instance`` given) if the
        version was replaced since that instance was opened. Reads 16 bytes, not the map."""
        try:
            with self._txn(buffers=True) as txn:
                if instance is not None:
                    k = key.encode()
                    raw_meta = txn.get(k, db=self.db["versions"])
                    if raw_meta is None:
                        return UNKNOWN
                    raw = bytes(raw_meta)  # (bytes against bytes: one memcmp; against
                    seen = self._instances.get(k)  # the buffer, an element-wise compare)
                    if seen is None or seen[0] != raw:  # new or changed: decode it
                        seen = (raw, VersionMeta.from_json(raw).instance)
                        self._instances[k] = seen
                    if seen[1] != instance:
                        return UNKNOWN
                raw = txn.get(key.encode(), db=self.db["maps"])
                if raw is None:
                    return UNKNOWN
                entry = bytes(raw[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])
                return entry if len(entry) == DIGEST_SIZE else UNKNOWN
        except lmdb.Error as e:
            raise self._failed(e) from e

    @lmdb_errors
    def set_latest(self, imi: str, version: str) -> None:
        """Point ``IMI`` (the export name without a version) at ``version``, atomically."""
        def fn(txn: Any) -> None:
            txn.put(f"latest:{imi}".encode(), version.encode(), db=self.db["meta"])

        self._transact(fn)

    @lmdb_errors
    def latest(self, imi: str) -> str | None:
        with self._txn(db=self.db["meta"]) as txn:
            raw = txn.get(f"latest:{imi}".encode())
            return bytes(raw).decode() if raw is not None else None

    @lmdb_errors
    def held_of(self, key: str) -> tuple[int, int]:
        """(bytes held, bytes needed) of version ``key``: non-zero chunks present / all, read
        in one transaction. Raises StoreError if unknown."""
        with self._txn(buffers=True) as txn:
            raw_meta = txn.get(key.encode(), db=self.db["versions"])
            if raw_meta is None:
                raise StoreError(f"unknown version {key}")
            meta = VersionMeta.from_json(bytes(raw_meta))
            blob = txn.get(key.encode(), db=self.db["maps"])
            if blob is None:
                raise StoreError(f"no chunk map for {key}")
            blob = bytes(blob)
            held = need = 0
            with txn.cursor(db=self.db["chunks"]) as cur:
                # set_key returns no value: txn.get touches every page of the value it
                # returns (py-lmdb preloads it), 16 per chunk, where LMDB alone reads the
                # first (its header); a 1.4 GB version in a store copied file by file was
                # checked in 0.06 s instead of 0.12 s
                has = cur.set_key
                for i in range(meta.chunks):
                    d = blob[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                    if d == ZERO:
                        continue
                    n = min(meta.chunk_size, meta.size - i * meta.chunk_size)
                    need += n
                    if d != UNKNOWN and has(d):
                        held += n
        return held, need

    # ------------------------------------------------------------------ records

    def put_record(self, key: str, value: bytes | None) -> None:
        """Set (or with None delete) record ``key`` of the ``records`` database."""
        def fn(_get: RecordGet, put: RecordPut) -> None:
            put(key, value)

        self.update_records(fn)

    @lmdb_errors
    def update_records(self, fn: Callable[[RecordGet, RecordPut], T]) -> T:
        """``fn(get, put)`` as ONE write transaction of the ``records`` database, under this
        process's writer lock (LMDB serialises writers across processes), returning what ``fn``
        returns: a read-check-write is atomic. ``get(key) -> bytes | None`` sees the writes
        ``put(key, bytes | None)`` made before it (None deletes). If ``fn`` raises, nothing is
        written and its exception passes through. ``fn`` runs again in a new transaction if the
        map had to grow, so it must not depend on having run once. An LMDB failure (a key
        over 511 bytes, an I/O error) raises StoreError."""
        db = self.db["records"]

        def body(txn: Any) -> T:
            def get(key: str) -> bytes | None:
                raw = txn.get(key.encode(), db=db)
                return bytes(raw) if raw is not None else None

            def put(key: str, value: bytes | None) -> None:
                if value is None:
                    txn.delete(key.encode(), db=db)
                else:
                    txn.put(key.encode(), value, db=db)

            return fn(get, put)

        return self._transact(body)

    @lmdb_errors
    def record(self, key: str) -> bytes | None:
        with self._txn(db=self.db["records"]) as txn:
            raw = txn.get(key.encode())
            return bytes(raw) if raw is not None else None

    @lmdb_errors
    def records(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every record whose key starts with ``prefix``, in key order."""
        with self._txn(db=self.db["records"]) as txn:
            return scan(txn, self.db["records"], prefix)

    # ------------------------------------------------------------------ profiles, stats

    @lmdb_errors
    def put_profile(self, key: str, indexes: list[int], instance: str | None = None) -> bool:
        """Record the boot profile of version ``key``: chunk indexes in first-read order.
        ``instance``: only if the version is still that creation (:attr:`VersionMeta.instance`;
        a server's clients of a version replaced since it was opened read the old image, whose
        profile must not land on the new one). Returns whether it was recorded."""
        raw = struct.pack(f">{len(indexes)}I", *indexes)

        def fn(txn: Any) -> bool:
            if instance is not None:
                meta = txn.get(key.encode(), db=self.db["versions"])
                if meta is None or VersionMeta.from_json(bytes(meta)).instance != instance:
                    return False
            txn.put(key.encode(), raw, db=self.db["profiles"])
            return True

        return self._transact(fn)

    @lmdb_errors
    def profile(self, key: str) -> list[int]:
        """The boot profile of version ``key`` (chunk indexes in first-read order; empty if
        none), without indexes beyond the version's chunks (a profile a store kept from a
        larger image the version replaced)."""
        with self._txn(db=self.db["profiles"]) as txn:
            raw = txn.get(key.encode())
            if raw is None:
                return []
            raw = bytes(raw)
            order = list(struct.unpack(f">{len(raw) // 4}I", raw))
            meta = txn.get(key.encode(), db=self.db["versions"])
            if meta is None:
                return order
            chunks = VersionMeta.from_json(bytes(meta)).chunks
            return [i for i in order if i < chunks]

    @lmdb_errors
    def stats(self) -> dict[str, int]:
        """Persistent counters (bytes from each source, evictions, ...) and ``held``."""
        with self._txn(db=self.db["meta"]) as txn:
            out: dict[str, int] = json.loads(bytes(txn.get(b"stats", b"{}")))
            out["held_bytes"] = get_u64(txn, self.db["meta"], b"held")
            out["chunks"] = txn.stat(self.db["chunks"])["entries"]
        return out

    # ------------------------------------------------------------------ format

    @lmdb_errors
    def upgrade(self) -> dict[str, int]:
        """Upgrade an older store to :data:`storeformat.FORMAT` in place, in one write
        transaction (see :mod:`~icbdcache.store.storeformat`): every version made here gets
        a strong map from the chunks held (STRONG_UNKNOWN for a chunk not held); a version
        from a master gets none (its replica takes the master's signed one on its next
        sync); then the format is recorded. Returns counts: ``from`` (the format found),
        ``versions``, ``hashed`` (chunks hashed), ``unknown`` (strong entries left unknown),
        ``replicated`` (versions left to their master). A store of this format
        is left as it is (``versions`` 0). Raises StoreError (read-only, or LMDB)."""
        if self.readonly:
            raise StoreError(f"store {self.path} is open read-only")
        found = self.format
        out = {"from": found, "versions": 0, "hashed": 0, "unknown": 0, "replicated": 0}
        if found >= storeformat.FORMAT:
            return out

        def fn(txn: Any) -> None:
            chunks_db, strong_db = self.db["chunks"], self.db["strong"]
            memo: dict[bytes, bytes] = {}
            for meta in list(self._versions(txn)):
                k = meta.key.encode()
                blob = bytes(txn.get(k, db=self.db["maps"]) or b"")
                out["versions"] += 1
                if any(s.startswith("icbd+") for s in meta.sources):
                    # from a master: its replica takes the master's signed strong map
                    out["replicated"] += 1
                    continue
                entries: list[bytes] = []
                for i in range(meta.chunks):
                    d = blob[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                    if d == ZERO:
                        entries.append(bytes(STRONG_SIZE))
                        continue
                    e = STRONG_UNKNOWN
                    if d != UNKNOWN:
                        if d not in memo:
                            data = txn.get(d, db=chunks_db)
                            if data is not None and digest(data) == d:
                                memo[d] = strong_digest(data)
                                out["hashed"] += 1
                        e = memo.get(d, STRONG_UNKNOWN)
                    out["unknown"] += e == STRONG_UNKNOWN
                    entries.append(e)
                strong = b"".join(entries)
                txn.put(k, strong, db=strong_db)
                meta.strong = strong_hex(strong)
                txn.put(k, meta.to_json(), db=self.db["versions"])
            txn.put(storeformat.FORMAT_KEY, str(storeformat.FORMAT).encode(),
                    db=self.db["meta"])

        self._transact(fn)
        self.format = storeformat.FORMAT
        return out

    # ------------------------------------------------------------------ verify

    @lmdb_errors
    def verify(self, repair: bool = False) -> dict[str, int]:
        """Check every chunk against its digest and the ``held`` counter against the chunks.
        With ``repair``, bad chunks are deleted and the counter fixed. Returns counts:
        ``chunks``, ``bad``, ``held_recorded``, ``held_actual``."""
        bad: list[bytes] = []
        total = count = 0
        with self._txn(db=self.db["chunks"], buffers=True) as txn, txn.cursor() as cur:
            for k, v in cur:
                count += 1
                total += len(v)
                if digest(v) != bytes(k):
                    bad.append(bytes(k))
        recorded = self.held
        if repair and (bad or recorded != total):
            def fn(txn: Any) -> None:
                held = total
                for k in bad:
                    v = txn.get(k, db=self.db["chunks"])
                    held -= len(v) if v is not None else 0
                    txn.delete(k, db=self.db["chunks"])
                txn.put(b"held", U64.pack(held), db=self.db["meta"])

            self._transact(fn)
        return {"chunks": count, "bad": len(bad), "held_recorded": recorded,
                "held_actual": total}


