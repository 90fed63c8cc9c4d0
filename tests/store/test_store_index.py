"""index_image: the one pass over a raw image that import and publish share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from icbdcache.store import BatchWriter, Store
from icbdcache.store.chunks import CHUNK_SIZE, DIGEST_SIZE, ZERO, digest
from icbdcache.store.index import index_image


def test_map_and_queued_chunks(tmp_path: Path) -> None:
    data = os.urandom(CHUNK_SIZE) + bytes(CHUNK_SIZE) + os.urandom(1000)
    img = tmp_path / "img"
    img.write_bytes(data)
    store = Store(tmp_path / "store")
    writer = BatchWriter(store)
    seen: list[int] = []
    chunk_map = index_image(str(img), len(data), writer, progress=seen.append)
    writer.close()
    pieces = [data[:CHUNK_SIZE], data[CHUNK_SIZE : 2 * CHUNK_SIZE], data[2 * CHUNK_SIZE :]]
    assert bytes(chunk_map) == b"".join(digest(p) for p in pieces)
    assert chunk_map[DIGEST_SIZE : 2 * DIGEST_SIZE] == ZERO
    assert seen == [CHUNK_SIZE, CHUNK_SIZE, 1000]
    assert store.held == CHUNK_SIZE + 1000  # the zero chunk is not stored
    store.close()


def test_a_file_shorter_than_said_is_an_error(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(os.urandom(CHUNK_SIZE + 10))
    with pytest.raises(EOFError, match="ended at 65546 of 131072"):
        index_image(str(img), 2 * CHUNK_SIZE, None)
