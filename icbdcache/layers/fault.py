"""The fault layer: what the version below does not hold is fetched once, checked and stored.

Notes on the design
-------------------
* The only layer that talks to sources. It sits on a :class:`~icbdcache.layers.version.
  VersionLayer`; a read that finds every chunk held passes straight through (no task, no
  await); a read that misses (:class:`~icbdcache.layers.version.ChunksMissing`) becomes a
  coroutine that waits for the missing chunks and then answers with all the read's buffers.
* **Single-flight**: one fetch per digest however many clients and versions wait for it
  (versions share chunks); the in-flight table (:class:`Faults`) is shared by every version of
  a process. A chunk whose digest is not known yet (UNKNOWN: a plain NBD upstream) is keyed by
  (version, index) instead. Faults of different chunks run in parallel.
* A fetch asks the version's sources in order, healthy ones first
  (:attr:`~icbdcache.sources.Source.healthy`), each through :meth:`~icbdcache.sources.
  Source.fetch`: the sources own the retry policy; this layer only moves on to the next
  source, within one deadline (``fault_timeout``) for the whole fault.
* The bytes are checked against the chunk map's digest, and the version's strong map
  (BLAKE3-256, when it has one: every version made from a manifest or an import) before they
  are stored or served (the check runs inside the source's attempt, so a corrupt answer is
  retried like a failed one). Hits are never re-hashed: what the store holds was checked as
  it came in.
  A version whose map is not known learns each digest on its first fetch; before a fetch it
  looks in the stored map, where another process sharing the store (``icbd-cache warm``,
  another ``--workers`` process) may have learned it already.
* ``cache`` (NBD_CMD_CACHE, and the readahead layer above) faults missing chunks in the
  background, at most ``Faults.max_prefetch`` at a time; a hint beyond that is dropped.
* **Back-pressure from the store**: the writer's queue is bounded
  (:meth:`~icbdcache.store.writer.BatchWriter.over`). While it is full no background fault
  starts, a client's fault waits up to ``ROOM_WAIT`` seconds for room before it fetches, and a
  chunk fetched while it is still full is served and kept in the hot set only (counted as
  ``not_kept``; a later read faults it again). Memory stays bounded when sources deliver
  faster than LMDB commits.
* A read that cannot be served in time fails with EIO for that request only.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Sequence

from icbdcache.layers.base import Buffer, Layer, ReadResult
from icbdcache.layers.lease import fetch_once
from icbdcache.layers.stats import ReadStats
from icbdcache.layers.version import MAX_SCAN, ChunksMissing, VersionLayer
from icbdcache.log import Throttled, kv
from icbdcache.sources import Source, SourceError
from icbdcache.store import UNKNOWN, ZERO, digest
from icbdcache.store.chunks import STRONG_UNKNOWN, strong_digest

log = logging.getLogger("icbdcache.fault")
warn = Throttled(log)

#: Seconds a client's fault waits for room in the store writer's queue before it fetches
#: anyway (and keeps the chunk in memory only).
ROOM_WAIT = 1.0
#: Seconds between looks at the writer's queue while waiting for room.
ROOM_POLL = 0.005


class Faults:
    """What every version's fault layer in a process shares: the faults in flight (by digest,
    or by (version key, index) for unknown digests), the background budget, the deadline of a
    fault (``fault_timeout``, seconds) and the counters. ``patient``: a process whose faults
    exist to fill the store (``icbd-cache warm``): a fault waits for room in the writer's
    queue as long as its deadline allows and then stores its chunk whatever the queue holds
    (its own parallelism bounds that), instead of serving it unkept."""

    def __init__(self, stats: ReadStats, *, fault_timeout: float = 10.0,
                 max_prefetch: int = 64, patient: bool = False) -> None:
        self.stats = stats
        self.fault_timeout = fault_timeout
        self.patient = patient
        self.inflight: dict[object, asyncio.Future[bytes]] = {}
        #: the fault layer fetching each key of :attr:`inflight` (a reader of another
        #: version that joined it fetches again from its own sources if it fails)
        self.owners: dict[object, FaultLayer] = {}
        #: Background faults (readahead, CACHE) in flight, and their bound.
        self.prefetching = 0
        self.max_prefetch = max_prefetch


class FaultLayer(Layer):
    """Faults the chunks ``next`` (a version) lacks from ``sources``, sharing ``faults``."""

    next: VersionLayer

    def __init__(self, next: VersionLayer, sources: Sequence[Source],
                 faults: Faults) -> None:
        super().__init__(next)
        self.version = next
        self.sources = list(sources)
        self.faults = faults
        self.reader = next.reader
        #: faults this layer fetches now (readers of other versions may wait on them too)
        self.fetching = 0
        self._idle: asyncio.Future[None] | None = None
        #: this layer's fetches of keys whose slot in ``Faults.inflight`` another version's
        #: fetch holds (begun after another version's fetch of them failed)
        self._refetching: dict[object, asyncio.Future[bytes]] = {}

    def _unknown_key(self, index: int) -> tuple[str, str, int]:
        """The single-flight key of chunk ``index`` while its digest is not learned: the
        version's key and instance (a version replaced under its name is other bytes) and
        the index."""
        return (self.version.key, self.version.meta.instance, index)

    async def drain(self) -> None:
        """Return once none of this layer's own fetches is in flight (its sources may close
        then: a reader of another version may have joined one of them, ``Faults.inflight``
        being keyed by digest)."""
        while self.fetching:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)

    # ---------------------------------------------------------------- reads

    def pread(self, offset: int, length: int) -> ReadResult:
        try:
            return self.version.pread(offset, length)
        except ChunksMissing as m:
            self.faults.stats.misses += len(m.missing)
            return self._complete(m.out, m.missing)

    async def _complete(self, out: list[Buffer],
                        missing: list[tuple[int, int, int, int]]) -> list[Buffer]:
        datas = await asyncio.gather(*(self.fault(i) for _, i, _, _ in missing))
        for (slot, _, lo, hi), data in zip(missing, datas, strict=True):
            out[slot] = memoryview(data)[lo:hi]
        return out

    def present(self, index: int) -> bool:
        """Whether chunk ``index`` is all zeros, held, or being faulted."""
        v = self.version
        d = v.digest_at(index)
        if d == ZERO:
            return True
        if d == UNKNOWN:
            return self._unknown_key(index) in self.faults.inflight
        return d in self.faults.inflight or self.reader.holds(d)

    # ---------------------------------------------------------------- background

    def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: fault the range's missing chunks in the background, within the
        background budget (a hint may be ignored, NBD proto.md 'NBD_CMD_CACHE'; at most
        ``MAX_SCAN`` chunks are looked at per request)."""
        cs = self.version.cs
        first = offset // cs
        last = min((offset + length - 1) // cs, first + MAX_SCAN - 1)
        for i in range(first, last + 1):
            if not self.prefetch(i):
                break

    def prefetch(self, index: int) -> bool:
        """Fault chunk ``index`` in the background if it is missing. Returns False when the
        background budget is spent (the caller stops asking)."""
        f = self.faults
        if f.prefetching >= f.max_prefetch or self.reader.writer.over():
            return False
        if self.present(index):
            return True
        f.stats.prefetched += 1
        f.prefetching += 1
        task = asyncio.ensure_future(self.fault(index))
        task.add_done_callback(self._prefetched)
        return True

    def _prefetched(self, task: asyncio.Future[bytes]) -> None:
        self.faults.prefetching -= 1
        if not task.cancelled():
            task.exception()  # retrieved: a failed prefetch was logged by the fault

    def can_cache(self) -> bool:
        return True

    # ---------------------------------------------------------------- faults

    async def fault(self, index: int) -> bytes:
        """The bytes of chunk ``index``, fetched once however many readers wait.
        Raises OSError(EIO) when no source delivers good bytes within the deadline."""
        v = self.version
        d = v.digest_at(index)
        if d == ZERO:  # learned as zeros since the read was found missing (never stored)
            return bytes(v.chunk_length(index))
        key: object = d if d != UNKNOWN else self._unknown_key(index)
        f = self.faults
        if (own := self._refetching.get(key)) is not None:
            f.stats.coalesced += 1  # our fetch beside another version's: joined first
            return await asyncio.shield(own)
        foreign_failed = False
        while (fut := f.inflight.get(key)) is not None:
            ours = f.owners.get(key) is self
            if foreign_failed and not ours:
                break  # another version's fetch again: ours goes on beside it
            f.stats.coalesced += 1
            if ours:
                return await asyncio.shield(fut)
            try:  # another version's fetch of the same digest, from its own sources
                return await asyncio.shield(fut)
            except OSError:
                # it failed; ours may have it: fetched from them, once for all its
                # readers (the first to get here fetches, the others join it)
                foreign_failed = True
        if (own := self._refetching.get(key)) is not None:
            f.stats.coalesced += 1  # a fetch of ours beside a third version's
            return await asyncio.shield(own)
        if d != UNKNOWN:
            held = self.reader.lookup(d)  # filled while this reader was queued
            if held is not None:
                return held
        # (a chunk not learned yet: its stored map entry is looked at under the lease)
        fut = asyncio.get_running_loop().create_future()
        mine = key not in f.inflight  # (else another version's fetch began meanwhile)
        if mine:
            f.inflight[key] = fut
            f.owners[key] = self
        else:  # our readers that saw a fetch fail join this one, not the other version's
            self._refetching[key] = fut
        self.fetching += 1
        try:
            data = await fetch_once(self, key, index, d)  # once across processes too
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters get it; nobody else must log it
            raise
        else:
            fut.set_result(data)
            return data
        finally:
            if mine:
                del f.inflight[key]
                del f.owners[key]
            else:
                del self._refetching[key]
            self.fetching -= 1
            if not self.fetching and self._idle is not None:
                if not self._idle.done():
                    self._idle.set_result(None)
                self._idle = None

    def _stored_entry(self, index: int) -> bytes:
        """Map entry ``index`` as stored now (another process may have learned it since this
        map was loaded); a known entry is copied into this map."""
        # learned by another process, in this instance of the version (never a replacement's)
        d = self.reader.store.map_entry(self.version.key, index,
                                        self.version.meta.instance or None)
        if d != UNKNOWN:
            self.version.learn(index, d)
        return d

    def _ordered_sources(self) -> list[Source]:
        """The sources, healthy ones first (their own order otherwise)."""
        if len(self.sources) < 2:
            return self.sources
        return sorted(self.sources, key=lambda s: not s.healthy)

    async def _fetch(self, index: int, want: bytes) -> bytes:
        """Fetch chunk ``index`` from the sources (this process's fault: counted in
        ``faults`` and timed in ``fault_latency``; a wait on another process's lease is
        neither)."""
        t0 = time.monotonic()
        try:
            return await self._fetch_from_sources(index, want)
        finally:
            self.faults.stats.fault_latency.observe(time.monotonic() - t0)

    async def _fetch_from_sources(self, index: int, want: bytes) -> bytes:
        v = self.version
        stats = self.faults.stats
        offset = index * v.cs
        n = v.chunk_length(index)
        deadline = time.monotonic() + self.faults.fault_timeout
        last_error = "no source"
        stats.faults += 1

        strong = v.strong_at(index)
        writer = self.reader.writer
        if writer.over():  # the store is behind: let it catch up before adding to it
            until = deadline if self.faults.patient else min(deadline,
                                                             time.monotonic() + ROOM_WAIT)
            while writer.over() and not writer.stopped and time.monotonic() < until:
                await asyncio.sleep(ROOM_POLL)

        def check(data: bytes) -> bool:
            if want != UNKNOWN and digest(data) != want:
                why = "digest mismatch"
            elif strong != STRONG_UNKNOWN and strong_digest(data) != strong:
                why = "strong digest mismatch"
            else:
                return True
            stats.corrupt += 1
            self.reader.count("corrupt_chunks")
            warn.warning(kv(version=v.key, chunk=index, refused=why))
            return False

        for src in self._ordered_sources():
            if time.monotonic() >= deadline:
                break
            try:
                data = await src.fetch(offset, n, check=check, deadline=deadline)
            except (SourceError, OSError) as e:
                text = str(e) or type(e).__name__
                last_error = text if text.startswith(src.name) else f"{src.name}: {text}"
                continue
            self._keep(index, want, data, src.name)
            return data
        stats.fault_errors += 1
        warn.warning(kv(version=v.key, chunk=index, error=last_error, reply="EIO"))
        raise OSError(errno.EIO, f"chunk {index} of {v.key} unavailable ({last_error})")

    def _keep(self, index: int, want: bytes, data: bytes, source: str) -> None:
        stats = self.faults.stats
        stats.bytes_from[source] = stats.bytes_from.get(source, 0) + len(data)
        self.reader.count(f"bytes_from:{source}", len(data))
        got = want if want != UNKNOWN else digest(data)
        updates: list[tuple[str, int, bytes]] = []
        if want == UNKNOWN:
            self.version.learn(index, got)
            updates.append((self.version.key, index, got))
        if got == ZERO:
            if updates:
                self.reader.learn(updates)
            return
        if not self.reader.keep(got, data, updates, force=self.faults.patient):
            stats.not_kept += 1
            if updates:  # the digest learned is kept even when the chunk is not
                self.reader.learn(updates)
