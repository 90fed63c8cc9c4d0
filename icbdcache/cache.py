"""The read path: chunk lookup, single-flight faulting, verification, boot-profile readahead.

Notes on the design
-------------------
* A version is a chunk map (index -> digest) over a content-addressed store. A read covers
  whole or partial chunks; each is, in order: all zeros (never stored, never fetched), in the
  in-memory hot set (anonymous memory: it cannot go cold between boot storms the way the page
  cache does on these machines), queued in the batched writer, in LMDB, or missing.
* When every chunk is present the read is answered at once, as memoryviews of the chunks' bytes
  (no task, no await). Otherwise the read becomes a coroutine that waits for the missing chunks.
* Missing chunks are **single-flight**: one fetch per digest however many clients and versions
  wait for it (versions share chunks). Faults of different chunks run in parallel.
* A fetch tries the version's sources in order, with bounded retries and a deadline
  (``fault_timeout``); the bytes are checked against the digest of the chunk map before they are
  stored or served. A version whose map is not known yet (faulted from a plain NBD upstream)
  learns each digest on its first fetch and checks every later one against it; before a fetch
  it looks in the stored map, where another process sharing the store (``icbd-cache warm``,
  another ``--workers`` process) may have learned the digest already.
* A read that cannot be served in time fails with EIO for that request only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from icbdcache.backend import Backend, Buffer, ReadResult
from icbdcache.log import Throttled, kv
from icbdcache.sources import Source, SourceError
from icbdcache.store import UNKNOWN, ZERO, BatchWriter, Store, VersionMeta, digest
from icbdcache.store.chunks import DIGEST_SIZE

log = logging.getLogger("icbdcache.cache")
warn = Throttled(log)
#: Most chunks one CACHE or BLOCK_STATUS request looks at (4096 x 64 KiB = 256 MiB), so a
#: pipelined burst of huge requests cannot stall the event loop.
MAX_SCAN = 4096


class HotSet:
    """Chunks kept in process memory, least recently used first out, within ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._d: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, key: bytes) -> bytes | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: bytes, data: bytes) -> None:
        if self.budget <= 0 or key in self._d:
            return
        self._d[key] = data
        self.used += len(data)
        while self.used > self.budget and self._d:
            _, old = self._d.popitem(last=False)
            self.used -= len(old)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: bytes) -> bool:
        return key in self._d


@dataclass
class CacheStats:
    """Counters of the read path since the server started (chunks and bytes)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    faults: int = 0
    fault_errors: int = 0
    corrupt: int = 0
    prefetched: int = 0
    bytes_from: dict[str, int] = field(default_factory=dict)


class ChunkCache:
    """What every version of a node shares: the store, its writer, the hot set and the
    in-flight faults. ``fault_timeout`` (seconds) bounds how long a read waits for a missing
    chunk; ``retries`` is how many rounds over the sources a fault makes."""

    def __init__(self, store: Store, *, hot_bytes: int = 1 << 30, fault_timeout: float = 10.0,
                 retries: int = 3, writer: BatchWriter | None = None) -> None:
        self.store = store
        self.writer = writer or BatchWriter(store)
        self.hot = HotSet(hot_bytes)
        self.fault_timeout = fault_timeout
        self.retries = retries
        self.inflight: dict[object, asyncio.Future[bytes]] = {}
        self.stats = CacheStats()
        #: Background faults (readahead, CACHE) in flight, and their bound.
        self.prefetching = 0
        self.max_prefetch = 64
        #: Chunks faulted ahead of a sequential miss (0: off); see VersionBackend._sequential.
        self.seq_ahead = 8
        #: Chunks read once from LMDB since they were last admitted (admission on 2nd read).
        self._seen: set[bytes] = set()
        self._seen_max = 1 << 18

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
        self.writer.touch(key)  # recency for the store's eviction, even for hot-set hits
        return data

    def read(self, key: bytes, lo: int, hi: int, reader: ChunkReader) -> Buffer | None:
        """Bytes ``lo:hi`` of a held chunk, or None. A chunk read from LMDB enters the hot set
        on its second read only (one-time reads, such as a scan, do not flush it); until then
        only the requested slice is copied out of the read transaction."""
        data = self.hot.get(key)
        if data is None:
            data = self.writer.pending(key)
            if data is None:
                buf = reader.buffer(key)
                if buf is None:
                    return None
                seen = self._seen
                if key not in seen:
                    if len(seen) >= self._seen_max:
                        seen.clear()
                    seen.add(key)
                    self.writer.touch(key)
                    return bytes(buf[lo:hi])
                seen.discard(key)
                data = bytes(buf)
            self.hot.put(key, data)
        self.writer.touch(key)  # recency for the store's eviction, even for hot-set hits
        return memoryview(data)[lo:hi]

    def close(self) -> None:
        self.writer.close()


class ChunkReader:
    """One short LMDB read transaction, opened on the first chunk that is not in memory and
    ended by :meth:`close` (py-lmdb: its buffers die with it, so chunks are copied out)."""

    __slots__ = ("_txn", "store")

    def __init__(self, store: Store) -> None:
        self.store = store
        self._txn: Any = None

    def buffer(self, key: bytes) -> memoryview | None:
        """The chunk's bytes inside the transaction: valid until :meth:`close`."""
        if self._txn is None:
            self._txn = self.store.env.begin(db=self.store.db["chunks"], buffers=True)
        buf = self._txn.get(key)
        return memoryview(buf) if buf is not None else None

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None


class VersionBackend(Backend):
    """One iMI version served from ``cache``, faulting from ``sources`` in order.

    ``chunk_map`` is the version's map (DIGEST_SIZE bytes per chunk, ZERO/UNKNOWN entries);
    it is updated in place as UNKNOWN entries are learned.
    """

    def __init__(self, cache: ChunkCache, meta: VersionMeta, chunk_map: bytearray,
                 sources: Sequence[Source]) -> None:
        self.shared = cache
        self.meta = meta
        self.key = meta.key
        self.size = meta.size
        self.read_only = True
        self.cs = meta.chunk_size
        self.map = chunk_map
        self.sources = list(sources)
        self._zeros = memoryview(bytes(self.cs))
        self.profile = BootProfile(self)

    def digest_at(self, index: int) -> bytes:
        return bytes(self.map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])

    # ------------------------------------------------------------------ reads

    def pread(self, offset: int, length: int) -> ReadResult:
        cs = self.cs
        first = offset // cs
        last = (offset + length - 1) // cs
        out: list[Buffer] = []
        missing: list[tuple[int, int, int, int]] = []  # (slot, index, lo, hi)
        read = self.shared.read
        stats = self.shared.stats
        reader = ChunkReader(self.shared.store)
        for i in range(first, last + 1):
            base = i * cs
            lo = offset - base if offset > base else 0
            end = offset + length - base
            hi = end if end < cs else cs
            d = self.map[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            if d == ZERO:
                out.append(self._zeros[: hi - lo])
                continue
            data = read(bytes(d), lo, hi, reader) if d != UNKNOWN else None
            if data is None:
                missing.append((len(out), i, lo, hi))
                out.append(b"")
            else:
                stats.hits += 1
                out.append(data)
        reader.close()
        profile = self.profile
        if profile.recording_until:
            profile.record(first, last)
        if missing or (profile.marks and not profile.marks.isdisjoint(range(first, last + 1))):
            profile.advance(last)
        if not missing:
            return out
        stats.misses += len(missing)
        if self.shared.seq_ahead:
            self._sequential(first, last)
        return self._complete(out, missing)

    def _present(self, index: int) -> bool:
        """Whether chunk ``index`` is zero, held, or being faulted."""
        d = self.digest_at(index)
        if d == ZERO:
            return True
        if d == UNKNOWN:
            return (self.key, index) in self.shared.inflight
        return d in self.shared.inflight or self.shared.holds(d)

    def _sequential(self, first: int, last: int) -> None:
        """Sequential readahead on a miss (what a version's first boot, with no boot profile
        yet, relies on): when the chunk before ``first`` is present, the reader is going forward,
        so the next ``ChunkCache.seq_ahead`` chunks are faulted in the background and arrive
        in one WAN round trip with this one instead of one round trip each. Measured on the
        recorded boot: 506 of its 748 first-touched chunks follow the chunk before them."""
        if first == 0 or not self._present(first - 1):
            return
        stop = min(last + 1 + self.shared.seq_ahead, (self.size + self.cs - 1) // self.cs)
        for i in range(last + 1, stop):
            if not self.cache_hint(i):
                break

    async def _complete(self, out: list[Buffer],
                        missing: list[tuple[int, int, int, int]]) -> list[Buffer]:
        datas = await asyncio.gather(*(self.fault(i) for _, i, _, _ in missing))
        for (slot, _, lo, hi), data in zip(missing, datas, strict=True):
            out[slot] = memoryview(data)[lo:hi]
        return out

    def cache_hint(self, index: int) -> bool:
        """Fault chunk ``index`` in the background if it is missing (readahead). Returns False
        when the background budget (``ChunkCache.max_prefetch`` faults in flight) is spent."""
        shared = self.shared
        if shared.prefetching >= shared.max_prefetch:
            return False
        d = self.digest_at(index)
        if d == ZERO or (d != UNKNOWN and shared.holds(d)):
            return True
        if (d if d != UNKNOWN else (self.key, index)) in shared.inflight:
            return True
        shared.stats.prefetched += 1
        shared.prefetching += 1
        task = asyncio.ensure_future(self.fault(index))
        task.add_done_callback(self._prefetched)
        return True

    def _prefetched(self, task: asyncio.Future[bytes]) -> None:
        self.shared.prefetching -= 1
        _ignore_result(task)

    def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: prefetch the range's missing chunks, within the background budget
        (a hint may be ignored, NBD proto.md 'NBD_CMD_CACHE'; at most ``MAX_SCAN`` chunks are
        looked at per request)."""
        first = offset // self.cs
        last = min((offset + length - 1) // self.cs, first + MAX_SCAN - 1)
        for i in range(first, last + 1):
            if not self.cache_hint(i):
                break

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents from the chunk map, for at most ``MAX_SCAN`` chunks (the
        server may describe less than asked, NBD proto.md 'NBD_CMD_BLOCK_STATUS')."""
        from icbdcache.backend import HOLE

        cs = self.cs
        out: list[tuple[int, int]] = []
        pos = offset
        end = min(offset + length, (offset // cs + MAX_SCAN) * cs)
        while pos < end and len(out) < 1024:
            i = pos // cs
            flags = HOLE if self.digest_at(i) == ZERO else 0
            stop = min(end, (i + 1) * cs)
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + stop - pos, flags)
            else:
                out.append((stop - pos, flags))
            pos = stop
        return out

    # ------------------------------------------------------------------ faults

    async def fault(self, index: int) -> bytes:
        """The bytes of chunk ``index``, fetched once however many readers wait.
        Raises OSError(EIO) when no source delivers good bytes within the deadline."""
        d = self.digest_at(index)
        key: object = d if d != UNKNOWN else (self.key, index)
        cache = self.shared
        fut = cache.inflight.get(key)
        if fut is not None:
            cache.stats.coalesced += 1
            return await asyncio.shield(fut)
        if d == UNKNOWN:
            d = self._stored_entry(index)
            if d == ZERO:
                return bytes(min(self.cs, self.size - index * self.cs))
            if d != UNKNOWN:
                return await self.fault(index)  # known now: by digest, maybe held
        else:
            held = cache.lookup(d)  # filled while this reader was queued
            if held is not None:
                return held
        fut = asyncio.get_running_loop().create_future()
        cache.inflight[key] = fut
        try:
            data = await self._fetch(index, d)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters get it; nobody else must log it
            raise
        else:
            fut.set_result(data)
            return data
        finally:
            del cache.inflight[key]

    def _stored_entry(self, index: int) -> bytes:
        """Map entry ``index`` as stored now: another process sharing the store (``icbd-cache
        warm``, another ``--workers`` process) may have learned it since this map was loaded.
        A known entry is copied into this map."""
        d = self.shared.store.map_entry(self.key, index)
        if d != UNKNOWN:
            self.map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = d
        return d

    async def _fetch(self, index: int, want: bytes) -> bytes:
        cache = self.shared
        offset = index * self.cs
        n = min(self.cs, self.size - offset)
        deadline = time.monotonic() + cache.fault_timeout
        last_error = "no source"
        cache.stats.faults += 1
        for attempt in range(cache.retries):
            for src in self.sources:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    data = await asyncio.wait_for(src.read(offset, n), left)
                except (TimeoutError, SourceError, OSError) as e:
                    text = str(e) or type(e).__name__
                    last_error = text if text.startswith(src.name) else f"{src.name}: {text}"
                    continue
                if len(data) != n:
                    last_error = f"{src.name}: short read of {len(data)} bytes"
                    continue
                got = digest(data)
                if want != UNKNOWN and got != want:
                    cache.stats.corrupt += 1
                    cache.writer.count("corrupt_chunks")
                    last_error = f"{src.name}: chunk {index} failed its digest check"
                    warn.warning(kv(version=self.key, chunk=index, source=src.name,
                                    refused="digest mismatch"))
                    continue
                self._keep(index, want, got, data, src.name)
                return data
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
        cache.stats.fault_errors += 1
        warn.warning(kv(version=self.key, chunk=index, error=last_error, reply="EIO"))
        raise OSError(errno.EIO, f"chunk {index} of {self.key} unavailable ({last_error})")

    def _keep(self, index: int, want: bytes, got: bytes, data: bytes, source: str) -> None:
        cache = self.shared
        stats = cache.stats
        stats.bytes_from[source] = stats.bytes_from.get(source, 0) + len(data)
        cache.writer.count(f"bytes_from:{source}", len(data))
        updates: list[tuple[str, int, bytes]] = []
        if want == UNKNOWN:
            self.map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = got
            updates.append((self.key, index, got))
        if got == ZERO:
            if updates:
                cache.writer.put_updates(updates)
            return
        cache.writer.put(got, data, updates)
        cache.hot.put(got, data)


class BootProfile:
    """Which chunks a version's clients read during their first ``window`` seconds after
    connecting, in first-read order (at most ``limit`` chunks); persisted in the store, and
    replayed as readahead.

    Readahead works like the kernel's: a read that misses, or that hits a chunk marked in the
    previous window, faults the next ``ahead`` chunks of the profile in the background and marks
    the middle of that window, so a client following the profile keeps ahead of its reads with
    no lookups on reads that are plain hits.
    """

    def __init__(self, backend: VersionBackend, window: float = 120.0, ahead: int = 16,
                 limit: int = 1 << 16) -> None:
        self.backend = backend
        self.window = window
        self.ahead = ahead
        self.limit = limit
        self.order: list[int] = backend.shared.store.profile(backend.key)
        self.position = {idx: n for n, idx in enumerate(self.order)}
        self.marks: set[int] = set()
        self.recording_until = 0.0
        self.dirty = False

    def client_started(self, now: float) -> None:
        """A client connected: record its first minutes."""
        self.recording_until = max(self.recording_until, now + self.window)

    def record(self, first: int, last: int) -> None:
        """Chunks ``first..last`` were read: add the new ones to the profile."""
        if time.monotonic() > self.recording_until:
            self.recording_until = 0.0
            return
        pos = self.position
        for i in range(first, last + 1):
            if i not in pos and len(self.order) < self.limit:
                pos[i] = len(self.order)
                self.order.append(i)
                self.dirty = True

    def advance(self, last: int) -> None:
        """Read ahead along the profile from chunk ``last``."""
        self.marks.discard(last)
        pos = self.position.get(last)
        if pos is None:
            return
        window = self.order[pos + 1 : pos + 1 + self.ahead]
        for idx in window:
            self.backend.cache_hint(idx)
        if len(window) > 1:
            self.marks.add(window[len(window) // 2])

    def save(self) -> None:
        if self.dirty:
            self.dirty = False
            self.backend.shared.store.put_profile(self.backend.key, list(self.order))


def _ignore_result(task: asyncio.Future[bytes]) -> None:
    if not task.cancelled():
        task.exception()
