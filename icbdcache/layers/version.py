"""The bottom of a store export: one iMI version as a chunk map over the store. Hits only.

Notes on the design
-------------------
* A version is a chunk map (index -> digest, :data:`~icbdcache.store.chunks.DIGEST_SIZE`
  bytes per entry) over a content-addressed store. A read covers whole or partial chunks;
  each is, in order: all zeros (:data:`ZERO`: never stored, never fetched), held by the store
  (its tiers: hot set, writer queue, LMDB; :class:`~icbdcache.store.reader.StoreReader`), or
  missing: not held, or its digest not known yet (:data:`UNKNOWN`, a version faulted from a
  plain NBD upstream learns its map as it is read).
* When every chunk is held the read is answered at once with memoryviews of the chunks' bytes
  (no task, no await). A read inside one chunk held in the hot set, the warm store's common
  case, is answered by :meth:`VersionLayer.pread` itself with no Python call below it (the hot
  set's ``peek``/``used_now``, the reader's ``recent`` set, two counters); a read over several
  chunks all in the hot set is answered with the same calls mapped over its chunks (no Python
  code per chunk); anything else takes the general path through
  :meth:`~icbdcache.store.reader.StoreReader.read`.
* Otherwise this layer raises :class:`ChunksMissing` carrying what it found, and the fault
  layer above (:mod:`icbdcache.layers.fault`) fetches the rest. This layer never talks to a
  source.
* The map is shared by every layer of the version and updated in place as entries are learned
  (:meth:`VersionLayer.learn`); a version's map never changes otherwise (versions are
  immutable).

Entry states of the map:

=========  =====================================================================
entry      meaning
=========  =====================================================================
ZERO       the chunk is all zeros: answered from a zero buffer
UNKNOWN    the digest is not known yet: missing until the fault layer learns it
a digest   held (a hit) or not (missing, faulted by digest)
=========  =====================================================================
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import cast

from icbdcache.layers.base import HOLE, Buffer, Layer, ReadResult
from icbdcache.layers.stats import ReadStats
from icbdcache.store import UNKNOWN, ZERO, VersionMeta
from icbdcache.store.chunks import DIGEST_SIZE, strong_at
from icbdcache.store.reader import StoreReader

#: Most chunks one BLOCK_STATUS or CACHE request looks at (4096 x 64 KiB = 256 MiB), so a
#: pipelined burst of huge requests cannot stall the event loop.
MAX_SCAN = 4096


class ChunksMissing(Exception):
    """A read found chunks the store does not hold. ``out`` holds the read's buffers with an
    empty placeholder per missing piece; ``missing`` lists (slot in ``out``, chunk index,
    start, end) with start/end the byte range wanted inside the chunk."""

    def __init__(self, out: list[Buffer], missing: list[tuple[int, int, int, int]]) -> None:
        super().__init__(f"{len(missing)} chunks missing")
        self.out = out
        self.missing = missing


class VersionLayer(Layer):
    """Version ``meta`` with chunk map ``chunk_map`` over ``reader``; ``stats`` counts hits.
    ``strong``: its strong map (STRONG_SIZE bytes per chunk index), which the fault layer
    checks every fetched chunk against; None when it has none. Hits never look at it."""

    def __init__(self, reader: StoreReader, meta: VersionMeta, chunk_map: bytearray,
                 stats: ReadStats, strong: bytes | None = None) -> None:
        super().__init__(None)
        self.reader = reader
        self.meta = meta
        self.key = meta.key
        self.size = meta.size
        self.cs = meta.chunk_size
        self.chunks = meta.chunks
        self.map = chunk_map
        self.strong = strong
        self.stats = stats
        self._zeros = memoryview(bytes(self.cs))
        #: Map entries as bytes objects, made on first use (a dict key made once keeps its
        #: hash); None where not made yet. :meth:`learn` drops the entry it changes.
        self._keys: list[bytes | None] = [None] * self.chunks
        hot = reader.hot
        self._peek: Callable[[bytes], bytes | None] = hot.peek
        self._used_now: Callable[[bytes], None] = hot.used_now

    def digest_at(self, index: int) -> bytes:
        """Map entry ``index``: a digest, ZERO or UNKNOWN."""
        return bytes(self.map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE])

    def strong_at(self, index: int) -> bytes:
        """Strong map entry ``index`` (STRONG_UNKNOWN without a strong map)."""
        return strong_at(self.strong, index)

    def learn(self, index: int, entry: bytes) -> None:
        """Set map entry ``index`` (a digest learned from a source, or ZERO)."""
        self.map[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE] = entry
        self._keys[index] = None

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk ``index`` (the last may be short)."""
        return min(self.cs, self.size - index * self.cs)

    def held(self, index: int) -> bool:
        """Whether chunk ``index`` reads without a fault (all zeros, or held)."""
        d = self.digest_at(index)
        return d == ZERO or (d != UNKNOWN and self.reader.holds(d))

    # ---------------------------------------------------------------- requests

    def pread(self, offset: int, length: int) -> ReadResult:
        """The buffers of the range; raises :class:`ChunksMissing` if a chunk is not held."""
        cs = self.cs
        first = offset // cs
        lo = offset - first * cs
        if lo + length <= cs:  # inside one chunk: a hot hit is answered here
            kept = self._keys[first]
            d = kept if kept is not None else bytes(
                self.map[first * DIGEST_SIZE : (first + 1) * DIGEST_SIZE])
            data = self._peek(d)
            if data is not None:
                if kept is None:  # kept for the chunks found hot only (bounded memory)
                    self._keys[first] = d
                self._used_now(d)
                self.reader.recent.add(d)
                stats = self.stats
                stats.hits += 1
                self.reader.hits.hits_hot += 1
                return [memoryview(data)[lo : lo + length]]
            return self._pread(offset, length)
        return self._pread_hot(offset, length)

    def _pread_hot(self, offset: int, length: int) -> ReadResult:
        """A read over several chunks: answered here when the hot set holds every one (the
        warm store's large reads), with a few C-level calls for all of them instead of
        Python code per chunk (in-process, a 1 MiB read of 16 hot chunks went from 35 to
        about 10 µs); anything else goes to :meth:`_pread`. The keys made are kept only
        when every chunk was hot: a scan of a huge version does not grow the memory."""
        cs = self.cs
        first = offset // cs
        stop = (offset + length - 1) // cs + 1
        made = self._keys[first:stop]
        new = None in made
        keys = self._keys_of(first, stop) if new else cast("list[bytes]", made)
        found = list(map(self._peek, keys))
        if None in found:
            return self._pread(offset, length)
        if new:
            self._keys[first:stop] = keys
        datas = cast("list[Buffer]", found)
        deque(map(self._used_now, keys), 0)
        self.reader.recent.update(keys)
        n = stop - first
        self.stats.hits += n
        self.reader.hits.hits_hot += n
        lo = offset - first * cs
        if lo:
            datas[0] = memoryview(datas[0])[lo:]
        end = offset + length - (stop - 1) * cs  # end inside the last chunk (n >= 2)
        if end < len(datas[-1]):
            datas[-1] = memoryview(datas[-1])[:end]
        return datas

    def _keys_of(self, first: int, stop: int) -> list[bytes]:
        """Map entries ``first..stop-1`` as bytes (those made already, the others new and
        not kept)."""
        keys = self._keys
        m = self.map
        out: list[bytes] = []
        for i in range(first, stop):
            k = keys[i]
            out.append(k if k is not None else bytes(m[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]))
        return out

    def _pread(self, offset: int, length: int) -> ReadResult:
        cs = self.cs
        first = offset // cs
        last = (offset + length - 1) // cs
        out: list[Buffer] = []
        missing: list[tuple[int, int, int, int]] = []
        read = self.reader.read
        chunk_map = self.map
        txn = self.reader.txn()
        hits = 0
        try:
            for i in range(first, last + 1):
                base = i * cs
                lo = offset - base if offset > base else 0
                end = offset + length - base
                hi = end if end < cs else cs
                d = chunk_map[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                if d == ZERO:
                    out.append(self._zeros[: hi - lo])
                    continue
                data = read(bytes(d), lo, hi, txn) if d != UNKNOWN else None
                if data is None:
                    missing.append((len(out), i, lo, hi))
                    out.append(b"")
                else:
                    hits += 1
                    out.append(data)
        finally:
            txn.close()
        self.stats.hits += hits
        if missing:
            raise ChunksMissing(out, missing)
        return out

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        """base:allocation extents from the chunk map, for at most ``MAX_SCAN`` chunks (the
        server may describe less than asked, NBD proto.md 'NBD_CMD_BLOCK_STATUS')."""
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

    # ---------------------------------------------------------------- questions

    def can_multi_conn(self) -> bool:
        return True  # immutable: every connection sees the same bytes

    def can_extents(self) -> bool:
        return True
