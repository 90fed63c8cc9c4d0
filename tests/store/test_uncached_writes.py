"""Store.write_batch(uncached=True) (a replica's pull): once committed, the pages the
transaction appended to the store's file leave the page cache; a plain write leaves them
cached. Counted with ``fincore`` (bytes of the file resident in the page cache), not timed."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from icbdcache.store import Store
from icbdcache.store.chunks import digest

CHUNK = 65536
N = 128  # 8 MiB a transaction


def _resident(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _chunks(rng: random.Random) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(N):
        c = rng.randbytes(CHUNK)
        out.append((digest(c), c))
    return out


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_uncached_write_leaves_its_pages_out_of_the_page_cache(tmp_path: Path) -> None:
    if subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                      text=True).stdout.strip() in ("tmpfs", "ramfs"):
        pytest.skip("the page cache of tmpfs is the file itself")
    rng = random.Random(21)
    store = Store(tmp_path / "s")
    data = tmp_path / "s" / "data.mdb"
    try:
        plain, dropped = _chunks(rng), _chunks(rng)
        assert store.write_batch(plain, verified=True) == N * CHUNK
        cached = _resident(data)
        assert cached >= N * CHUNK  # a plain write stays cached
        size = os.path.getsize(data)
        assert store.write_batch(dropped, verified=True, uncached=True) == N * CHUNK
        grown = os.path.getsize(data) - size
        assert grown >= N * CHUNK
        # the second transaction's N chunks (and LMDB's pages appended with them) are gone
        # from the cache; what stays is what the first write left, and the B-tree pages
        assert _resident(data) < cached + grown // 4
        assert store.missing([k for k, _ in plain + dropped]) == []
        for k, v in dropped[:4]:
            assert store.get_chunk(k) == v  # read back from the disk
    finally:
        store.close()
