"""How versions come and go in a store shared by processes (docs/store.md, 'CONCURRENCY').

Every check and the write it guards are one LMDB write transaction (LMDB serialises write
transactions across processes), so two processes can never both succeed at one name:

* :meth:`~VersionLifecycle.reserve_version` writes a **pending** record (name, pinned, owner
  process, start time) *before* an import or publish reads its image. A second creator of the
  name is refused while the owner lives (:class:`VersionBusy`); a version left without a name
  (``--version`` not given) gets the next free number in the same transaction. A crashed
  owner's record is reclaimed by the next one.
* While the image is copied, every batch of chunks notes its digests under the pending record
  in the batch's own transaction (``write_batch(protect=KEY)``): eviction, in any process,
  never takes a chunk that a pending version (of a live owner), a pinned version or a version
  clients run (:mod:`icbdcache.store.owners`) needs.
* :meth:`~VersionLifecycle.commit_version` turns the pending record into the version in one
  transaction: it checks again that the name is free (or, ``force``, that no client runs the
  version it replaces), that every chunk is held (a copy), that the bound can keep it beside
  everything else that must stay (:class:`StoreFull`), then writes metadata (a new
  ``instance``), map, ``latest``, and drops the pending record.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from icbdcache.store.chunks import DIGEST_SIZE, STRONG_SIZE, UNKNOWN, ZERO, strong_hex
from icbdcache.store.meta import (
    Pending,
    StoreError,
    StoreFull,
    VersionBusy,
    VersionExists,
    VersionInUse,
    VersionMeta,
    new_instance,
    split_key,
    version_key,
)
from icbdcache.store.owners import INUSE_PREFIX, ClientUse, Owner, read_uses, stale_records
from icbdcache.store.txns import digests_of, held_in, lmdb_errors, scan

T = TypeVar("T")


def usable_source(spec: str) -> bool:
    """A source that could still answer: an NBD or master URI, or a file that exists."""
    return "://" in spec or os.path.isfile(spec)


def _check_strong(meta: VersionMeta, strong_map: bytes | None) -> None:
    if strong_map is not None and len(strong_map) != meta.chunks * STRONG_SIZE:
        raise StoreError(f"strong map of {meta.key} has the wrong length")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class FitCheck:
    """Counts the bytes a version being copied adds beside what the store must keep
    (``protected`` digests, ``kept`` bytes of them held) and raises :class:`StoreFull` as soon
    as the total passes ``bound``: call it with each non-zero chunk's digest and length."""

    def __init__(self, key: str, bound: int, protected: set[bytes], kept: int) -> None:
        self.key = key
        self.bound = bound
        self.protected = protected
        self.kept = kept
        self.need = 0
        self._seen: set[bytes] = set()

    def __call__(self, d: bytes, n: int) -> None:
        if d in self.protected or d in self._seen:
            return
        self._seen.add(d)
        self.need += n
        if self.kept + self.need > self.bound:
            raise StoreFull(full_message(self.key, self.need, self.kept, self.bound, "more than"))


def full_message(key: str, need: int, kept: int, bound: int, how: str = "") -> str:
    """The text of :class:`StoreFull`."""
    how = f"{how} " if how else ""
    return (f"store full: {key} needs {how}{need} bytes of chunks beside {kept} bytes the "
            f"store must keep (pinned, pending and in-use versions), and the store is bounded "
            f"to {bound} bytes (--store-size); nothing was made")


class VersionLifecycle:
    """The version methods of :class:`~icbdcache.store.lmdbstore.Store` that check and write
    together (a mixin: the store provides its transactions)."""

    db: dict[str, Any]
    path: str

    # ---------------------------------------------------------------- provided by Store

    def _transact(self, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def _txn(self, **kw: Any) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _failed(self, e: Exception) -> StoreError:
        raise NotImplementedError

    def _versions(self, txn: Any) -> Iterator[VersionMeta]:
        raise NotImplementedError

    @property
    def bound(self) -> int | None:
        raise NotImplementedError

    # ---------------------------------------------------------------- what must stay

    def _uses(self, txn: Any) -> dict[str, list[ClientUse]]:
        return read_uses(scan(txn, self.db["records"], INUSE_PREFIX))

    def _pendings(self, txn: Any) -> tuple[list[Pending], dict[str, list[bytes]]]:
        """The pending records, and the digest lists each has noted (by version key)."""
        records: list[Pending] = []
        lists: dict[str, list[bytes]] = {}
        for key, value in scan(txn, self.db["pending"], ""):
            name, sep, _ = key.partition("/")
            if sep:
                lists.setdefault(name, []).append(value)
            else:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    records.append(Pending.from_json(value))
        return records, lists

    def _protected(self, txn: Any, exclude: str | None = None) -> set[bytes]:
        """Digests no eviction may take: those of pinned versions, of versions clients run
        that have no source left to fault an evicted chunk from again, and those noted by
        pending versions of live owners (but ``exclude``'s)."""
        maps_db = self.db["maps"]
        running = self._uses(txn)
        keys = {m.key for m in self._versions(txn)
                if m.pinned or (m.key in running and not any(map(usable_source, m.sources)))}
        keys.discard(exclude or "")
        out: set[bytes] = set()
        for k in keys:
            raw = txn.get(k.encode(), db=maps_db)
            if raw is not None:
                out.update(digests_of(bytes(raw), DIGEST_SIZE))
        records, lists = self._pendings(txn)
        for p in records:
            if p.alive and p.key != exclude:
                for blob in lists.get(p.key, []):
                    out.update(digests_of(blob, DIGEST_SIZE))
        out.discard(ZERO)
        out.discard(UNKNOWN)
        return out

    def _protect(self, txn: Any, key: str, tick: int, blob: bytes) -> None:
        """Note ``blob`` (digests) under the pending version ``key``, if it is pending."""
        db = self.db["pending"]
        if db is not None and txn.get(key.encode(), db=db) is not None:
            txn.put(f"{key}/{tick:016x}".encode(), blob, db=db)

    def _drop_pending(self, txn: Any, key: str) -> None:
        db = self.db["pending"]
        txn.delete(key.encode(), db=db)
        for k, _ in scan(txn, db, f"{key}/"):
            txn.delete(k.encode(), db=db)

    @lmdb_errors
    def in_use(self) -> dict[str, list[ClientUse]]:
        """The clients running each version (``IMI@VERSION``), from the records of every
        serving process (:mod:`icbdcache.store.owners`)."""
        with self._txn() as txn:
            return self._uses(txn)

    @lmdb_errors
    def fit_check(self, key: str) -> FitCheck | None:
        """A :class:`FitCheck` for version ``key`` against :attr:`bound` (None when the store
        has no bound), with what the store must keep now."""
        bound = self.bound
        if bound is None:
            return None
        with self._txn() as txn:
            protected = self._protected(txn, exclude=key)
            kept = held_in(txn, self.db["chunks"], protected)
        return FitCheck(key, bound, protected, kept)

    # ---------------------------------------------------------------- pending versions

    @lmdb_errors
    def reserve_version(self, imi: str, version: str | None = None, *, pinned: bool = False,
                        force: bool = False, in_use_ok: bool = False,
                        taken: tuple[str, ...] = ()) -> str:
        """Write the pending record of ``IMI@VERSION`` (``version`` None: one more than the
        highest numeric version of ``imi`` in the store, pending, or ``taken``) for this
        process, in one transaction; returns the version name. Raises VersionBusy if another
        live process is creating that version, VersionExists if it exists and not ``force``,
        VersionInUse if it exists, clients run it and not ``in_use_ok``."""
        owner = Owner.me()

        def fn(txn: Any) -> str:
            records, _ = self._pendings(txn)
            v = version
            if v is None:
                names = {m.version for m in self._versions(txn) if m.imi == imi}
                names.update(p.version for p in records if p.imi == imi and p.alive)
                names.update(taken)
                v = str(max((int(n) for n in names if n.isdigit()), default=0) + 1)
            key = version_key(imi, v)
            for p in records:
                if p.key == key:
                    if p.alive and p.owner != owner:
                        raise VersionBusy(f"{key} is being made by process {p.owner.pid} since "
                                          f"{_when(p.started)} (an import or publish)")
                    self._drop_pending(txn, key)  # a dead owner's, reclaimed
            self._check_replace(txn, key, force, in_use_ok)
            txn.put(key.encode(), Pending(imi, v, owner, time.time(), pinned).to_json(),
                    db=self.db["pending"])
            return v

        return self._transact(fn)

    def _check_replace(self, txn: Any, key: str, force: bool, in_use_ok: bool) -> bool:
        """Whether ``key`` exists; raises VersionExists or VersionInUse where it may not be
        replaced."""
        if txn.get(key.encode(), db=self.db["versions"]) is None:
            return False
        if not force:
            raise VersionExists(f"{key} exists (versions never change; --force replaces it)")
        uses = self._uses(txn).get(key)
        if uses and not in_use_ok:
            raise VersionInUse(key, uses, "replacing it would change the disk under them "
                               "(--force-in-use replaces it anyway)")
        return True

    @lmdb_errors
    def commit_version(self, meta: VersionMeta, chunk_map: bytes, *, latest: bool = True,
                       force: bool = False, in_use_ok: bool = False, copied: bool = False,
                       bound: int | None = None, strong_map: bytes | None = None,
                       hold: bool = False) -> VersionMeta:
        """Turn this process's pending record of ``meta.key`` into the version (``meta`` with
        a new ``instance``, its map and ``strong_map`` (STRONG_SIZE bytes per chunk index,
        when given), ``latest`` if asked) in one transaction, and return what
        was stored. ``copied``: every non-zero chunk of the map must be held; ``bound`` (bytes):
        the chunks of the version, beside those the store must keep, must fit in it. ``hold``:
        keep the pending record (the name stays this process's until :meth:`abandon_version`),
        so a step after the store (publish's registry record) ends before another process may
        take the version for an interrupted one and replace it. Raises
        StoreError if the reservation is gone, VersionExists, VersionInUse (see
        :meth:`reserve_version`), StoreFull; nothing is written then (the pending record
        stays: :meth:`abandon_version` drops it)."""
        if len(chunk_map) != meta.chunks * DIGEST_SIZE:
            raise StoreError(f"chunk map of {meta.key} has the wrong length")
        _check_strong(meta, strong_map)
        owner = Owner.me()
        key = meta.key

        def fn(txn: Any) -> VersionMeta:
            raw = txn.get(key.encode(), db=self.db["pending"])
            if raw is None or Pending.from_json(bytes(raw)).owner != owner:
                raise StoreError(f"{key}: this process's reservation of the name is gone "
                                 "(reclaimed by another process?); nothing was made")
            replacing = self._check_replace(txn, key, force, in_use_ok)
            digs = digests_of(bytes(chunk_map), DIGEST_SIZE) - {ZERO, UNKNOWN}
            chunks_db = self.db["chunks"]
            if copied:
                lost = sum(1 for d in digs if txn.get(d, db=chunks_db) is None)
                if lost:
                    raise StoreError(f"{key}: {lost} of its chunks are not in the store after "
                                     "the copy; nothing was made")
            if bound is not None:
                others = self._protected(txn, exclude=key)
                kept = held_in(txn, chunks_db, others)
                need = held_in(txn, chunks_db, digs - others)
                if kept + need > bound:
                    raise StoreFull(full_message(key, need, kept, bound))
            stored = VersionMeta(**{**meta.__dict__, "instance": new_instance(),
                                    "created": meta.created or time.time()})
            k = key.encode()
            self._put_maps(txn, stored, chunk_map, strong_map)
            if replacing:
                txn.delete(k, db=self.db["profiles"])  # the old image's boot profile
            if latest:
                txn.put(f"latest:{meta.imi}".encode(), meta.version.encode(), db=self.db["meta"])
            if hold:  # the version protects its chunks now; the name stays reserved
                for k2, _ in scan(txn, self.db["pending"], f"{key}/"):
                    txn.delete(k2.encode(), db=self.db["pending"])
            else:
                self._drop_pending(txn, key)
            return stored

        return self._transact(fn)

    @lmdb_errors
    def abandon_version(self, key: str) -> None:
        """Drop this process's pending record of ``key`` (an import or publish that failed):
        the chunks it copied become evictable like any other. No error if there is none."""
        owner = Owner.me()

        def fn(txn: Any) -> None:
            raw = txn.get(key.encode(), db=self.db["pending"])
            if raw is not None and Pending.from_json(bytes(raw)).owner == owner:
                self._drop_pending(txn, key)

        self._transact(fn)

    @lmdb_errors
    def pending_versions(self) -> list[Pending]:
        """Every pending record (``alive`` False: its owner is gone; reclaimable), with the
        number of chunks it has noted."""
        with self._txn() as txn:
            records, lists = self._pendings(txn)
        for p in records:
            p.chunks = sum(len(b) for b in lists.get(p.key, [])) // DIGEST_SIZE
        return records

    @lmdb_errors
    def reclaim(self) -> tuple[list[str], int]:
        """Drop the pending records of dead owners and the in-use records of processes gone
        for longer than the linger; returns (pending keys dropped, in-use records dropped)."""
        def fn(txn: Any) -> tuple[list[str], int]:
            records, _ = self._pendings(txn)
            dropped = [p.key for p in records if not p.alive]
            for key in dropped:
                self._drop_pending(txn, key)
            stale = stale_records(scan(txn, self.db["records"], INUSE_PREFIX))
            for key in stale:
                txn.delete(key.encode(), db=self.db["records"])
            return dropped, len(stale)

        return self._transact(fn)

    # ---------------------------------------------------------------- versions

    @lmdb_errors
    def create_version(self, meta: VersionMeta, chunk_map: bytes | None = None, *,
                       exists_ok: bool = False,
                       strong_map: bytes | None = None) -> VersionMeta:
        """Create ``meta.key`` (with a new ``instance``; a map of UNKNOWN entries when none is
        given; its ``strong_map`` when given) unless it exists, in one transaction; returns the
        stored version (the one found if it exists and ``exists_ok``). Raises VersionExists,
        VersionBusy (being made by a live process), StoreError on a bad map length."""
        if chunk_map is not None and len(chunk_map) != meta.chunks * DIGEST_SIZE:
            raise StoreError(f"chunk map of {meta.key} has the wrong length")
        _check_strong(meta, strong_map)
        key = meta.key.encode()

        def fn(txn: Any) -> VersionMeta:
            raw = txn.get(key, db=self.db["versions"])
            if raw is not None:
                if exists_ok:
                    return VersionMeta.from_json(bytes(raw))
                raise VersionExists(f"{meta.key} exists (versions never change)")
            pdb = self.db["pending"]
            pending = txn.get(key, db=pdb) if pdb is not None else None
            if pending is not None:
                p = Pending.from_json(bytes(pending))
                if p.alive and p.owner != Owner.me():
                    raise VersionBusy(f"{meta.key} is being made by process {p.owner.pid}")
            stored = VersionMeta(**{**meta.__dict__, "instance": new_instance()})
            self._put_maps(txn, stored, chunk_map if chunk_map is not None
                           else UNKNOWN * meta.chunks, strong_map)
            return stored

        return self._transact(fn)

    def _put_maps(self, txn: Any, stored: VersionMeta, chunk_map: bytes,
                  strong_map: bytes | None) -> None:
        """Write ``stored`` (its ``strong`` field set from ``strong_map``), its chunk map and
        its strong map (deleted when None) in ``txn``."""
        k = stored.key.encode()
        stored.strong = strong_hex(strong_map) if strong_map is not None else None
        if strong_map is None:
            stored.statement = stored.signature = None
        txn.put(k, stored.to_json(), db=self.db["versions"])
        txn.put(k, bytes(chunk_map), db=self.db["maps"])
        if strong_map is not None:
            txn.put(k, bytes(strong_map), db=self.db["strong"])
        else:
            txn.delete(k, db=self.db["strong"])

    @lmdb_errors
    def put_version(self, meta: VersionMeta, chunk_map: bytes | None = None) -> None:
        """Create or replace a version's metadata and (if given) its chunk map, without the
        checks of :meth:`commit_version` (tests, and stores built by hand); a version without
        a map gets one of UNKNOWN entries. A new map means a new ``instance``. Raises
        StoreError on a bad map length."""
        if chunk_map is not None and len(chunk_map) != meta.chunks * DIGEST_SIZE:
            raise StoreError(f"chunk map of {meta.key} has the wrong length")
        if chunk_map is not None or not meta.instance:
            meta.instance = new_instance()

        if chunk_map is not None:  # a new map: no strong map describes it
            meta.strong = meta.statement = meta.signature = None

        def fn(txn: Any) -> None:
            k = meta.key.encode()
            txn.put(k, meta.to_json(), db=self.db["versions"])
            if chunk_map is not None:
                txn.put(k, bytes(chunk_map), db=self.db["maps"])
                txn.delete(k, db=self.db["strong"])
            elif txn.get(k, db=self.db["maps"]) is None:
                txn.put(k, UNKNOWN * meta.chunks, db=self.db["maps"])

        self._transact(fn)

    @lmdb_errors
    def update_version(self, key: str, change: Callable[[VersionMeta], None]) -> VersionMeta:
        """Read version ``key``, ``change(meta)`` it in place, write it back, in one
        transaction (its map, name and ``instance`` stay); returns it. Raises StoreError if
        unknown."""
        k = key.encode()

        def fn(txn: Any) -> VersionMeta:
            raw = txn.get(k, db=self.db["versions"])
            if raw is None:
                raise StoreError(f"unknown version {key}")
            meta = VersionMeta.from_json(bytes(raw))
            fixed = (meta.imi, meta.version, meta.size, meta.chunk_size, meta.instance)
            change(meta)
            meta.imi, meta.version, meta.size, meta.chunk_size, meta.instance = fixed
            txn.put(k, meta.to_json(), db=self.db["versions"])
            return meta

        return self._transact(fn)

    def set_pinned(self, key: str, pinned: bool) -> VersionMeta:
        """Pin or unpin version ``key`` in one transaction. Raises StoreError if unknown."""
        def change(meta: VersionMeta) -> None:
            meta.pinned = pinned

        return self.update_version(key, change)

    @lmdb_errors
    def delete_version(self, key: str, *, in_use_ok: bool = True) -> None:
        """Forget version ``key``: its metadata, chunk map and profile (its chunks stay until
        evicted; a ``latest`` pointer at it is removed). No error if unknown. Raises
        VersionInUse when clients run it and not ``in_use_ok``."""
        imi, ver = split_key(key)

        def fn(txn: Any) -> None:
            k = key.encode()
            if not in_use_ok:
                uses = self._uses(txn).get(key)
                if uses:
                    raise VersionInUse(key, uses, "it is kept for them")
            for db in ("versions", "maps", "profiles", "strong"):
                txn.delete(k, db=self.db[db])
            lk = f"latest:{imi}".encode()
            if ver and txn.get(lk, db=self.db["meta"]) == ver.encode():
                txn.delete(lk, db=self.db["meta"])

        self._transact(fn)
