"""The event loop stands aside while the store's writer thread puts a batch (store/standaside.py):
the writer then takes the GIL back after each of py-lmdb's puts without waiting for the loop.
Counts, not times: the loop's turns while a batch is put."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from scrape import promtool_check, samples

from icbdcache import metrics
from icbdcache.loop import new_event_loop
from icbdcache.node import Node
from icbdcache.store import BatchWriter, Store, digest, standaside
from icbdcache.store.chunks import CHUNK_SIZE
from icbdcache.store.standaside import StandAside


class Ticker:
    """A loop kept busy: one callback per turn, counted (a server's loop under load)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.turns = 0
        self.running = True
        loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.turns += 1
        if self.running:
            self.loop.call_soon(self._tick)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    s.close()


def chunks(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(n):
        data = os.urandom(CHUNK_SIZE)
        out.append((digest(data), data))
    return out


def puts_watched(store: Store, aside: StandAside, ticker: Ticker) -> list[object]:
    """Have each batch's puts wait until the loop stands aside (at most 10 s), then record
    (whether it did, the ticker's turns before the puts, after them)."""
    seen: list[object] = []
    real = store._write

    def watched(*args: Any) -> int:
        deadline = time.monotonic() + 10
        while not aside.standing and time.monotonic() < deadline:
            time.sleep(0.001)
        seen.extend([aside.standing, ticker.turns])
        try:
            return real(*args)
        finally:
            seen.append(ticker.turns)

    store._write = watched  # type: ignore[method-assign,assignment]
    return seen


def write_in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """Run ``fn`` in a thread while ``loop`` runs; return once it has."""
    async def main() -> None:
        await asyncio.to_thread(fn)

    loop.run_until_complete(main())


def test_the_loop_runs_no_turn_while_a_batch_is_put(store: Store,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standaside, "MAX_STALL", 30.0)  # (a loaded machine's slow puts)
    loop = new_event_loop()
    try:
        ticker = Ticker(loop)
        aside = loop.run_until_complete(_installed(store))
        seen = puts_watched(store, aside, ticker)
        batch = chunks(16)
        write_in_thread(loop, lambda: store.write_batch(batch))
        standing, before, after = seen
        assert isinstance(after, int)
        assert standing is True  # the loop's thread waits ...
        assert after == before  # ... and runs nothing while the chunks are put
        assert ticker.turns > after  # then it goes on
        assert aside.stood == 1 and aside.timeouts == 0
        assert all(store.get_chunk(k) == v for k, v in batch)
        ticker.running = False
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()


def test_the_loop_runs_a_turn_between_slices_and_none_within(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standaside, "MAX_STALL", 30.0)
    monkeypatch.setattr(standaside, "PARK_WAIT", 30.0)
    loop = new_event_loop()
    try:
        ticker = Ticker(loop)
        aside = loop.run_until_complete(_installed(store))
        steps: list[tuple[bool, int]] = []  # (standing, turns) at each put
        real = standaside._Slices.step

        def step(self: Any) -> None:
            steps.append((aside.standing, ticker.turns))
            real(self)

        monkeypatch.setattr(standaside._Slices, "step", step)
        batch = chunks(100)  # 100 steps: slices of 32, 32, 32 and 4
        write_in_thread(loop, lambda: store.write_batch(batch))
        assert len(steps) == 100
        assert all(standing for standing, _ in steps)
        slices = [steps[i:i + standaside.SLICE_STEPS]
                  for i in range(0, 100, standaside.SLICE_STEPS)]
        for one in slices:  # no turn within a slice
            assert len({turns for _, turns in one}) == 1
        firsts = [one[0][1] for one in slices]
        assert firsts == sorted(set(firsts))  # a turn (at least) between slices
        assert aside.stood == 4 and aside.timeouts == 0 and aside.missed == 0
        assert all(store.get_chunk(k) == v for k, v in batch)
        ticker.running = False
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()


async def _installed(store: Store) -> StandAside:
    return store.stand_aside_for(asyncio.get_running_loop())


def test_a_batch_written_from_the_loop_thread_does_not_stop_it(store: Store) -> None:
    loop = new_event_loop()
    try:
        aside = loop.run_until_complete(_installed(store))

        async def write_here() -> None:
            store.write_batch(chunks(4))
            await asyncio.sleep(0)  # the stand-aside callback runs: the batch is done
            await asyncio.sleep(0)

        loop.run_until_complete(write_here())
        assert aside.asked == 1 and aside.stood == 0 and aside.timeouts == 0
        assert aside.missed == 0  # (it did not wait for a turn that cannot come)
        assert store.stand_aside_for(loop) is aside  # one per loop
    finally:
        loop.close()


def test_ticks_alone_do_not_stop_the_loop_and_chunks_do(store: Store) -> None:
    loop = new_event_loop()
    try:
        batch = chunks(2)
        store.write_batch(batch)
        keys = [k for k, _ in batch]
        aside = loop.run_until_complete(_installed(store))
        write_in_thread(loop, lambda: store.write_batch(touched=keys))
        loop.run_until_complete(asyncio.sleep(0))
        assert aside.asked == 0
        write_in_thread(loop, lambda: store.write_batch(chunks(2)))
        loop.run_until_complete(asyncio.sleep(0))
        assert aside.asked == 1
    finally:
        loop.close()


def test_the_loop_waits_at_most_max_stall(store: Store,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standaside, "MAX_STALL", 0.05)
    loop = new_event_loop()
    try:
        ticker = Ticker(loop)
        aside = loop.run_until_complete(_installed(store))
        resumed = threading.Event()

        def long_block() -> None:
            with aside():
                while not aside.standing:  # the loop stands aside ...
                    pass
                while aside.standing:  # ... and gives up after MAX_STALL
                    pass
                turns = ticker.turns
                while ticker.turns < turns + 10:  # it runs again, the block still open
                    pass
                resumed.set()

        write_in_thread(loop, long_block)
        assert resumed.is_set()
        assert aside.stood == 1 and aside.timeouts == 1
        ticker.running = False
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()


def test_a_closed_loop_is_not_waited_for(store: Store) -> None:
    loop = new_event_loop()
    aside = loop.run_until_complete(_installed(store))
    loop.close()
    batch = chunks(3)
    t = threading.Thread(target=lambda: store.write_batch(batch))
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert all(store.get_chunk(k) == v for k, v in batch)
    assert aside.asked == 1 and aside.stood == 0


def test_a_node_has_its_loop_stand_aside_when_a_commit_is_awaited(store: Store) -> None:
    loop = new_event_loop()
    try:
        node = Node(store, hot_bytes=8 << 20)

        async def run() -> None:
            await node.start()
            try:
                assert isinstance(store.stand_aside, StandAside)
                assert store.stand_aside.loop is asyncio.get_running_loop()
                aside = store.stand_aside
                writer = node.reader.writer
                data = os.urandom(CHUNK_SIZE)  # a fault alone: nobody waits for its commit
                assert node.reader.keep(digest(data), data, [])
                writer.after_queued(lambda: None, urgent=False)
                await asyncio.to_thread(writer.flush)
                assert store.get_chunk(digest(data)) == data
                assert aside.asked == 0  # the loop keeps the GIL first
                other = os.urandom(CHUNK_SIZE)  # a lease another process may wait on
                assert node.reader.keep(digest(other), other, [])
                writer.after_queued(lambda: None, urgent=True)
                await asyncio.to_thread(writer.flush)
                assert store.get_chunk(digest(other)) == other
                assert aside.asked == 1
                # /metrics reads the same counters (promtool checks the exposition)
                reg = metrics.new_registry(metrics.StoreWriterCollector(
                    writer, lambda: store.stand_aside))
                text = generate_latest(reg).decode()
                if shutil.which("promtool"):
                    promtool_check(text)
                got = samples(text)
                assert got["icbd_store_batches_total"] == writer.batches >= 2
                assert got["icbd_store_batch_errors_total"] == 0
                assert got["icbd_store_queued_bytes"] == 0
                assert got["icbd_store_stand_aside_batches_total"] == 1
                assert got["icbd_store_stand_aside_slices_total"] == aside.stood >= 1
                assert got["icbd_store_stand_aside_seconds_total"] == aside.stood_seconds > 0
                assert got["icbd_store_stand_aside_missed_total"] == aside.missed
            finally:
                await node.close()

        loop.run_until_complete(run())
    finally:
        loop.close()


@pytest.mark.parametrize(("queue_chunks", "urgent", "expected"), [
    (64, False, False),  # a fault alone, the queue near empty: the loop keeps the GIL first
    (64, True, True),  # another process may wait on the lease of a chunk in the batch
    (2, False, True),  # the queue half full: the writer must catch up
])
def test_the_writer_asks_only_when_its_batch_is_awaited(
        store: Store, queue_chunks: int, urgent: bool, expected: bool) -> None:
    asked: list[bool] = []
    real = store.write_batch

    def spy(*args: Any, **kwargs: Any) -> int:
        asked.append(kwargs["aside"])
        return real(*args, **kwargs)

    store.write_batch = spy  # type: ignore[method-assign]
    writer = BatchWriter(store, max_queued=queue_chunks * CHUNK_SIZE)
    try:
        (key, data), = chunks(1)
        writer.put(key, data)
        writer.after_queued(lambda: None, urgent=urgent)
        assert writer.flush()
        assert asked == [expected]
        assert store.get_chunk(key) == data
    finally:
        writer.close()
