"""The replica's receive path (issue 17): the chunk stream decoder copies a chunk at most once
and never when it arrives as a piece of its own; the replica checks each chunk's xxh3 and
BLAKE3 digests once each (the store does not compute them again). Counts and bytes only."""

from __future__ import annotations

import random
from typing import Any

import pytest

from icbdcache.replication import replica as replica_mod
from icbdcache.replication import wire
from icbdcache.replication.replica import Replica
from icbdcache.store import Store
from icbdcache.store.chunks import digest, strong_digest
from icbdcache.store.lmdbstore import ChunkMismatch


def _stream(rng: random.Random, level: int | None, n: int = 24
            ) -> tuple[bytes, list[tuple[bytes, bytes | None]]]:
    chunks: list[tuple[bytes, bytes | None]] = []
    for _ in range(n):
        data = rng.randbytes(rng.randint(1, 70000)) if rng.random() > 0.1 else None
        chunks.append((rng.randbytes(16), data))
    enc = wire.ChunkStreamEncoder(level)
    return b"".join(enc.frame(d, c) for d, c in chunks) + enc.end(), chunks


@pytest.mark.parametrize("level", [None, 3])
def test_decoder_gives_every_frame_whatever_the_pieces(level: int | None) -> None:
    rng = random.Random(17 if level is None else 18)
    for _ in range(40):
        body, chunks = _stream(rng, level)
        dec = wire.ChunkStreamDecoder("zstd" if level else None, expect=[d for d, _ in chunks])
        got: list[wire.ChunkFrame] = []
        pos = 0
        while pos < len(body):
            n = rng.choice([1, 7, 20, 21, 4096, 65536, 65556, 200000, rng.randint(1, 300000)])
            got += dec.feed(body[pos : pos + n])
            pos += n
        dec.close()
        assert [(f.digest, f.data) for f in got] == chunks
        assert all(f.data is None or type(f.data) is bytes for f in got)


def test_decoder_keeps_a_whole_piece_without_copying_it() -> None:
    """A chunk that arrives as a piece of its own (frame header, then its bytes) is that
    very object; one inside a larger piece, or split over pieces, is a copy of its bytes."""
    rng = random.Random(5)
    a, b = rng.randbytes(65536), rng.randbytes(1000)
    da, db = digest(a), digest(b)
    dec = wire.ChunkStreamDecoder(None, expect=[da, db])
    assert dec.feed(wire.frame_header(da, len(a))) == []
    (fa,) = dec.feed(a)
    assert fa.data is a
    (fb,) = dec.feed(wire.frame_header(db, len(b)) + b[:10]) + dec.feed(b[10:])
    assert fb.data == b and fb.data is not b
    assert dec.feed(wire.frame_header(bytes(16), 0)) == []
    dec.close()
    assert dec.finished


@pytest.mark.parametrize("level", [None, 3])
def test_decoder_views_point_into_the_pieces(level: int | None) -> None:
    """feed_views (the replica's pull): a chunk inside one piece received is a view into that
    very piece (no copy); only a chunk split over pieces is copied, joined once. Whatever the
    pieces, the frames are the stream's."""
    rng = random.Random(27 if level is None else 28)
    copied = viewed = 0
    for _ in range(30):
        body, chunks = _stream(rng, level)
        dec = wire.ChunkStreamDecoder("zstd" if level else None, expect=[d for d, _ in chunks],
                                      views=True)
        got: list[wire.ChunkView] = []
        pos = 0
        while pos < len(body):
            n = rng.choice([21, 4096, 65556, 200000, 800000, rng.randint(1, 300000)])
            got += dec.feed_views(body[pos : pos + n])
            pos += n
        dec.close()
        assert [(f.digest, None if f.data is None else bytes(f.data)) for f in got] == chunks
        for f in got:
            if isinstance(f.data, memoryview):
                assert f.data.readonly and type(f.data.obj) is bytes
                assert len(f.data.obj) >= len(f.data)  # a piece as received (or decompressed)
                viewed += 1
            elif f.data is not None:
                assert type(f.data) is bytes
                copied += 1
    assert viewed > copied > 0


def test_decoder_views_without_a_copy_of_a_piece_of_several_chunks() -> None:
    """Three chunks in one piece: three views of that piece, no bytes made; feed and
    feed_views each refuse the other kind of decoder."""
    rng = random.Random(6)
    cs = [rng.randbytes(65536) for _ in range(3)]
    enc = wire.ChunkStreamEncoder()
    piece = b"".join(enc.frame(digest(c), c) for c in cs) + enc.end()
    dec = wire.ChunkStreamDecoder(None, expect=[digest(c) for c in cs], views=True)
    got = dec.feed_views(piece)
    assert [bytes(f.data or b"") for f in got] == cs
    assert all(isinstance(f.data, memoryview) and f.data.obj is piece for f in got)
    with pytest.raises(TypeError):
        dec.feed(b"")
    with pytest.raises(TypeError):
        wire.ChunkStreamDecoder(None).feed_views(b"")


def test_store_write_keeps_views_uncopied_and_stores_their_bytes(tmp_path: Any) -> None:
    """write_batch takes read-only views as they are (LMDB copies them once, into its pages)
    and stores exactly their bytes; a bytearray, which may change, is copied first."""
    store = Store(tmp_path / "s")
    try:
        rng = random.Random(8)
        body = rng.randbytes(3 * 70000)
        views = [memoryview(body)[i * 70000 : (i + 1) * 70000] for i in range(3)]
        ba = bytearray(rng.randbytes(5000))
        items: list[tuple[bytes, bytes | bytearray | memoryview]] = [
            (digest(v), v) for v in views]
        items.append((digest(ba), ba))
        assert store.write_batch(items, verified=True) == 3 * 70000 + 5000
        kept = bytes(ba)
        ba[:] = bytes(len(ba))  # changed after the write: the store holds the bytes given
        for (k, _), want in zip(items, [bytes(v) for v in views] + [kept], strict=True):
            assert store.get_chunk(k) == want and digest(want) == k
    finally:
        store.close()


def test_decoder_refuses_bytes_after_the_end_frame_in_the_same_piece() -> None:
    enc = wire.ChunkStreamEncoder()
    d = digest(b"x")
    dec = wire.ChunkStreamDecoder(None, expect=[d])
    with pytest.raises(wire.WireError, match="after the end frame"):
        dec.feed(enc.frame(d, b"x") + enc.end() + b"\0")


def test_verify_hashes_each_chunk_once_per_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica._verify: one xxh3 and one BLAKE3 per chunk; refuses a wrong digest, a wrong
    length and a wrong strong digest, counted."""
    calls = {"digest": 0, "strong": 0}

    def counted_digest(data: Any) -> bytes:
        calls["digest"] += 1
        return digest(data)

    def counted_strong(data: Any) -> bytes:
        calls["strong"] += 1
        return strong_digest(data)

    monkeypatch.setattr(replica_mod, "digest", counted_digest)
    monkeypatch.setattr(replica_mod, "strong_digest", counted_strong)
    rng = random.Random(9)
    chunks = [rng.randbytes(4096) for _ in range(6)]
    keys = [digest(c) for c in chunks]
    strong = {k: strong_digest(c) for k, c in zip(keys, chunks, strict=True)}
    lengths = {k: 4096 for k in keys}
    got = list(zip(keys, chunks, strict=True))
    good, refused = Replica._verify(got, lengths, strong, "lab@1")
    assert good == got and refused == 0
    assert calls == {"digest": 6, "strong": 6}
    bad = [(keys[0], chunks[1]),                      # not its digest
           (keys[1], chunks[1] + b"x")]               # not its length (nor its digest)
    strong[keys[2]] = bytes(32)                       # not the signed strong digest
    lengths[keys[3]] = 100                            # the map says another length
    good, refused = Replica._verify(bad + got[2:], lengths, strong, "lab@1")
    assert [k for k, _ in good] == keys[4:]
    assert refused == 4


def test_store_write_of_verified_chunks_skips_the_digest(tmp_path: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """write_batch(verified=True) computes no digest; without it a wrong chunk is refused
    before anything is written."""
    from icbdcache.store import lmdbstore

    store = Store(tmp_path / "s")
    try:
        rng = random.Random(3)
        items = [(digest(c), c) for c in (rng.randbytes(5000) for _ in range(4))]
        n = {"digest": 0}

        def counted(data: Any) -> bytes:
            n["digest"] += 1
            return digest(data)

        monkeypatch.setattr(lmdbstore, "digest", counted)
        assert store.write_batch(items[:2], verified=True) == 10000
        assert n["digest"] == 0
        assert store.write_batch(items[2:]) == 10000
        assert n["digest"] == 2
        with pytest.raises(ChunkMismatch):
            store.write_batch([(items[0][0], b"not it")])
        assert store.missing([k for k, _ in items]) == []
    finally:
        store.close()


def test_commits_run_in_one_thread_while_the_pool_is_busy(tmp_path: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica._commit writes every transaction from the same thread, whatever the default
    pool is doing (the verifying threads): spread over the pool's threads, LMDB's page copies
    faulted fresh heap pages on each commit (1.6x the page faults of a delta). Then drain()
    lets the thread go, and a later commit makes one again."""
    import asyncio
    import threading
    import time

    from icbdcache.replication.client import MasterClient
    from icbdcache.replication.replica import ReplicaConfig, _Fetched
    from icbdcache.replication.signing import Trust

    store = Store(tmp_path / "s")
    threads: list[str] = []
    real = store.write_batch

    def recorded(*a: Any, **kw: Any) -> int:
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(store, "write_batch", recorded)
    rng = random.Random(4)
    written: list[bytes] = []

    async def main() -> None:
        client = MasterClient("http://127.0.0.1:9")
        rep = Replica(store, client, ReplicaConfig(site="s1", subscribe=["lab"], once=True,
                                                   trust=Trust(insecure=True)))
        loop = asyncio.get_running_loop()
        try:
            for _ in range(2):
                busy = [loop.run_in_executor(None, time.sleep, 0.05) for _ in range(4)]
                items = []
                for _ in range(8):
                    c = rng.randbytes(3000)
                    written.append(digest(c))
                    items.append(_Fetched(chunks=[(digest(c), c)], bytes=len(c)))
                await asyncio.gather(*(rep._commit([it]) for it in items), *busy)
                await rep.drain()
        finally:
            await client.close()

    try:
        asyncio.run(main())
        assert len(threads) == 16
        assert len(set(threads[:8])) == 1 and len(set(threads[8:])) == 1
        assert all(t.startswith("icbd-replica-commit") for t in threads)
        assert len(written) == 16 and store.missing(written) == []
    finally:
        store.close()


def test_pull_commits_leave_the_page_cache(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica._write asks the store to drop each transaction's appended pages from the page
    cache (UNCACHED_COMMITS), with the digests it checked not computed again."""
    from icbdcache.replication.client import MasterClient
    from icbdcache.replication.signing import Trust

    store = Store(tmp_path / "s")
    calls: list[dict[str, Any]] = []
    real = store.write_batch

    def recorded(*a: Any, **kw: Any) -> int:
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(store, "write_batch", recorded)
    try:
        rep = Replica(store, MasterClient("http://127.0.0.1:9"),
                      replica_mod.ReplicaConfig(site="s1", trust=Trust(insecure=True)))
        c = random.Random(12).randbytes(5000)
        assert rep._write([(digest(c), memoryview(c))], {"replica_chunks": 1}) == 5000
        assert calls == [{"verified": True, "uncached": replica_mod.UNCACHED_COMMITS}]
        assert replica_mod.UNCACHED_COMMITS is True
        assert store.get_chunk(digest(c)) == c
    finally:
        store.close()
