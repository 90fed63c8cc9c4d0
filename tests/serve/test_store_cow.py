"""Per-client copy-on-write over a store version that is still being faulted from upstream:
writes whose partial blocks need bytes the store does not hold yet wait for them."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path
from typing import Any

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
        srv = server_factory("--store", str(store), "--store-cow",
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
