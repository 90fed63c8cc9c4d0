"""The store's record APIs used by the master, the replica and the embedded registry:
chunk lengths and held bytes in one read transaction, a caller's function over chunk buffers,
read-check-write of records in one write transaction, and LMDB's failures as StoreError."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from icbdcache.store import ChunkGet, RecordGet, RecordPut, Store, StoreError, digest


def _chunks(store: Store, *sizes: int) -> list[bytes]:
    """Store one chunk of each size (distinct bytes); their digests."""
    items = []
    for n, size in enumerate(sizes):
        data = bytes([n + 1]) * size
        items.append((digest(data), data))
    store.write_batch(items)
    return [d for d, _ in items]


def test_chunk_lengths_and_held_bytes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    try:
        a, b = _chunks(store, 65536, 1000)
        absent = digest(b"not stored")
        assert store.chunk_lengths([b, absent, a, b]) == [1000, None, 65536, 1000]
        assert store.chunk_lengths([]) == []
        # each distinct digest once; absent ones add nothing
        assert store.held_bytes([a, b, b, absent, a]) == 66536
        assert store.held_bytes(iter([absent])) == 0
    finally:
        store.close()


def test_with_chunks_hands_buffers_in_one_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    try:
        a, b = _chunks(store, 4096, 100)
        absent = digest(b"not stored")

        def copy(get: ChunkGet) -> list[bytes | None]:
            out: list[bytes | None] = []
            for d in (a, absent, b):
                buf = get(d)
                out.append(bytes(buf) if buf is not None else None)
            return out

        assert store.with_chunks(copy) == [b"\x01" * 4096, None, b"\x02" * 100]

        class Stop(Exception):
            pass

        def fail(get: ChunkGet) -> None:
            assert get(a) is not None
            raise Stop

        with pytest.raises(Stop):  # the caller's own exception, not a StoreError
            store.with_chunks(fail)
        # the read transaction was ended: a write goes through at once
        _chunks(store, 7)
    finally:
        store.close()


def test_update_records_reads_checks_and_writes_together(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    try:
        def create(get: RecordGet, put: RecordPut) -> str:
            assert get("k") is None
            put("k", b"1")
            assert get("k") == b"1"  # its own write is visible
            put("gone", b"x")
            put("gone", None)  # None deletes
            return "done"

        assert store.update_records(create) == "done"
        assert store.record("k") == b"1" and store.record("gone") is None

        def refuse(get: RecordGet, put: RecordPut) -> None:
            put("k", b"2")
            put("other", b"y")
            raise ValueError("checked and refused")

        with pytest.raises(ValueError, match="refused"):
            store.update_records(refuse)
        assert store.records("") == [("k", b"1")]  # nothing of the refused call written
        store.put_record("k", None)
        assert store.record("k") is None
    finally:
        store.close()


def test_update_records_is_atomic_across_threads(tmp_path: Path) -> None:
    """Counters incremented with get-then-put from 8 threads lose no increment."""
    store = Store(tmp_path / "s")
    try:
        def bump(get: RecordGet, put: RecordPut) -> None:
            raw = get("n")
            put("n", str(int(raw or b"0") + 1).encode())

        def work() -> None:
            for _ in range(25):
                store.update_records(bump)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.record("n") == b"200"
    finally:
        store.close()


def test_lmdb_failures_are_store_errors(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = Store(path)
    try:
        with pytest.raises(StoreError, match=str(path)):
            store.put_record("k" * 600, b"v")  # over LMDB's 511-byte key limit
        with pytest.raises(StoreError):
            store.update_records(lambda get, put: put("k" * 600, b"v"))
        with pytest.raises(StoreError):
            store.chunk_lengths([b""])  # LMDB refuses an empty key
        store.put_record("kept", b"1")
    finally:
        store.close()
    ro = Store(path, readonly=True)
    try:
        with pytest.raises(StoreError):
            ro.put_record("k", b"v")
        assert ro.record("kept") == b"1"
    finally:
        ro.close()
