"""The read path's layers in-process, each over a fake ``next`` or a fake source.

Covers what only subprocess tests reached before: single-flight (N waiters, one fetch), the
store's memory tier (admission on a second read, LRU eviction), readahead along a boot profile
while serving, CACHE passing through an overlay down to the fault layer, pass-through of
whatever a layer does not define, and transmission flags built from the stack's answers.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from icbdcache.exports import Catalog, Export, Resolved
from icbdcache.layers.base import Buffer, Client, Layer, ReadResult, transmission_flags
from icbdcache.layers.cowdir import CowDir
from icbdcache.layers.fault import FaultLayer, Faults
from icbdcache.layers.file import FileLayer
from icbdcache.layers.overlay import CowOverlay, OverlayLayer
from icbdcache.layers.profile import BootProfile
from icbdcache.layers.readahead import ReadaheadLayer
from icbdcache.layers.stats import ReadStats
from icbdcache.layers.version import ChunksMissing, VersionLayer
from icbdcache.node import Node
from icbdcache.sources import RetryPolicy, Source, SourceUnavailable
from icbdcache.store import Store, VersionMeta, digest
from icbdcache.store.chunks import DIGEST_SIZE, UNKNOWN, ZERO
from icbdcache.store.hotset import HotSet
from icbdcache.store.leases import LOOK_EVERY, FaultLeases, Grant
from icbdcache.store.reader import StoreReader
from nbd.constants import TransmissionFlag as TF

CS = 64 * 1024
CHUNKS = 32


def image_bytes() -> bytes:
    """32 chunks; chunk 3 is all zeros, chunks 10 and 11 are equal (one digest)."""
    out = bytearray()
    for i in range(CHUNKS):
        if i == 3:
            out += bytes(CS)
        else:
            seed = 10 if i == 11 else i
            out += bytes((seed * 31 + j) % 251 for j in range(256)) * (CS // 256)
    return bytes(out)


DATA = image_bytes()


def chunk_map(data: bytes = DATA) -> bytearray:
    return bytearray(b"".join(digest(data[i * CS : (i + 1) * CS]) for i in range(CHUNKS)))


class FakeSource(Source):
    """An image in memory; counts reads per offset; ``gate`` (an event) holds every read;
    ``fail`` makes reads raise SourceUnavailable; ``flip`` corrupts the first N reads."""

    def __init__(self, data: bytes, name: str = "fake") -> None:
        super().__init__(name, len(data))
        self.data = data
        self.reads: list[int] = []
        self.gate: asyncio.Event | None = None
        self.fail = False
        self.flip = 0
        self.retry = RetryPolicy(attempts=3, first_wait=0.001)

    @property
    def healthy(self) -> bool:
        return not self.fail

    async def _read(self, offset: int, length: int) -> bytes:
        self.reads.append(offset)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise SourceUnavailable(f"{self.name}: down")
        out = self.data[offset : offset + length]
        if self.flip:
            self.flip -= 1
            out = bytes([out[0] ^ 0xFF]) + out[1:]
        return out


class Recorder(Layer):
    """A bottom layer that records what reaches it and answers reads with zeros."""

    def __init__(self, size: int) -> None:
        super().__init__(None)
        self.size = size
        self.calls: list[tuple[str, int, int]] = []

    def pread(self, offset: int, length: int) -> ReadResult:
        self.calls.append(("pread", offset, length))
        return [bytes(length)]

    def cache(self, offset: int, length: int) -> None:
        self.calls.append(("cache", offset, length))

    def can_cache(self) -> bool:
        return True


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    s.close()


def version_stack(store: Store, src: FakeSource, *, key_map: bytearray | None = None,
                  hot: int = 1 << 30) -> tuple[StoreReader, VersionLayer, FaultLayer]:
    meta = VersionMeta("lab", "1", len(DATA), CS, ["fake"])
    m = key_map if key_map is not None else chunk_map()
    store.put_version(meta, bytes(m))
    reader = StoreReader(store, hot_bytes=hot)
    stats = ReadStats()
    version = VersionLayer(reader, meta, bytearray(m), stats)
    fault = FaultLayer(version, [src], Faults(stats, fault_timeout=5.0))
    return reader, version, fault


def joined(bufs: list[Buffer]) -> bytes:
    return b"".join(bytes(b) for b in bufs)


async def read(layer: Layer, offset: int, length: int) -> bytes:
    r = layer.pread(offset, length)
    return joined(r if isinstance(r, list) else await r)


# ---------------------------------------------------------------- pass-through


def test_a_layer_passes_through_what_it_does_not_define() -> None:
    bottom = Recorder(10 * CS)

    class Middle(Layer):
        pass

    top = Middle(Middle(bottom))
    assert top.size == bottom.size
    assert joined(top.pread(5, 7)) == bytes(7)  # type: ignore[arg-type]
    top.cache(CS, 2 * CS)
    assert bottom.calls == [("pread", 5, 7), ("cache", CS, 2 * CS)]
    assert top.can_cache() and not top.can_write() and not top.can_flush()
    with pytest.raises(PermissionError):
        top.pwrite(0, b"x")


# ---------------------------------------------------------------- flags from can_*


def test_flags_are_built_from_the_stack(tmp_path: Path, store: Store) -> None:
    path = tmp_path / "base.img"
    path.write_bytes(DATA[: 4 * CS])
    file_layer = FileLayer(path)
    ro = transmission_flags(file_layer)
    assert ro & TF.READ_ONLY and ro & TF.SEND_CACHE and ro & TF.CAN_MULTI_CONN
    assert not ro & (TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES)

    cowdir = CowDir(str(tmp_path / "cow"))
    cow = transmission_flags(OverlayLayer(file_layer, cowdir, "scratch", "b"))
    assert not cow & TF.READ_ONLY
    for flag in (TF.SEND_FLUSH, TF.SEND_FUA, TF.SEND_TRIM, TF.SEND_WRITE_ZEROES,
                 TF.SEND_FAST_ZERO, TF.SEND_CACHE, TF.CAN_MULTI_CONN):
        assert cow & flag, flag

    # a bottom that cannot CACHE: neither it nor an overlay over it advertises SEND_CACHE
    plain = Recorder(CS)
    plain.can_cache = lambda: False  # type: ignore[method-assign]
    assert not transmission_flags(plain) & TF.SEND_CACHE
    assert not transmission_flags(OverlayLayer(plain, cowdir, "plain", "b")) & TF.SEND_CACHE

    # a store version: the version layer alone is hits only (no CACHE); the fault layer adds it
    _, version, fault = version_stack(store, FakeSource(DATA))
    assert not transmission_flags(version) & TF.SEND_CACHE
    assert transmission_flags(fault) & TF.SEND_CACHE
    file_layer.close()


def test_the_catalog_hands_its_answer_to_transmission(tmp_path: Path) -> None:
    path = tmp_path / "base.img"
    path.write_bytes(DATA[: 2 * CS])
    cowdir = CowDir(str(tmp_path / "cow"))
    cowdir.open(0.0)
    base = FileLayer(path)
    export = Export.of_layer("scratch", base, overlays=cowdir, base_id=base.fingerprint)
    catalog = Catalog([export], cowdir=cowdir)
    info = catalog.lookup("scratch?boot=abc")
    assert info is not None and info.size == 2 * CS
    assert isinstance(info.handle, Resolved)
    assert info.handle.export is export and info.handle.options == {"boot": "abc"}
    assert info.flags == transmission_flags(export.stack)
    view = export.connect(Client("10.0.0.7", info.handle.options, 1.0))
    assert isinstance(view, CowOverlay)
    assert export.connect(Client("10.0.0.7", {"boot": "abc"}, 2.0)) is view  # same client
    catalog.close()


# ---------------------------------------------------------------- hot set


def test_hot_set_evicts_the_least_recently_used() -> None:
    hot = HotSet(3 * 100)
    for k in (b"a", b"b", b"c"):
        hot.put(k, bytes(100))
    assert hot.get(b"a") is not None  # a is now the most recent
    hot.put(b"d", bytes(100))
    assert b"b" not in hot and b"a" in hot and b"c" in hot and b"d" in hot
    assert hot.used == 300 and len(hot) == 3
    off = HotSet(0)
    off.put(b"x", b"y")
    assert len(off) == 0


def test_a_chunk_enters_the_hot_set_on_its_second_read(store: Store) -> None:
    d = digest(DATA[:CS])
    store.write_batch([(d, DATA[:CS])])
    reader = StoreReader(store, hot_bytes=1 << 20)
    try:
        txn = reader.txn()
        assert bytes(reader.read(d, 10, 20, txn) or b"") == DATA[10:20]
        txn.close()
        assert d not in reader.hot  # one read (a scan) does not admit
        txn = reader.txn()
        assert bytes(reader.read(d, 0, CS, txn) or b"") == DATA[:CS]
        txn.close()
        assert d in reader.hot
        assert reader.read(digest(b"x" * 10), 0, 1, reader.txn()) is None
    finally:
        reader.close()


# ---------------------------------------------------------------- version and fault


def test_the_version_layer_answers_hits_and_names_what_it_lacks(store: Store) -> None:
    reader, version, _ = version_stack(store, FakeSource(DATA))
    reader.keep(digest(DATA[:CS]), DATA[:CS])
    with pytest.raises(ChunksMissing) as e:
        version.pread(CS - 5, 10)  # chunk 0 held, chunk 1 not
    assert [(slot, index, lo, hi) for slot, index, lo, hi in e.value.missing] == [(1, 1, 0, 5)]
    assert bytes(e.value.out[0]) == DATA[CS - 5 : CS]
    assert joined(version.pread(3 * CS, 100)) == bytes(100)  # type: ignore[arg-type]
    assert version.stats.hits == 1  # chunk 0; the zero chunk is no store hit
    assert version.extents(2 * CS, 3 * CS) == [(CS, 0), (CS, 3), (CS, 0)]
    reader.close()


def test_single_flight_many_waiters_one_fetch(store: Store) -> None:
    src = FakeSource(DATA)
    reader, _version, fault = version_stack(store, src)

    async def main() -> None:
        src.gate = asyncio.Event()
        waiters = [fault.pread(5 * CS + 100 * i, 100) for i in range(20)]
        # chunks 10 and 11 share a digest: both reads wait for one fetch
        waiters += [fault.pread(10 * CS, 10), fault.pread(11 * CS + 1, 10)]
        assert all(not isinstance(w, list) for w in waiters)
        tasks = [asyncio.ensure_future(w) for w in waiters]  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert len(src.reads) == 2  # every waiter is waiting; two fetches started
        src.gate.set()
        got = [joined(b) for b in await asyncio.gather(*tasks)]
        assert got[:20] == [DATA[5 * CS + 100 * i : 5 * CS + 100 * i + 100] for i in range(20)]
        assert got[20:] == [DATA[10 * CS : 10 * CS + 10], DATA[11 * CS + 1 : 11 * CS + 11]]

    asyncio.run(main())
    assert sorted(src.reads) == [5 * CS, 10 * CS]
    stats = fault.faults.stats
    assert stats.faults == 2 and stats.misses == 22 and stats.coalesced == 20
    assert joined(fault.pread(5 * CS, CS)) == DATA[5 * CS : 6 * CS]  # type: ignore[arg-type]
    reader.close()


def test_a_corrupt_answer_is_refused_and_fetched_again(store: Store) -> None:
    src = FakeSource(DATA)
    src.flip = 1
    reader, _, fault = version_stack(store, src)
    got = asyncio.run(read(fault, 7 * CS, CS))
    assert got == DATA[7 * CS : 8 * CS]
    assert src.reads == [7 * CS, 7 * CS] and fault.faults.stats.corrupt == 1
    reader.close()


def test_a_dead_source_is_eio_for_that_read_only(store: Store) -> None:
    src = FakeSource(DATA)
    reader, _version, fault = version_stack(store, src)
    reader.keep(digest(DATA[2 * CS : 3 * CS]), DATA[2 * CS : 3 * CS])
    src.fail = True
    with pytest.raises(OSError) as e:
        asyncio.run(read(fault, 4 * CS, 10))
    assert e.value.errno == 5 and "fake: down" in str(e.value)
    assert len(src.reads) == 3  # the source's retry policy: three attempts
    assert joined(fault.pread(2 * CS, 10)) == DATA[2 * CS : 2 * CS + 10]  # type: ignore[arg-type]
    reader.close()


def test_an_unknown_map_is_learned_and_checked_after(store: Store) -> None:
    unknown = bytearray(UNKNOWN * CHUNKS)
    src = FakeSource(DATA)
    reader, version, fault = version_stack(store, src, key_map=unknown)
    assert asyncio.run(read(fault, 3 * CS, 10)) == bytes(10)  # zero chunk, learned as ZERO
    assert asyncio.run(read(fault, 9 * CS, 10)) == DATA[9 * CS : 9 * CS + 10]
    assert version.digest_at(3) == ZERO and version.digest_at(9) == digest(DATA[9 * CS:10 * CS])
    assert reader.writer.flush()
    stored = store.chunk_map("lab@1")
    assert bytes(stored[9 * DIGEST_SIZE : 10 * DIGEST_SIZE]) == version.digest_at(9)
    reader.close()


# ---------------------------------------------------------------- readahead


def test_profile_readahead_while_serving(store: Store) -> None:
    """A client that reads along the recorded profile: its misses hint the next chunks of
    the profile down the stack, and reads of marked chunks keep the window moving."""
    store.put_profile("lab@1", [2, 9, 4, 20, 21, 22, 5, 30])
    bottom = Recorder(CHUNKS * CS)
    profile = BootProfile(store, "lab@1", ahead=3)
    ra = ReadaheadLayer(bottom, profile, CS, seq_ahead=0)
    # a hit on chunk 2 (in the profile, unmarked): no hint
    ra.pread(2 * CS, 10)
    assert [c for c in bottom.calls if c[0] == "cache"] == []
    # a miss on chunk 2: hint the next 3 of the profile and mark the middle one
    bottom.pread = lambda o, n: asyncio.sleep(0, [bytes(n)])  # type: ignore[method-assign,assignment,return-value]
    r = ra.pread(2 * CS, 10)
    asyncio.run(r)  # type: ignore[arg-type]
    hints = [o // CS for k, o, _ in bottom.calls if k == "cache"]
    assert hints == [9, 4, 20] and profile.marks == {4}
    # a later hit on the marked chunk 4 moves the window on
    bottom.pread = lambda o, n: [bytes(n)]  # type: ignore[method-assign,assignment,return-value]
    ra.pread(4 * CS, 10)
    hints = [o // CS for k, o, _ in bottom.calls if k == "cache"]
    assert hints == [9, 4, 20, 20, 21, 22] and profile.marks == {21}


def test_recording_a_profile_then_saving_it(store: Store) -> None:
    bottom = Recorder(CHUNKS * CS)
    ra = ReadaheadLayer(bottom, BootProfile(store, "lab@1"), CS, seq_ahead=0)
    ra.pread(0, 10)  # no client connected: nothing recorded
    ra.connect(Client("10.0.0.1", {}, 0.0))  # a client at t=0: outside the window now
    import time as _time
    ra.connect(Client("10.0.0.2", {}, _time.monotonic()))
    for idx in (7, 7, 1, 12):
        ra.pread(idx * CS, 10)
    ra.pread(2 * CS - 1, 2)  # spans chunks 1 and 2
    ra.profile.save()
    assert store.profile("lab@1") == [7, 1, 12, 2]


def test_sequential_miss_hints_the_next_chunks(store: Store) -> None:
    bottom = Recorder(CHUNKS * CS)
    ra = ReadaheadLayer(bottom, BootProfile(store, "lab@1"), CS, seq_ahead=4)
    bottom.pread = lambda o, n: asyncio.sleep(0, [bytes(n)])  # type: ignore[method-assign,assignment,return-value]

    def hints() -> list[int]:
        return [o // CS for k, o, _ in bottom.calls if k == "cache"]

    asyncio.run(ra.pread(5 * CS, 10))  # type: ignore[arg-type]  # a lone miss
    assert hints() == []
    asyncio.run(ra.pread(6 * CS, 10))  # type: ignore[arg-type]  # follows chunk 5
    assert [(o // CS, n // CS) for k, o, n in bottom.calls if k == "cache"] == [(7, 4)]


# ---------------------------------------------------------------- CACHE through an overlay


def test_cache_through_an_overlay_reaches_the_sources(tmp_path: Path, store: Store) -> None:
    src = FakeSource(DATA)
    reader, version, fault = version_stack(store, src)
    ra = ReadaheadLayer(fault, BootProfile(store, "lab@1"), CS, seq_ahead=0)
    cowdir = CowDir(str(tmp_path / "cow"))
    cowdir.open(0.0)
    export = Export.of_layer("lab@1", ra, overlays=cowdir, base_id="lab@1 test")
    assert transmission_flags(export.stack) & TF.SEND_CACHE

    async def main() -> None:
        view = export.connect(Client("10.0.0.9", {}, 1.0))
        assert isinstance(view, CowOverlay)
        view.cache(12 * CS + 1, 3 * CS)  # chunks 12..15
        for _ in range(100):
            if fault.faults.prefetching == 0 and len(src.reads) == 4:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert sorted(src.reads) == [12 * CS, 13 * CS, 14 * CS, 15 * CS]
    assert reader.writer.flush()
    assert all(version.held(i) for i in range(12, 16))
    export.close()
    cowdir.close()
    reader.close()


# ---------------------------------------------------------------- the node


def test_node_warm_faults_the_profile_once(tmp_path: Path, store: Store) -> None:
    img = tmp_path / "lab.img"
    img.write_bytes(DATA)
    meta = VersionMeta("lab", "1", len(DATA), CS, [str(img)])
    store.put_version(meta, bytes(chunk_map()))
    store.set_latest("lab", "1")
    store.put_profile("lab@1", [4, 5, 6, 3])

    async def main() -> tuple[str, int, int]:
        node = Node(store)
        try:
            return await node.warm("lab", None, parallel=2)
        finally:
            await node.close()

    assert asyncio.run(main()) == ("lab@1", 4, 0)
    assert store.held == 3 * CS  # chunk 3 is zeros: never stored
    assert store.stats()["faults"] == 3
    assert os.path.exists(img)


# ---------------------------------------------------------------- the hit path


def test_hot_hits_become_access_ticks_and_eviction_stays_coldest_first(tmp_path: Path) -> None:
    """Reads answered from the hot set (the version layer's own fast path) are gathered in
    memory and reach the store's access ticks when handed to the writer: the chunks read are
    then the warmest, and eviction takes the coldest ones the reads did not touch."""
    store = Store(tmp_path / "s", size_limit=6 * CS)
    try:
        parts = [DATA[i * CS : (i + 1) * CS] for i in (0, 1, 2, 4, 5, 6)]
        keys = [digest(p) for p in parts]
        for k, p in zip(keys, parts, strict=True):
            store.write_batch([(k, p)])  # one batch each: ticks 1..6, chunk 0 the coldest
        meta = VersionMeta("lab", "1", len(parts) * CS, CS, [])
        reader = StoreReader(store, hot_bytes=1 << 30)
        stats = ReadStats()
        version = VersionLayer(reader, meta, bytearray(b"".join(keys)), stats)
        for i in (0, 1, 0, 1, 0):  # LMDB, LMDB + admission, then hot hits
            assert joined(version.pread(i * CS + 100, 4096)) == parts[i][100:4196]  # type: ignore[arg-type]
        assert stats.hits == 5  # every read a hit, the fast path's too
        assert (reader.hits.hits_hot, reader.hits.hits_lmdb) == (1, 4)
        assert reader.recent == {keys[0], keys[1]}
        assert reader.flush_recent() == 2 and reader.recent == set()
        reader.close()  # the writer commits the ticks as it stops
        extra = DATA[7 * CS : 8 * CS]
        store.write_batch([(digest(extra), extra)])  # 7 > 6 chunks: evict down to 5.4
        held = [store.has_chunk(k) for k in keys]
        assert held == [True, True, False, False, True, True]
    finally:
        store.close()


def test_a_chunk_read_again_soon_is_not_ticked_again(tmp_path: Path) -> None:
    """Reads of a chunk whose access tick was handed to the writer less than TOUCH_AGAIN
    seconds before are not handed again (a boot storm reads the same chunks again and
    again); after two periods they are."""
    from icbdcache.store import reader as reader_mod

    store = Store(tmp_path / "s")
    try:
        parts = [DATA[i * CS : (i + 1) * CS] for i in range(3)]
        keys = [digest(p) for p in parts]
        store.write_batch(list(zip(keys, parts, strict=True)))
        meta = VersionMeta("lab", "1", len(parts) * CS, CS, [])
        reader = StoreReader(store, hot_bytes=1 << 30)
        version = VersionLayer(reader, meta, bytearray(b"".join(keys)), ReadStats())

        def read(*idx: int) -> int:
            for i in idx:
                assert joined(version.pread(i * CS, 512)) == parts[i][:512]  # type: ignore[arg-type]
            return reader.flush_recent()

        assert read(0, 1) == 2
        assert read(0, 1, 0) == 0  # handed just now
        assert read(1, 2) == 1  # only the new one
        reader._ticked_since -= reader_mod.TOUCH_AGAIN  # one period later: still recent
        assert read(0) == 0
        reader._ticked_since -= reader_mod.TOUCH_AGAIN  # two: handed again
        assert read(0, 1, 2) == 3
        reader.close()
    finally:
        store.close()


def test_the_fast_path_follows_a_learned_map_entry(store: Store) -> None:
    """A map entry learned after it was read as UNKNOWN is read anew (the version layer's
    cache of map entries drops it): the hit returns the learned chunk's bytes."""
    m = chunk_map()
    m[5 * DIGEST_SIZE : 6 * DIGEST_SIZE] = UNKNOWN
    reader, version, _ = version_stack(store, FakeSource(DATA), key_map=m)
    with pytest.raises(ChunksMissing):
        version.pread(5 * CS, 10)
    d = digest(DATA[5 * CS : 6 * CS])
    reader.keep(d, DATA[5 * CS : 6 * CS])
    version.learn(5, d)
    assert joined(version.pread(5 * CS + 7, 10)) == DATA[5 * CS + 7 : 5 * CS + 17]  # type: ignore[arg-type]
    assert version.stats.hits == 1 and reader.hits.hits_hot == 1
    reader.close()


def test_a_read_over_several_chunks_follows_a_learned_map_entry(store: Store) -> None:
    """A read over several chunks with an UNKNOWN map entry names it missing; once the entry
    is learned (and the chunk held), the same read is three hot hits with the right bytes."""
    m = chunk_map()
    m[5 * DIGEST_SIZE : 6 * DIGEST_SIZE] = UNKNOWN
    reader, version, _ = version_stack(store, FakeSource(DATA), key_map=m)
    for i in (4, 5, 6):
        reader.keep(digest(DATA[i * CS : (i + 1) * CS]), DATA[i * CS : (i + 1) * CS])
    with pytest.raises(ChunksMissing) as e:
        version.pread(4 * CS + 3, 2 * CS)
    assert [index for _, index, _, _ in e.value.missing] == [5]
    version.learn(5, digest(DATA[5 * CS : 6 * CS]))
    hot = reader.hits.hits_hot
    got = version.pread(4 * CS + 3, 2 * CS + 10)
    assert joined(got) == DATA[4 * CS + 3 : 6 * CS + 13]  # type: ignore[arg-type]
    assert reader.hits.hits_hot - hot == 3
    reader.close()


@pytest.mark.parametrize("size", [len(DATA), len(DATA) - 1000])
def test_reads_over_many_hot_chunks_return_the_bytes_and_count_each_chunk(
        store: Store, size: int) -> None:
    """A read over several chunks all in the hot set is answered in one step (partial first
    and last chunks, a short last chunk); one with a zero chunk or a chunk only in LMDB takes
    the general path. Every byte and every chunk's hit is checked."""
    meta = VersionMeta("lab", "1", size, CS, ["fake"])
    m = chunk_map()
    store.put_version(meta, bytes(m))
    reader = StoreReader(store, hot_bytes=1 << 30)
    version = VersionLayer(reader, meta, bytearray(m), ReadStats())
    for i in range(CHUNKS):
        if i not in (3, 20):  # zero chunk; chunk 20 only in LMDB
            reader.keep(digest(DATA[i * CS : (i + 1) * CS]), DATA[i * CS : (i + 1) * CS])
    store.write_batch([(digest(DATA[20 * CS : 21 * CS]), DATA[20 * CS : 21 * CS])])
    rng = random.Random(5)
    image = DATA[:size]
    spans = [(4 * CS, 16 * CS), (4 * CS + 1, CS), (size - 3 * CS - 7, 3 * CS + 7),
             (2 * CS, 3 * CS), (19 * CS + 5, 2 * CS), (5 * CS, 2 * CS - 1), (6 * CS - 1, 2)]
    spans += [(o, rng.randrange(1, min(size - o, 6 * CS) + 1))
              for o in (rng.randrange(size) for _ in range(300))]
    try:
        for offset, length in spans:
            first, last = offset // CS, (offset + length - 1) // CS
            hot0, lmdb0 = reader.hits.hits_hot, reader.hits.hits_lmdb
            got = version.pread(offset, length)
            assert isinstance(got, list)
            assert joined(got) == image[offset : offset + length], (offset, length)
            held = [i for i in range(first, last + 1) if i != 3]
            in_lmdb = sum(1 for i in held if i == 20 and (reader.hits.hits_lmdb > lmdb0))
            assert reader.hits.hits_hot - hot0 == len(held) - in_lmdb, (offset, length)
            assert reader.recent >= {bytes(m[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
                                     for i in held if i != 20}
    finally:
        reader.close()
    # map entries are kept (as dict keys) only for reads that found every chunk hot: a read
    # through the general path, or a scan, does not grow the memory
    fresh = VersionLayer(reader, meta, bytearray(m), ReadStats())
    fresh.pread(2 * CS, 3 * CS)  # chunk 3 is all zeros: the general path
    fresh.pread(3 * CS - 5, 10)
    assert fresh._keys[2:5] == [None] * 3
    fresh.pread(4 * CS + 1, 2 * CS)
    assert fresh._keys[4:7] == [bytes(m[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
                                for i in (4, 5, 6)]


def test_a_full_writer_queue_holds_back_faults_and_keeps_memory_bounded(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store stalls (its write transaction waits): background faults stop, a client's
    faults wait a moment for room, then are served and kept in memory only (``not_kept``);
    the writer's queue never holds more than its bound plus one chunk."""
    import threading

    from icbdcache.layers import fault as fault_module
    from icbdcache.store import BatchWriter

    monkeypatch.setattr(fault_module, "ROOM_WAIT", 0.05)
    gate = threading.Event()
    real = store.write_batch

    def stalled(*args: object, **kwargs: object) -> None:
        gate.wait(30)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "write_batch", stalled)
    src = FakeSource(DATA)
    meta = VersionMeta("lab", "1", len(DATA), CS, ["fake"])
    store.put_version(meta, bytes(chunk_map()))
    writer = BatchWriter(store, max_items=1, max_delay=0, max_queued=2 * CS)
    reader = StoreReader(store, hot_bytes=1 << 30, writer=writer)
    stats = ReadStats()
    version = VersionLayer(reader, meta, chunk_map(), stats)
    fault = FaultLayer(version, [src], Faults(stats, fault_timeout=5.0))
    wanted = [i for i in range(12, 24)]

    async def main() -> tuple[list[bytes], bool]:
        got = await asyncio.gather(*(read(fault, i * CS, CS) for i in wanted))
        return list(got), fault.prefetch(30)

    async def prefetch_now() -> bool:
        started = fault.prefetch(30)
        await asyncio.sleep(0.2)
        return started

    got, started = asyncio.run(main())
    assert got == [DATA[i * CS : (i + 1) * CS] for i in wanted]  # every client served
    assert writer.queued_peak <= 3 * CS  # the bound (two chunks) plus the one that crossed it
    assert stats.not_kept >= len(wanted) - 4 and stats.faults == len(wanted)
    assert not started and stats.prefetched == 0  # no background fault while it is full
    gate.set()
    writer.flush()
    kept = [i for i in wanted if store.has_chunk(digest(DATA[i * CS : (i + 1) * CS]))]
    assert len(kept) == len(wanted) - stats.not_kept
    assert asyncio.run(prefetch_now()) and stats.prefetched == 1  # room again: it resumes
    assert src.reads.count(30 * CS) == 1
    reader.close()


def test_a_patient_warm_stores_every_chunk_while_the_store_is_slow(
        tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """``warm`` (patient faults) with a writer's queue of two chunks and a store that takes
    20 ms a transaction: it waits for room instead of leaving chunks unkept."""
    import time as _time

    img = tmp_path / "lab.img"
    img.write_bytes(DATA)
    meta = VersionMeta("lab", "1", len(DATA), CS, [str(img)])
    store.put_version(meta, bytes(chunk_map()))
    store.set_latest("lab", "1")
    real = store.write_batch

    def slow(*args: object, **kwargs: object) -> int:
        _time.sleep(0.02)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "write_batch", slow)

    async def main() -> tuple[str, int, int]:
        node = Node(store, hot_bytes=1 << 20)
        node.faults.patient = True
        node.reader.writer.max_queued = 2 * CS
        try:
            return await node.warm("lab", list(range(CHUNKS)), parallel=8)
        finally:
            assert node.stats.not_kept == 0
            await node.close()

    assert asyncio.run(main()) == ("lab@1", CHUNKS, 0)
    distinct = {digest(DATA[i * CS : (i + 1) * CS]) for i in range(CHUNKS) if i != 3}
    assert all(store.has_chunk(d) for d in distinct) and store.held == len(distinct) * CS


def test_a_chunk_not_kept_still_stores_the_digest_it_taught(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version learning its map from an upstream: a chunk served but not kept (the queue
    full) still has its map entry stored, so a later fault finds it by digest."""
    import threading

    from icbdcache.layers import fault as fault_module
    from icbdcache.store import BatchWriter

    monkeypatch.setattr(fault_module, "ROOM_WAIT", 0.01)
    gate = threading.Event()
    real = store.write_batch

    def stalled(*args: object, **kwargs: object) -> int:
        gate.wait(30)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "write_batch", stalled)
    src = FakeSource(DATA)
    unknown = bytearray(UNKNOWN * CHUNKS)
    meta = VersionMeta("lab", "1", len(DATA), CS, ["fake"])
    store.put_version(meta, bytes(unknown))
    writer = BatchWriter(store, max_items=1, max_delay=0, max_queued=CS)
    reader = StoreReader(store, writer=writer)
    stats = ReadStats()
    version = VersionLayer(reader, meta, unknown, stats)
    fault = FaultLayer(version, [src], Faults(stats, fault_timeout=5.0))
    wanted = list(range(12, 20))

    async def main() -> list[bytes]:
        return list(await asyncio.gather(*(read(fault, i * CS, CS) for i in wanted)))

    assert asyncio.run(main()) == [DATA[i * CS : (i + 1) * CS] for i in wanted]
    assert stats.not_kept >= 1
    gate.set()
    writer.flush()
    for i in wanted:  # every digest learned is in the stored map, kept chunk or not
        assert store.map_entry("lab@1", i) == digest(DATA[i * CS : (i + 1) * CS]), i
    reader.close()


# ---------------------------------------------------------------- across processes


def another_faulter(store: Store) -> FaultLeases:
    """Another process that faults on ``store`` (its own open files: a separate lock owner)."""
    other = FaultLeases(store.path)
    other.register()
    return other


def counted_looks(reader: StoreReader, monkeypatch: pytest.MonkeyPatch,
                  first: Callable[[], None] | None = None) -> list[bytes]:
    """The keys ``reader`` is asked to look up, from now on (a list that grows); ``first``
    runs at the first look, which then misses."""
    looks: list[bytes] = []
    real_lookup = reader.lookup

    def lookup(key: bytes) -> bytes | None:
        looks.append(key)
        if first is not None and len(looks) == 1:
            first()
            return None
        return real_lookup(key)

    monkeypatch.setattr(reader, "lookup", lookup)
    return looks


def test_a_chunk_stored_between_the_look_and_the_lease_is_not_fetched(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process commits the chunk after this one looked and missed, and gives its lease
    back: the fault takes the lease at once and must look again under it, not fetch (before
    the look under the lease, two workers reading one image fetched a chunk twice)."""
    other = another_faulter(store)
    src = FakeSource(DATA)
    reader, _version, fault = version_stack(store, src)
    d = digest(DATA[6 * CS : 7 * CS])

    def commit() -> None:  # the other process, just after the caller's look
        store.write_batch([(d, DATA[6 * CS : 7 * CS])])

    looks = counted_looks(reader, monkeypatch, first=commit)
    assert asyncio.run(read(fault, 6 * CS + 5, 100)) == DATA[6 * CS + 5 : 6 * CS + 105]
    assert src.reads == [] and looks == [d, d]
    assert fault.faults.stats.faults == 0
    assert not reader.leases.alone
    assert other.take(d)  # given back
    reader.close()
    other.close()


def test_a_fault_alone_takes_no_lease_and_makes_no_second_look(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no other process faulting on the store, a fault fetches after the caller's one
    look and holds no lease; once its chunk is committed it no longer faults alone (a
    newcomer need not wait for it)."""
    src = FakeSource(DATA)
    reader, _version, fault = version_stack(store, src)
    d = digest(DATA[6 * CS : 7 * CS])
    looks = counted_looks(reader, monkeypatch)
    held: list[bool] = []
    real_fetch = fault._fetch

    async def fetch(index: int, want: bytes) -> bytes:
        held.append(reader.leases.alone)
        other = FaultLeases(store.path)
        held.append(other.take(d))  # free: the fault holds no lease
        other.close()
        return await real_fetch(index, want)

    monkeypatch.setattr(fault, "_fetch", fetch)
    assert asyncio.run(read(fault, 6 * CS, CS)) == DATA[6 * CS : 7 * CS]
    assert src.reads == [6 * CS] and looks == [d] and held == [True, True]
    assert reader.writer.flush()
    assert not reader.leases.alone
    reader.close()


def test_a_fault_alone_in_flight_lets_a_newcomer_go_on(store: Store) -> None:
    """A newcomer comes while a fault alone waits on a slow upstream: within a few looks
    (every LOOK_EVERY, from the event loop) the fault takes its lease and ALONE is given up,
    so the newcomer goes on at once for other chunks and waits only for that one (before,
    it waited for the slow fetch to end, and met its fault deadline)."""
    src = FakeSource(DATA)
    reader, _version, fault = version_stack(store, src)
    d = digest(DATA[6 * CS : 7 * CS])

    async def main() -> tuple[bool, Grant, Grant, Grant]:
        src.gate = asyncio.Event()
        task = asyncio.ensure_future(read(fault, 6 * CS, CS))
        await asyncio.sleep(0.005)
        alone = reader.leases.alone
        newcomer = another_faulter(store)
        first = newcomer.begin(b"other chunk 16 b")
        await asyncio.sleep(LOOK_EVERY * 5)
        later, same = newcomer.begin(b"other chunk 16 b"), newcomer.begin(d)
        src.gate.set()
        assert await task == DATA[6 * CS : 7 * CS]
        newcomer.close()
        return alone, first, later, same

    assert asyncio.run(main()) == (True, Grant.BUSY, Grant.HELD, Grant.BUSY)
    assert not reader.leases.alone
    reader.close()


def test_an_entry_learned_by_another_process_is_read_under_the_lease(store: Store) -> None:
    """A chunk of an unlearned map that another process fetched, learned and stored is read
    from the store (its digest from the stored map, under the lease), not fetched again."""
    other = another_faulter(store)
    unknown = bytearray(UNKNOWN * CHUNKS)
    src = FakeSource(DATA)
    reader, version, fault = version_stack(store, src, key_map=unknown)
    d = digest(DATA[9 * CS : 10 * CS])
    store.write_batch([(d, DATA[9 * CS : 10 * CS])], [("lab@1", 9, d)])  # the other process
    assert version.digest_at(9) == UNKNOWN
    assert asyncio.run(read(fault, 9 * CS, CS)) == DATA[9 * CS : 10 * CS]
    assert src.reads == [] and version.digest_at(9) == d
    reader.close()
    other.close()


def test_fetch_adds_a_timer_only_when_the_deadline_comes_before_the_sources_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A source whose reads end within ``read_timeout`` needs no second timer while the
    fault's deadline is further away (one per fault was measurable on a cold fill); a
    nearer deadline still cuts a read that hangs."""
    import time as _time

    timers: list[float | None] = []
    real = asyncio.timeout

    def counted(delay: float | None) -> asyncio.Timeout:
        timers.append(delay)
        return real(delay)

    monkeypatch.setattr(asyncio, "timeout", counted)  # (the module's asyncio is this one)
    src = FakeSource(DATA)
    src.read_timeout = 5.0

    async def main() -> None:
        far = _time.monotonic() + 10.0
        assert await src.fetch(0, 10, deadline=far) == DATA[:10]
        assert timers == []
        src.gate = asyncio.Event()  # every read hangs
        near = _time.monotonic() + 0.2
        with pytest.raises(SourceUnavailable, match="no data before the deadline"):
            await src.fetch(0, 10, deadline=near)
        assert len(timers) == 1 and timers[0] is not None and timers[0] <= 0.2

    asyncio.run(main())


def test_a_chunk_learned_as_zeros_meanwhile_is_not_fetched_again(store: Store) -> None:
    """A read found chunk 3 missing (not learned yet); by the time its fault starts, another
    fault has learned it as all zeros, which the store never holds: it is answered as zeros,
    not fetched again (an attacker's count: 38 zero chunks fetched twice by 4 readers)."""
    unknown = bytearray(UNKNOWN * CHUNKS)
    src = FakeSource(DATA)
    reader, version, fault = version_stack(store, src, key_map=unknown)
    assert asyncio.run(read(fault, 3 * CS, CS)) == bytes(CS)
    assert version.digest_at(3) == ZERO and src.reads == [3 * CS]
    assert asyncio.run(fault.fault(3)) == bytes(CS)  # the late fault of the earlier read
    assert src.reads == [3 * CS]
    reader.close()
