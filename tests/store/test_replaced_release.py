"""A version replaced in the store (``import --force --force-in-use``) while a server runs it:
the server keeps the old stack for the connections that read it, and lets it go with the last
of them. It kept every replaced stack (and, in the catalog, its export) for good: a worker grew
by about 4 MB a replacement of a 1 GiB version, never given back."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from icbdcache.exports import Catalog
from icbdcache.layers.base import Client, Layer
from icbdcache.node import Node
from icbdcache.store import Store, VersionMeta
from icbdcache.store.chunks import digest

CHUNK = 65536


def _version(store: Store, chunks: list[bytes]) -> VersionMeta:
    """``lab@1`` made (anew) of ``chunks``, held and latest."""
    keys = [digest(c) for c in chunks]
    store.write_batch(list(zip(keys, chunks, strict=True)), verified=True)
    store.put_version(VersionMeta("lab", "1", len(chunks) * CHUNK, CHUNK, []), b"".join(keys))
    store.set_latest("lab", "1")
    meta = store.version("lab@1")
    assert meta is not None
    return meta


async def _read(view: Layer, offset: int, length: int) -> bytes:
    got = view.pread(offset, length)
    bufs = await got if inspect.isawaitable(got) else got
    return b"".join(bytes(b) for b in bufs)


def _run(tmp_path: Path, body: Callable[[Store, Node, Catalog], Awaitable[None]]) -> None:
    """``body(store, node, catalog)`` in an event loop; all three closed after it."""
    store = Store(tmp_path / "s")

    async def run() -> None:
        node = Node(store, hot_bytes=64 * CHUNK)
        catalog = Catalog([], versions=node)
        try:
            await body(store, node, catalog)
        finally:
            catalog.close()
            await node.close()

    try:
        asyncio.run(run())
    finally:
        store.close()


def test_a_replaced_version_goes_with_its_last_connection(tmp_path: Path) -> None:
    rng = random.Random(11)
    old_chunks = [rng.randbytes(CHUNK) for _ in range(6)]
    new_chunks = [rng.randbytes(CHUNK) for _ in range(6)]

    async def body(store: Store, node: Node, catalog: Catalog) -> None:
        first = _version(store, old_chunks)
        found = catalog.resolve("lab@1", "10.0.0.1")
        assert found is not None
        old_export = found.export
        a, b = Client("10.0.0.1"), Client("10.0.0.2")
        va, vb = old_export.connect(a), old_export.connect(b)
        old_stack = node.versions["lab@1"]
        assert old_stack.connections == 2

        assert _version(store, new_chunks).instance != first.instance  # replaced
        again = catalog.resolve("lab@1", "10.0.0.3")
        assert again is not None and again.export is not old_export
        assert node.replaced == [old_stack] and catalog.all().count(old_export) == 1
        vc = again.export.connect(Client("10.0.0.3"))
        assert await _read(vc, CHUNK, CHUNK) == new_chunks[1]

        # the open connections read the old bytes on; the stack stays for them
        assert await _read(va, 2 * CHUNK, CHUNK) == old_chunks[2]
        old_export.disconnect(a, va)
        assert node.replaced == [old_stack] and old_export in catalog.all()
        assert await _read(vb, 5 * CHUNK, CHUNK) == old_chunks[5]
        old_export.disconnect(b, vb)  # the last: both go
        assert node.replaced == [] and old_export not in catalog.all()
        assert old_stack.on_unused is None and old_export.on_unused is None

        # replaced again with no connection to the current stack: it goes at once
        # (after the callbacks queued before it), and its export with it
        current = node.versions["lab@1"]
        again.export.disconnect(Client("10.0.0.3"), vc)
        _version(store, old_chunks)
        third = catalog.resolve("lab@1", "10.0.0.4")
        assert third is not None and node.replaced == [current]
        assert again.export not in catalog.all()
        await asyncio.sleep(0)
        assert node.replaced == []
        vd = third.export.connect(Client("10.0.0.4"))
        assert await _read(vd, 0, 2 * CHUNK) == b"".join(old_chunks[:2])
        third.export.disconnect(Client("10.0.0.4"), vd)
        assert node.versions["lab@1"].connections == 0  # the current one is kept

    _run(tmp_path, body)


def test_a_connection_made_before_the_release_runs_keeps_the_stack(tmp_path: Path) -> None:
    """The release of a replaced stack with no connection waits for the callbacks already
    queued: a connection that resolved it and attaches meanwhile keeps it."""
    rng = random.Random(12)

    async def body(store: Store, node: Node, _catalog: Catalog) -> None:
        chunks = [rng.randbytes(CHUNK) for _ in range(3)]
        _version(store, chunks)
        stack = node.resolve("lab@1")
        assert stack is not None
        _version(store, [rng.randbytes(CHUNK) for _ in range(3)])
        assert node.resolve("lab@1") is not stack
        stack.attach("10.0.0.9")  # before the queued release runs
        await asyncio.sleep(0)
        assert node.replaced == [stack]
        assert await _read(stack.top, 0, CHUNK) == chunks[0]
        stack.detach("10.0.0.9")
        assert node.replaced == []

    _run(tmp_path, body)


def test_a_released_stacks_sources_close_after_its_own_fetches(tmp_path: Path) -> None:
    """A client of the new version that reads a chunk of the same digest as one the old stack
    is fetching (a prefetch of NBD_CMD_CACHE) waits on that fetch. The old stack's sources
    closed with its last connection, under that fetch: the new client got EIO (a fresh
    helper's probe, 63 of 63 reads). They now close once the stack's own fetches ended."""
    rng = random.Random(13)
    a = [rng.randbytes(CHUNK) for _ in range(8)]
    b = [rng.randbytes(CHUNK), *a[1:]]  # the new image: chunk 0 differs
    for name, chunks in (("A.img", a), ("B.img", b)):
        (tmp_path / name).write_bytes(b"".join(chunks))

    async def body(store: Store, node: Node, catalog: Catalog) -> None:
        def version(img: str, chunks: list[bytes]) -> None:  # faulted from ``img``, none held
            store.put_version(VersionMeta("lab", "1", len(chunks) * CHUNK, CHUNK,
                                          [str(tmp_path / img)]),
                              b"".join(digest(c) for c in chunks))
            store.set_latest("lab", "1")

        version("A.img", a)
        old = catalog.resolve("lab@1", "10.0.0.1")
        assert old is not None
        old_client = Client("10.0.0.1")
        old_view = old.export.connect(old_client)
        old_stack = node.versions["lab@1"]
        version("B.img", b)
        new = catalog.resolve("lab@1", "10.0.0.2")
        assert new is not None and new.export is not old.export
        new_view = new.export.connect(Client("10.0.0.2"))

        # the old stack fetches chunks 3-7, held up until the release
        src = old_stack.fault.sources[0]
        fetch, gate = src.fetch, asyncio.Event()

        async def held_up(*args: Any, **kwargs: Any) -> bytes:
            await gate.wait()
            return await fetch(*args, **kwargs)

        src.fetch = held_up  # type: ignore[method-assign]
        old_view.cache(3 * CHUNK, 5 * CHUNK)
        await asyncio.sleep(0)
        assert old_stack.fault.fetching == 5
        reads = [asyncio.ensure_future(_read(new_view, i * CHUNK, CHUNK))
                 for i in range(1, 8)]
        await asyncio.sleep(0)  # the new client's reads of 3-7 join those fetches
        old.export.disconnect(old_client, old_view)  # its last connection: released
        assert node.replaced == []
        await asyncio.sleep(0.05)  # the release's closing of the sources starts
        gate.set()
        got = await asyncio.gather(*reads)
        assert got == b[1:8]
        assert node.stats.coalesced >= 5
        for _ in range(100):  # then its sources close
            if not node._closing:
                break
            await asyncio.sleep(0.01)
        assert not node._closing and old_stack.fault.fetching == 0
        assert await _read(new_view, 0, CHUNK) == b[0]
        new.export.disconnect(Client("10.0.0.2"), new_view)

    _run(tmp_path, body)


def _faulted(tmp_path: Path, store: Store, img: str, chunks: list[bytes],
             version: str = "1") -> None:
    """``lab@VERSION`` made (anew) of ``chunks``, none held, faulted from the file ``img``."""
    (tmp_path / img).write_bytes(b"".join(chunks))
    store.put_version(VersionMeta("lab", version, len(chunks) * CHUNK, CHUNK,
                                  [str(tmp_path / img)]),
                      b"".join(digest(c) for c in chunks))
    store.set_latest("lab", version)


def _failing(stack: Any) -> asyncio.Event:
    """Make the fetches of ``stack``'s source wait for the event returned, then fail."""
    gate = asyncio.Event()

    async def failing(*_args: Any, **_kwargs: Any) -> bytes:
        await gate.wait()
        raise OSError(5, "this upstream is gone")

    stack.fault.sources[0].fetch = failing
    return gate


def test_readers_that_saw_a_fetch_fail_fetch_once_beside_a_third_versions(
        tmp_path: Path) -> None:
    """Three versions share a chunk. Version 1's fetch fails; version 2's reader, which had
    joined it, fetches from its own (failing) source; version 3's three readers, which had
    joined it too, find version 2's fetch in flight: each fetched the chunk from version 3's
    source (a fresh helper's probe: 4 fetches a chunk for 1). Now one fetches and the other
    two join it."""
    rng = random.Random(16)
    chunk = rng.randbytes(CHUNK)

    async def body(store: Store, node: Node, _catalog: Catalog) -> None:
        views = {}
        for v in ("1", "2", "3"):
            _faulted(tmp_path, store, f"{v}.img", [rng.randbytes(CHUNK), chunk], version=v)
            stack = node.resolve(f"lab@{v}")
            assert stack is not None
            stack.attach("10.0.0.1")
            views[v] = stack
        gate1, gate2 = _failing(views["1"]), _failing(views["2"])
        src3 = views["3"].fault.sources[0]
        fetch3, gate3 = src3.fetch, asyncio.Event()

        async def held_up(*args: Any, **kwargs: Any) -> bytes:
            await gate3.wait()
            return await fetch3(*args, **kwargs)

        src3.fetch = held_up  # type: ignore[method-assign]
        one = asyncio.ensure_future(_read(views["1"].top, CHUNK, CHUNK))
        await asyncio.sleep(0)
        two = asyncio.ensure_future(_read(views["2"].top, CHUNK, CHUNK))
        threes = [asyncio.ensure_future(_read(views["3"].top, CHUNK, CHUNK))
                  for _ in range(3)]
        await asyncio.sleep(0)  # all joined version 1's fetch
        gate1.set()
        for _ in range(5):
            await asyncio.sleep(0)  # version 2 fetches anew; version 3's readers follow
        gate2.set()  # version 2's fetch fails while version 3's own is in flight
        for _ in range(5):
            await asyncio.sleep(0)
        # a reader of version 3 that saw nothing fail joins that fetch too (it fetched
        # anew once the shared slot was free: a fresh helper's probe)
        threes.append(asyncio.ensure_future(_read(views["3"].top, CHUNK, CHUNK)))
        await asyncio.sleep(0)
        gate3.set()
        got = await asyncio.wait_for(asyncio.gather(*threes), 5)
        assert got == [chunk] * 4
        for failed in (one, two):
            with pytest.raises(OSError):
                await failed
        assert node.stats.faults == 3 and node.stats.fault_errors == 2
        for stack in views.values():
            stack.detach("10.0.0.1")

    _run(tmp_path, body)


def test_a_read_that_joined_another_versions_failed_fetch_fetches_from_its_own(
        tmp_path: Path) -> None:
    """A client of the new version whose read joined the old version's fetch of the same
    digest got that fetch's error (EIO after the old upstream's deadline), though its own
    source holds the chunk (a fresh helper's probe). It now fetches from its own."""
    rng = random.Random(14)
    a = [rng.randbytes(CHUNK) for _ in range(4)]
    b = [rng.randbytes(CHUNK), *a[1:]]

    async def body(store: Store, node: Node, catalog: Catalog) -> None:
        _faulted(tmp_path, store, "A.img", a)
        old = catalog.resolve("lab@1", "10.0.0.1")
        assert old is not None
        old_view = old.export.connect(Client("10.0.0.1"))
        old_stack = node.versions["lab@1"]
        _faulted(tmp_path, store, "B.img", b)
        new = catalog.resolve("lab@1", "10.0.0.2")
        assert new is not None
        new_view = new.export.connect(Client("10.0.0.2"))
        src = old_stack.fault.sources[0]
        gate = asyncio.Event()

        async def failing(*_args: Any, **_kwargs: Any) -> bytes:
            await gate.wait()
            raise OSError(5, "the old upstream is gone")

        src.fetch = failing  # type: ignore[method-assign]
        old_view.cache(CHUNK, 3 * CHUNK)  # the old stack fetches chunks 1-3, and fails
        await asyncio.sleep(0)
        assert old_stack.fault.fetching == 3
        reads = [asyncio.ensure_future(_read(new_view, CHUNK, 3 * CHUNK)) for _ in range(3)]
        await asyncio.sleep(0)  # joined
        gate.set()
        got = await asyncio.wait_for(asyncio.gather(*reads), 5)
        assert got == [b"".join(b[1:4])] * 3
        # each chunk fetched once by the old stack (failed) and once from B for all three
        # readers (each of them fetched it: helper-40)
        assert node.stats.faults == 6 and node.stats.fault_errors == 3
        assert node.stats.coalesced == 9 + 6
        old.export.disconnect(Client("10.0.0.1"), old_view)
        new.export.disconnect(Client("10.0.0.2"), new_view)

    _run(tmp_path, body)


def test_a_stack_nobody_uses_is_retired_once_its_version_is_replaced(tmp_path: Path) -> None:
    """A worker whose clients of a version all left before it was replaced, and that no
    client asks for the name again, kept the old stack and its source file open for good (a
    fresh helper's probe: the image file still open 45 s later). The periodic look retires
    it."""
    rng = random.Random(15)

    async def body(store: Store, node: Node, catalog: Catalog) -> None:
        _faulted(tmp_path, store, "A.img", [rng.randbytes(CHUNK) for _ in range(2)])
        found = catalog.resolve("lab@1", "10.0.0.1")
        assert found is not None
        view = found.export.connect(Client("10.0.0.1"))
        await _read(view, 0, CHUNK)  # the source file is open now
        stack = node.versions["lab@1"]
        src = stack.fault.sources[0]
        found.export.disconnect(Client("10.0.0.1"), view)
        assert node.retire_replaced() == 0  # not replaced: kept
        _faulted(tmp_path, store, "B.img", [rng.randbytes(CHUNK) for _ in range(2)])
        stack.attach("10.0.0.5")
        assert node.retire_replaced() == 0  # replaced, but a connection uses it
        stack.detach("10.0.0.5")
        assert node.retire_replaced() == 1 and "lab@1" not in node.versions
        await asyncio.sleep(0)
        assert node.replaced == []
        for _ in range(100):
            if not node._closing:
                break
            await asyncio.sleep(0.01)
        assert src.closed

    _run(tmp_path, body)
