"""A boot profile belongs to one creation of a version: a server whose clients still read a
version replaced since it opened it (``import --force --force-in-use``) must not save the old
image's profile under the new version's name, and a profile with indexes beyond its version
(kept by a store before this check) must not stop the hot-set fill of every iMI."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from icbdcache.layers.profile import BootProfile
from icbdcache.node import Node
from icbdcache.store import Store, VersionMeta
from icbdcache.store.chunks import digest

CHUNK = 65536


def _version(store: Store, imi: str, chunks: list[bytes]) -> VersionMeta:
    """Version ``imi@1`` of ``chunks`` (held, latest); returns it as stored."""
    keys = [digest(c) for c in chunks]
    store.write_batch(list(zip(keys, chunks, strict=True)), verified=True)
    store.put_version(VersionMeta(imi, "1", len(chunks) * CHUNK, CHUNK, []), b"".join(keys))
    store.set_latest(imi, "1")
    meta = store.version(f"{imi}@1")
    assert meta is not None
    return meta


def test_a_replaced_versions_profile_is_not_saved_over_the_new_one(tmp_path: Path) -> None:
    rng = random.Random(3)
    store = Store(tmp_path / "s")
    try:
        old = _version(store, "lab", [rng.randbytes(CHUNK) for _ in range(40)])
        profile = BootProfile(store, "lab@1", instance=old.instance)
        profile.client_started(time.monotonic())  # recording for 120 s
        profile.record(0, 0)
        profile.save()
        assert store.profile("lab@1") == [0]
        new = _version(store, "lab", [rng.randbytes(CHUNK) for _ in range(8)])  # replaced
        assert new.instance != old.instance
        store.put_profile("lab@1", [2, 1])  # the new image's first client
        profile.record(30, 30)  # a client of the old image reads on
        profile.save()
        assert store.profile("lab@1") == [2, 1]
        assert store.put_profile("lab@1", [3], new.instance) is True
        assert store.put_profile("lab@1", [4], old.instance) is False
        assert store.profile("lab@1") == [3]
    finally:
        store.close()


def test_indexes_beyond_the_version_are_dropped_and_the_fill_goes_on(tmp_path: Path) -> None:
    rng = random.Random(5)
    store = Store(tmp_path / "s")
    try:
        lab = [rng.randbytes(CHUNK) for _ in range(8)]
        other = [rng.randbytes(CHUNK) for _ in range(8)]
        _version(store, "lab", lab)
        _version(store, "other", other)
        store.put_profile("lab@1", [1, 4000, 2])  # 4000: an index of a larger image
        store.put_profile("other@1", [0, 3])
        assert store.profile("lab@1") == [1, 2]

        async def fill() -> int:
            node = Node(store, hot_bytes=64 * CHUNK)
            try:
                n = await node.fill_hot_set()
                assert all(digest(c) in node.reader.hot
                           for c in (lab[1], lab[2], other[0], other[3]))
                return n
            finally:
                await node.close()

        assert asyncio.run(fill()) == 4
    finally:
        store.close()


def test_a_hot_set_smaller_than_a_chunk_is_not_filled(tmp_path: Path) -> None:
    """A budget below one chunk (``--hot-size 100K --workers 2``: 50 KiB each) keeps nothing
    the fill copies: it copies nothing (it copied every profile's every chunk, each dropped
    at once: the counter of chunks copied said so)."""
    rng = random.Random(9)
    store = Store(tmp_path / "s")
    try:
        _version(store, "lab", [rng.randbytes(CHUNK) for _ in range(8)])
        store.put_profile("lab@1", list(range(8)))

        async def fill() -> int:
            node = Node(store, hot_bytes=50 << 10)
            try:
                return await node.fill_hot_set()
            finally:
                await node.close()

        assert asyncio.run(fill()) == 0
    finally:
        store.close()
