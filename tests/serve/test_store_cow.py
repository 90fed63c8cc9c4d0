"""Per-client copy-on-write over a store version that is still being faulted from upstream:
writes whose partial blocks need bytes the store does not hold yet wait for them."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, make_image, require, wait_port

from nbd import aio

MiB = 1 << 20


def test_cow_over_a_faulting_store_version(tmp_path: Path, server_factory: Any) -> None:
    require("nbdkit")
    img = make_image(tmp_path / "base.img", 16 * MiB)
    base = img.read_bytes()
    before = hashlib.sha256(base).hexdigest()
    port = free_port()
    up = subprocess.Popen(["nbdkit", "-r", "-f", "-p", str(port), "-i", "127.0.0.1",
                           "--filter=delay", "file", str(img), "rdelay=20ms"])
    try:
        wait_port("127.0.0.1", port)
        store = tmp_path / "store"
        srv = server_factory("--store", str(store), "--create-store", "--store-cow",
                             "--export", f"lab@1=nbd://127.0.0.1:{port}/")

        async def run() -> tuple[bytes, bytes, bytes]:
            c = await aio.connect("127.0.0.1", srv.port, "lab@1?boot=first")
            assert not c.info.flags & 2  # writable
            # unaligned writes into chunks nobody has read yet: copy-up must fault them in
            await asyncio.gather(c.pwrite(5 * MiB + 100, b"A" * 10),
                                 c.pwrite(9 * MiB - 3, b"B" * 7000),
                                 c.zero(12 * MiB + 1, 3 * 4096))
            mine = await c.pread(0, 16 * MiB)
            other = await aio.connect("127.0.0.1", srv.port, "lab@1?boot=second")
            theirs = await other.pread(0, 16 * MiB)
            again = await c.pread(5 * MiB, 4096)
            await other.close()
            await c.close()
            return mine, theirs, again

        mine, theirs, again = asyncio.run(run())
    finally:
        up.kill()
        up.wait(10)
    want = bytearray(base)
    want[5 * MiB + 100 : 5 * MiB + 110] = b"A" * 10
    want[9 * MiB - 3 : 9 * MiB - 3 + 7000] = b"B" * 7000
    want[12 * MiB + 1 : 12 * MiB + 1 + 3 * 4096] = bytes(3 * 4096)
    assert mine == bytes(want)
    assert again == bytes(want[5 * MiB : 5 * MiB + 4096])
    # same address, another boot id: a fresh overlay, the version's own bytes
    assert theirs == base
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


CHUNK = 64 * 1024


def test_cache_on_a_store_cow_export_faults_from_the_upstream(
        tmp_path: Path, server_factory: Any, upstream: Any) -> None:
    """NBD_CMD_CACHE from a real client (nbdsh) on a ``--store-cow`` export of a cold store
    goes through the client's overlay down to the fault layer: the upstream serves that range
    (counted in its log), before any READ, and a READ after it is served from the store."""
    nbdsh = "/usr/bin/nbdsh"
    require("nbdkit")
    if not Path(nbdsh).exists():
        pytest.skip("nbdsh is not installed (scripts/setup installs libnbd-bin)")
    img = make_image(tmp_path / "base.img", 8 * MiB)
    up = upstream(img)
    srv = server_factory("--store", str(tmp_path / "store"), "--create-store", "--store-cow",
                         "--readahead", "0",
                         "--export", f"lab@1={up.uri}")
    start, length = 2 * MiB, 4 * CHUNK  # chunks 32..35, data (MiB 3 is the hole)
    script = (f"assert h.can_cache()\n"
              f"h.cache({length}, {start})\n")
    # /usr/bin/python3 -I -m nbd: Debian's libnbd module, not this project's nbd package
    out = subprocess.run(["/usr/bin/python3", "-I", "-m", "nbd", "-u",
                          f"nbd://127.0.0.1:{srv.port}/lab@1", "-c", script],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(up.reads()) < 4:
        time.sleep(0.05)
    assert sorted(o for o, _ in up.reads()) == [start + i * CHUNK for i in range(4)]
    assert sum(c for _, c in up.reads()) == length

    async def read_back() -> bytes:
        c = await aio.connect("127.0.0.1", srv.port, "lab@1")
        try:
            return await c.pread(start, length)
        finally:
            await c.close()

    assert asyncio.run(read_back()) == img.read_bytes()[start : start + length]
    assert len(up.reads()) == 4  # the READ found the chunks CACHE brought in
