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
                                                                               put_version
versions    ``IMI@VERSION``            JSON :class:`VersionMeta`               version, versions,
                                                                               put_version,
                                                                               delete_version
meta        text key                   ``held`` (u64 bytes of chunks),         held, stats,
                                       ``tick``, ``latest:IMI``, ``stats``     latest, set_latest
                                       (JSON counters)
profiles    ``IMI@VERSION``            u32 big-endian chunk indexes in         profile,
                                       first-read order                        put_profile
records     text key                   opaque bytes of other parts (the        record, records,
                                       embedded registry, the replica's        put_record,
                                       state)                                  update_records
==========  =========================  ======================================  ===================

Rules (py-lmdb): a buffer from a read transaction is only valid inside it, so every read here
copies out what it returns before the transaction ends (:meth:`Store.with_chunks` hands its
caller the buffers and ends the transaction when the caller returns); one environment per
process, opened after any fork; writes go through one writer at a time (:class:`~icbdcache.
store.writer.BatchWriter` batches many chunks per transaction). Every chunk is checked against
its digest before it is stored. The ``held`` counter changes in the same transaction as the
chunks, so a killed process leaves it consistent.

The store is sealed: ``lmdb`` is imported, and environments and transactions are opened, only
in this package (``tests/store/test_sealed.py`` checks the imports); ``Store.env`` and
``Store.db`` are its own. Every method raises :class:`StoreError` where LMDB fails, so callers
never see ``lmdb.Error``.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import lmdb

from icbdcache.store.chunks import CHUNK_SIZE, DIGEST_SIZE, UNKNOWN, ZERO, chunk_count, digest

_U64 = struct.Struct(">Q")
_DBS = ("chunks", "atime", "maps", "versions", "meta", "profiles", "records")

P = ParamSpec("P")
T = TypeVar("T")

#: ``get(digest)``: a held chunk's bytes as a buffer into LMDB (valid only inside the read
#: transaction that handed out ``get``), or None if the chunk is not held.
ChunkGet = Callable[[bytes], memoryview | None]
#: ``get(key)``: the value of record ``key``, or None.
RecordGet = Callable[[str], bytes | None]
#: ``put(key, value)``: set record ``key``; a value of None deletes it.
RecordPut = Callable[[str, bytes | None], None]


class StoreError(Exception):
    """The store cannot do what was asked (unknown version, bad chunk, full)."""


class ChunkMismatch(StoreError):
    """A chunk's bytes do not hash to the digest it was offered under."""


@dataclass
class VersionMeta:
    """What the store knows of one iMI version. Sizes in bytes."""

    imi: str
    version: str
    size: int
    chunk_size: int = CHUNK_SIZE
    sources: list[str] = field(default_factory=list)
    pinned: bool = False
    created: float = 0.0
    kernel: str | None = None
    initrd: str | None = None

    @property
    def key(self) -> str:
        return version_key(self.imi, self.version)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)


def version_key(imi: str, version: str) -> str:
    """``IMI@VERSION``, the name of a version everywhere (export names too)."""
    return f"{imi}@{version}"


def split_key(key: str) -> tuple[str, str | None]:
    """``IMI@VERSION`` -> (IMI, VERSION); ``IMI`` -> (IMI, None)."""
    imi, sep, version = key.rpartition("@")
    return (imi, version) if sep else (key, None)


def _lmdb_errors(method: Callable[Concatenate[Store, P], T]) -> Callable[Concatenate[Store, P], T]:
    """A :class:`Store` method that raises StoreError where LMDB raised ``lmdb.Error``, so
    nothing outside this package needs ``lmdb`` (the caller's own exceptions pass through)."""
    @functools.wraps(method)
    def wrapper(self: Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(self, *args, **kwargs)
        except lmdb.Error as e:
            raise self._failed(e) from e

    return wrapper


class Store:
    """An LMDB store at ``path`` (a directory, created if missing).

    ``size_limit`` bounds the bytes of chunks held (None: unbounded); chunks of pinned versions
    are never evicted. ``map_size`` is LMDB's address-space reservation (grown on demand).
    Raises StoreError if the environment cannot be opened; every method raises StoreError
    when LMDB fails (an I/O error, a key too long, ...).
    """

    def __init__(self, path: str | os.PathLike[str], *, size_limit: int | None = None,
                 map_size: int | None = None, readonly: bool = False) -> None:
        self.path = os.fspath(path)
        self.size_limit = size_limit
        self.readonly = readonly
        if not readonly:
            os.makedirs(self.path, exist_ok=True)
        if map_size is None:
            map_size = max(1 << 30, int((size_limit or (64 << 30)) * 1.5))
        try:
            self.env = lmdb.open(
                self.path, map_size=map_size, max_dbs=len(_DBS) + 2, max_readers=512,
                readonly=readonly, readahead=False, metasync=True, sync=True, lock=True,
                create=not readonly,
            )
        except lmdb.Error as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        try:
            self.env.reader_check()
            self.db = {name: self.env.open_db(name.encode(), create=not readonly)
                       for name in _DBS}
        except lmdb.Error as e:  # read-only, and a database not created yet
            self.env.close()
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        self._write_lock = threading.Lock()

    def _failed(self, e: Exception) -> StoreError:
        """The StoreError for LMDB's failure ``e`` in this store."""
        return StoreError(f"store {self.path}: {e}")

    @_lmdb_errors
    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ chunks

    # get_chunk, has_chunk and map_entry run on each read that misses the hot set: they
    # catch lmdb.Error themselves (free in Python 3.11) instead of paying _lmdb_errors' call.

    def get_chunk(self, key: bytes) -> bytes | None:
        """The bytes of chunk ``key`` (copied out of LMDB), or None if not held."""
        try:
            with self.env.begin(db=self.db["chunks"], buffers=True) as txn:
                buf = txn.get(key)
                return bytes(buf) if buf is not None else None
        except lmdb.Error as e:
            raise self._failed(e) from e

    def has_chunk(self, key: bytes) -> bool:
        """Whether chunk ``key`` is held."""
        try:
            with self.env.begin(db=self.db["chunks"], buffers=True) as txn:
                return txn.get(key) is not None
        except lmdb.Error as e:
            raise self._failed(e) from e

    def begin_chunks(self) -> Any:
        """A read transaction on the chunks (``get(digest) -> buffer | None``, ``abort()``)
        whose buffers are valid until it is aborted: for :class:`~icbdcache.store.reader.
        ReadTxn`, the read path's one transaction per request. Raises StoreError."""
        try:
            return self.env.begin(db=self.db["chunks"], buffers=True)
        except lmdb.Error as e:
            raise self._failed(e) from e

    @_lmdb_errors
    def missing(self, keys: Iterable[bytes]) -> list[bytes]:
        """The keys in ``keys`` (not ZERO or UNKNOWN) that are not held, without duplicates."""
        out: list[bytes] = []
        seen: set[bytes] = set()
        with self.env.begin(db=self.db["chunks"], buffers=True) as txn:
            for k in keys:
                if k in seen or k in (ZERO, UNKNOWN):
                    continue
                seen.add(k)
                if txn.get(k) is None:
                    out.append(k)
        return out

    @_lmdb_errors
    def chunk_lengths(self, keys: Iterable[bytes]) -> list[int | None]:
        """The length in bytes of each chunk of ``keys`` (None where not held), in order, read
        in one read transaction without copying the chunks."""
        with self.env.begin(db=self.db["chunks"], buffers=True) as txn:
            out: list[int | None] = []
            for k in keys:
                buf = txn.get(k)
                out.append(len(buf) if buf is not None else None)
        return out

    @_lmdb_errors
    def held_bytes(self, keys: Iterable[bytes]) -> int:
        """Bytes of the chunks of ``keys`` that are held, each distinct digest counted once,
        read in one read transaction."""
        held = 0
        with self.env.begin(db=self.db["chunks"], buffers=True) as txn:
            for k in set(keys):
                buf = txn.get(k)
                if buf is not None:
                    held += len(buf)
        return held

    @_lmdb_errors
    def with_chunks(self, fn: Callable[[ChunkGet], T]) -> T:
        """``fn(get)`` inside one read transaction, returning what it returns: ``get(digest)``
        is the held chunk's bytes as a buffer into LMDB, or None. The buffers are valid only
        until ``fn`` returns (py-lmdb), so ``fn`` copies out what it keeps; this is how a
        caller moves chunks with one copy. The chunks seen are one consistent snapshot.
        Exceptions of ``fn`` pass through; an LMDB failure raises StoreError."""
        with self.env.begin(db=self.db["chunks"], buffers=True) as txn:
            return fn(txn.get)

    @_lmdb_errors
    def write_batch(
        self,
        chunks: Iterable[tuple[bytes, bytes]] = (),
        map_updates: Iterable[tuple[str, int, bytes]] = (),
        touched: Iterable[bytes] = (),
        stats: dict[str, int] | None = None,
    ) -> int:
        """One write transaction: store ``chunks`` ((digest, bytes), each verified; raises
        ChunkMismatch before anything is written if one does not match), set learned map
        entries ((version key, index, digest)), record access ticks for ``touched`` digests,
        add ``stats`` counters, then evict cold chunks while over ``size_limit``.
        Returns the bytes of chunks added."""
        items = [(k, bytes(v)) for k, v in chunks]
        for k, v in items:
            if digest(v) != k:
                raise ChunkMismatch(f"chunk {k.hex()} does not match its bytes")
        updates = list(map_updates)
        with self._write_lock:
            return self._retry(lambda txn: self._write(txn, items, updates, touched, stats))

    def _retry(self, fn: Callable[[Any], T]) -> T:
        """``fn(txn)`` in one write transaction, run again in a new one after growing the map
        if it was full (at most 8 times). Call with ``_write_lock`` held."""
        for _ in range(8):
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        raise StoreError("LMDB map full after growing it 8 times")

    def _write(self, txn: lmdb.Transaction, items: list[tuple[bytes, bytes]],
               updates: list[tuple[str, int, bytes]], touched: Iterable[bytes],
               stats: dict[str, int] | None) -> int:
        chunks_db, atime_db, meta_db = self.db["chunks"], self.db["atime"], self.db["meta"]
        held = _get_u64(txn, meta_db, b"held")
        tick = _get_u64(txn, meta_db, b"tick") + 1
        tick_b = _U64.pack(tick)
        added = 0
        for k, v in items:
            if txn.put(k, v, db=chunks_db, overwrite=False):
                added += len(v)
            txn.put(k, tick_b, db=atime_db)
        for k in touched:
            if txn.get(k, db=chunks_db) is not None:
                txn.put(k, tick_b, db=atime_db)
        if updates:
            maps_db = self.db["maps"]
            blobs: dict[str, bytearray] = {}
            for vkey, index, d in updates:
                blob = blobs.get(vkey)
                if blob is None:
                    raw = txn.get(vkey.encode(), db=maps_db)
                    if raw is None:
                        continue
                    blob = blobs[vkey] = bytearray(raw)
                blob[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = d
            for vkey, blob in blobs.items():
                txn.put(vkey.encode(), bytes(blob), db=maps_db)
        held += added
        if self.size_limit is not None and held > self.size_limit:
            held -= self._evict(txn, held - int(self.size_limit * 0.9))
        txn.put(b"held", _U64.pack(held), db=meta_db)
        txn.put(b"tick", tick_b, db=meta_db)
        if stats:
            cur = json.loads(bytes(txn.get(b"stats", b"{}", db=meta_db)))
            for name, n in stats.items():
                cur[name] = cur.get(name, 0) + n
            txn.put(b"stats", json.dumps(cur).encode(), db=meta_db)
        return added

    def _evict(self, txn: lmdb.Transaction, need: int) -> int:
        """Delete the coldest unpinned chunks until ``need`` bytes are freed; return bytes."""
        pinned = self._pinned_digests(txn)
        chunks_db, atime_db = self.db["chunks"], self.db["atime"]
        candidates: list[tuple[int, bytes]] = []
        with txn.cursor(db=chunks_db) as cur:
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if k in pinned:
                    continue
                t = txn.get(k, db=atime_db)
                candidates.append((_U64.unpack(t)[0] if t is not None else 0, k))
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
        self._count(txn, "evicted_bytes", freed)
        return freed

    def _count(self, txn: lmdb.Transaction, name: str, n: int) -> None:
        meta_db = self.db["meta"]
        cur = json.loads(bytes(txn.get(b"stats", b"{}", db=meta_db)))
        cur[name] = cur.get(name, 0) + n
        txn.put(b"stats", json.dumps(cur).encode(), db=meta_db)

    def _pinned_digests(self, txn: lmdb.Transaction) -> set[bytes]:
        out: set[bytes] = set()
        for meta in self._versions(txn):
            if meta.pinned:
                raw = txn.get(meta.key.encode(), db=self.db["maps"])
                if raw is not None:
                    blob = bytes(raw)
                    out.update(blob[i : i + DIGEST_SIZE] for i in range(0, len(blob), DIGEST_SIZE))
        return out

    @property
    @_lmdb_errors
    def held(self) -> int:
        """Bytes of chunks held."""
        with self.env.begin(db=self.db["meta"]) as txn:
            return _get_u64(txn, self.db["meta"], b"held")

    # ------------------------------------------------------------------ versions

    @_lmdb_errors
    def put_version(self, meta: VersionMeta, chunk_map: bytes | None = None) -> None:
        """Create or replace a version's metadata and (if given) its chunk map; a version
        without a map gets one of UNKNOWN entries. Raises StoreError on a bad map length."""
        if chunk_map is not None and len(chunk_map) != meta.chunks * DIGEST_SIZE:
            raise StoreError(f"chunk map of {meta.key} has the wrong length")

        def fn(txn: lmdb.Transaction) -> int:
            k = meta.key.encode()
            txn.put(k, json.dumps(asdict(meta)).encode(), db=self.db["versions"])
            if chunk_map is not None:
                txn.put(k, bytes(chunk_map), db=self.db["maps"])
            elif txn.get(k, db=self.db["maps"]) is None:
                txn.put(k, UNKNOWN * meta.chunks, db=self.db["maps"])
            return 0

        with self._write_lock:
            self._retry(fn)

    @_lmdb_errors
    def version(self, key: str) -> VersionMeta | None:
        """The version ``IMI@VERSION``, or the latest of ``IMI``; None if unknown."""
        imi, ver = split_key(key)
        with self.env.begin() as txn:
            if ver is None:
                latest = txn.get(f"latest:{imi}".encode(), db=self.db["meta"])
                if latest is None:
                    return None
                key = version_key(imi, bytes(latest).decode())
            raw = txn.get(key.encode(), db=self.db["versions"])
            return VersionMeta(**json.loads(bytes(raw))) if raw is not None else None

    @_lmdb_errors
    def versions(self) -> list[VersionMeta]:
        with self.env.begin() as txn:
            return list(self._versions(txn))

    def _versions(self, txn: lmdb.Transaction) -> Iterator[VersionMeta]:
        with txn.cursor(db=self.db["versions"]) as cur:
            for _, v in cur:
                yield VersionMeta(**json.loads(bytes(v)))

    @_lmdb_errors
    def chunk_map(self, key: str) -> bytearray:
        """The chunk map of version ``key`` (a copy). Raises StoreError if unknown."""
        with self.env.begin(db=self.db["maps"]) as txn:
            raw = txn.get(key.encode())
            if raw is None:
                raise StoreError(f"no chunk map for {key}")
            return bytearray(raw)

    def map_entry(self, key: str, index: int) -> bytes:
        """Entry ``index`` of the stored chunk map of version ``key`` (a digest, ZERO or
        UNKNOWN); UNKNOWN if there is no such map or index. Reads 16 bytes, not the map."""
        try:
            with self.env.begin(db=self.db["maps"], buffers=True) as txn:
                raw = txn.get(key.encode())
                if raw is None:
                    return UNKNOWN
                entry = bytes(raw[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])
                return entry if len(entry) == DIGEST_SIZE else UNKNOWN
        except lmdb.Error as e:
            raise self._failed(e) from e

    @_lmdb_errors
    def set_latest(self, imi: str, version: str) -> None:
        """Point ``IMI`` (the export name without a version) at ``version``, atomically."""
        def fn(txn: lmdb.Transaction) -> int:
            txn.put(f"latest:{imi}".encode(), version.encode(), db=self.db["meta"])
            return 0

        with self._write_lock:
            self._retry(fn)

    @_lmdb_errors
    def latest(self, imi: str) -> str | None:
        with self.env.begin(db=self.db["meta"]) as txn:
            raw = txn.get(f"latest:{imi}".encode())
            return bytes(raw).decode() if raw is not None else None

    @_lmdb_errors
    def set_pinned(self, key: str, pinned: bool) -> None:
        meta = self.version(key)
        if meta is None:
            raise StoreError(f"unknown version {key}")
        meta.pinned = pinned
        self.put_version(meta)

    @_lmdb_errors
    def held_of(self, key: str) -> tuple[int, int]:
        """(bytes held, bytes needed) of version ``key``: non-zero chunks present / all."""
        meta = self.version(key)
        if meta is None:
            raise StoreError(f"unknown version {key}")
        blob = self.chunk_map(meta.key)
        held = need = 0
        with self.env.begin(db=self.db["chunks"], buffers=True) as txn:
            for i in range(meta.chunks):
                d = bytes(blob[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
                if d == ZERO:
                    continue
                n = min(meta.chunk_size, meta.size - i * meta.chunk_size)
                need += n
                if d != UNKNOWN and txn.get(d) is not None:
                    held += n
        return held, need

    @_lmdb_errors
    def delete_version(self, key: str) -> None:
        """Forget version ``key``: its metadata, chunk map and profile (its chunks stay until
        evicted; a ``latest`` pointer at it is removed). No error if unknown."""
        imi, ver = split_key(key)

        def fn(txn: lmdb.Transaction) -> int:
            k = key.encode()
            for db in ("versions", "maps", "profiles"):
                txn.delete(k, db=self.db[db])
            lk = f"latest:{imi}".encode()
            if ver is not None and txn.get(lk, db=self.db["meta"]) == ver.encode():
                txn.delete(lk, db=self.db["meta"])
            return 0

        with self._write_lock:
            self._retry(fn)

    # ------------------------------------------------------------------ records

    def put_record(self, key: str, value: bytes | None) -> None:
        """Set (or with None delete) record ``key`` of the ``records`` database."""
        def fn(_get: RecordGet, put: RecordPut) -> None:
            put(key, value)

        self.update_records(fn)

    @_lmdb_errors
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

        with self._write_lock:
            return self._retry(body)

    @_lmdb_errors
    def record(self, key: str) -> bytes | None:
        with self.env.begin(db=self.db["records"]) as txn:
            raw = txn.get(key.encode())
            return bytes(raw) if raw is not None else None

    @_lmdb_errors
    def records(self, prefix: str) -> list[tuple[str, bytes]]:
        """(key, value) of every record whose key starts with ``prefix``, in key order."""
        p = prefix.encode()
        out: list[tuple[str, bytes]] = []
        with self.env.begin(db=self.db["records"]) as txn, txn.cursor() as cur:
            if cur.set_range(p):
                for k, v in cur:
                    if not bytes(k).startswith(p):
                        break
                    out.append((bytes(k).decode(), bytes(v)))
        return out

    # ------------------------------------------------------------------ profiles, stats

    @_lmdb_errors
    def put_profile(self, key: str, indexes: list[int]) -> None:
        """Record the boot profile of version ``key``: chunk indexes in first-read order."""
        raw = struct.pack(f">{len(indexes)}I", *indexes)

        def fn(txn: lmdb.Transaction) -> int:
            txn.put(key.encode(), raw, db=self.db["profiles"])
            return 0

        with self._write_lock:
            self._retry(fn)

    @_lmdb_errors
    def profile(self, key: str) -> list[int]:
        with self.env.begin(db=self.db["profiles"]) as txn:
            raw = txn.get(key.encode())
            if raw is None:
                return []
            raw = bytes(raw)
            return list(struct.unpack(f">{len(raw) // 4}I", raw))

    @_lmdb_errors
    def stats(self) -> dict[str, int]:
        """Persistent counters (bytes from each source, evictions, ...) and ``held``."""
        with self.env.begin(db=self.db["meta"]) as txn:
            out: dict[str, int] = json.loads(bytes(txn.get(b"stats", b"{}")))
            out["held_bytes"] = _get_u64(txn, self.db["meta"], b"held")
        with self.env.begin() as txn:
            out["chunks"] = txn.stat(self.db["chunks"])["entries"]
        return out

    # ------------------------------------------------------------------ verify

    @_lmdb_errors
    def verify(self, repair: bool = False) -> dict[str, int]:
        """Check every chunk against its digest and the ``held`` counter against the chunks.
        With ``repair``, bad chunks are deleted and the counter fixed. Returns counts:
        ``chunks``, ``bad``, ``held_recorded``, ``held_actual``."""
        bad: list[bytes] = []
        total = count = 0
        with self.env.begin(db=self.db["chunks"], buffers=True) as txn, txn.cursor() as cur:
            for k, v in cur:
                count += 1
                total += len(v)
                if digest(v) != bytes(k):
                    bad.append(bytes(k))
        recorded = self.held
        if repair and (bad or recorded != total):
            def fn(txn: lmdb.Transaction) -> int:
                held = total
                for k in bad:
                    v = txn.get(k, db=self.db["chunks"])
                    held -= len(v) if v is not None else 0
                    txn.delete(k, db=self.db["chunks"])
                txn.put(b"held", _U64.pack(held), db=self.db["meta"])
                return 0

            with self._write_lock:
                self._retry(fn)
        return {"chunks": count, "bad": len(bad), "held_recorded": recorded,
                "held_actual": total}


def _get_u64(txn: lmdb.Transaction, db: Any, key: bytes) -> int:
    raw = txn.get(key, db=db)
    return int(_U64.unpack(bytes(raw))[0]) if raw is not None else 0
