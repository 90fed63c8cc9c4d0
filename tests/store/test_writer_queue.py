"""The store writer's queue is bounded: a producer in its own thread waits for room, and the
event loop's side never waits (it asks ``over()``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from icbdcache.store import BatchWriter, Store, digest
from icbdcache.store.chunks import CHUNK_SIZE
from icbdcache.store.reader import MIN_QUEUE, StoreReader, queue_bound


@pytest.fixture
def slow_store(tmp_path: Path) -> Iterator[Store]:
    """A store whose every write transaction takes 20 ms longer (a slow disk)."""
    store = Store(tmp_path / "store")
    real = store.write_batch

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)
        return real(*args, **kwargs)

    store.write_batch = slow  # type: ignore[method-assign]
    yield store
    store.close()


def test_a_threaded_producer_waits_for_room(slow_store: Store) -> None:
    chunks = [os.urandom(CHUNK_SIZE) for _ in range(40)]
    writer = BatchWriter(slow_store, max_items=2, max_queued=4 * CHUNK_SIZE)
    for data in chunks:
        writer.put(digest(data), data)
        assert writer.queued_bytes <= 5 * CHUNK_SIZE
    writer.close()
    assert 4 * CHUNK_SIZE <= writer.queued_peak <= 5 * CHUNK_SIZE  # it filled, never beyond
    assert all(slow_store.get_chunk(digest(d)) == d for d in chunks)
    assert writer.errors == 0


def test_the_loop_side_never_blocks_and_sees_the_queue_full(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    gate = threading.Event()
    real = store.write_batch

    def stalled(*args: Any, **kwargs: Any) -> Any:
        gate.wait(30)
        return real(*args, **kwargs)

    store.write_batch = stalled  # type: ignore[method-assign]
    writer = BatchWriter(store, max_items=1, max_delay=0, max_queued=3 * CHUNK_SIZE)
    chunks = [os.urandom(CHUNK_SIZE) for _ in range(6)]
    t0 = time.monotonic()
    for data in chunks:  # the first goes into the stalled transaction, the rest queue up
        writer.put(digest(data), data, block=False)
    assert time.monotonic() - t0 < 5  # (a blocked put would wait for the 30 s gate)
    assert writer.over() and writer.queued_bytes >= 3 * CHUNK_SIZE
    assert all(writer.pending(digest(d)) == d for d in chunks)  # readable while queued
    gate.set()
    writer.close()
    assert writer.stopped and writer.queued_bytes == 0 and writer.errors == 0
    assert all(store.get_chunk(digest(d)) == d for d in chunks)
    store.close()


def test_a_writer_that_dies_stops_no_one(tmp_path: Path) -> None:
    """An unexpected error in the writer's thread: producers get a StoreError instead of
    waiting forever, callbacks waiting on a commit still run (fault leases are given back),
    and the loop's side sees the writer stopped (nothing more is queued)."""
    from icbdcache.store import StoreError

    store = Store(tmp_path / "store")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("injected")

    store.write_batch = broken  # type: ignore[method-assign]
    writer = BatchWriter(store, max_items=1, max_delay=0, max_queued=2 * CHUNK_SIZE)
    released: list[int] = []
    data = os.urandom(CHUNK_SIZE)
    writer.put(digest(data), data)
    writer.after_queued(lambda: released.append(1))
    deadline = time.monotonic() + 10
    while not writer.stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert writer.stopped and writer.over() and released == [1]
    with pytest.raises(StoreError, match="writer stopped"):
        for _ in range(4):  # would block forever on a full queue before
            writer.put(digest(data), data)
    writer.after_queued(lambda: released.append(2))  # after the end: called at once
    assert released == [1, 2]
    writer.put_updates([("lab@1", 0, digest(data))] * 1000)  # nothing commits them: dropped
    assert writer._updates == []
    store.close()


def test_commits_are_batched_while_callbacks_wait(tmp_path: Path) -> None:
    """A lease given back after each commit (``after_queued``) must not make the writer commit
    one chunk per transaction: it holds a batch open for ``after_delay``, and every callback
    still runs once its chunk is committed."""
    store = Store(tmp_path / "s")
    writer = BatchWriter(store, after_delay=0.5)
    done: list[int] = []
    chunks = [os.urandom(4096) for _ in range(40)]
    for i, c in enumerate(chunks):  # one fault's chunk every 2 ms, each with its lease
        writer.put(digest(c), c, block=False)
        writer.after_queued(lambda i=i: done.append(i))
        time.sleep(0.002)
    assert writer.flush()
    assert sorted(done) == list(range(40))
    assert writer.batches <= 3, writer.batches  # (one per chunk before: 40)
    assert all(store.has_chunk(digest(c)) for c in chunks)
    writer.close()
    store.close()


def test_a_servers_queue_is_as_large_as_its_hot_set(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    for hot, bound in ((1 << 30, 1 << 30), (0, MIN_QUEUE), (8 << 20, MIN_QUEUE)):
        reader = StoreReader(store, hot_bytes=hot)
        assert reader.writer.max_queued == bound == queue_bound(hot)
        reader.close()
    store.close()


def test_a_commit_waited_for_is_not_held_for_the_batching_delay(tmp_path: Path) -> None:
    """The first caller to wait for a commit comes while the writer fills a batch for its
    long ``max_delay``: the wait shortens to ``after_delay`` (a fault lease of another process
    waits on it), the batch is committed and the callback runs long before ``max_delay``."""
    store = Store(tmp_path / "s")
    writer = BatchWriter(store, max_delay=60.0, after_delay=0.01)
    c = os.urandom(4096)
    writer.put(digest(c), c, block=False)  # the writer now fills a batch for up to 60 s
    time.sleep(0.05)
    done = threading.Event()
    writer.after_queued(done.set)
    assert done.wait(20.0)  # (60 s without the shortened wait)
    assert store.has_chunk(digest(c)) and writer.batches == 1
    writer.close()
    store.close()


def test_a_failing_learned_count_does_not_stop_the_writer(tmp_path: Path) -> None:
    """The count of learned entries (``on_learned``) raising, whatever it raises, is logged
    and the writer goes on committing (an OverflowError from a tampered count stopped it)."""
    store = Store(tmp_path / "store")
    writer = BatchWriter(store, max_delay=0)
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise OverflowError("int too big to convert")

    writer.on_learned = broken
    first, second = os.urandom(CHUNK_SIZE), os.urandom(CHUNK_SIZE)
    writer.put(digest(first), first, [("lab@1", 0, digest(first))])
    assert writer.flush()
    writer.put(digest(second), second, [("lab@1", 1, digest(second))])
    assert writer.flush()
    assert calls == [1, 1] and not writer.stopped
    assert store.get_chunk(digest(second)) == second
    writer.close()
    store.close()
