"""Adversarial requests against ``icbd-cache serve --store`` exports: a few bytes from one
client must not stall every other client, blow up memory, or lose replies.

Each test was a bug found by an adversarial review. The upstreams are real:
another ``icbd-cache serve`` of a sparse file, or nbdkit's pattern plugin (every byte data, so
no chunk is known to be zeros and every chunk must be fetched).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BIN, Server, free_port, require, wait_port
from nbdraw import ServerClosed, connect

from icbdcache.layers.version import MAX_SCAN
from icbdcache.store.chunks import CHUNK_SIZE
from nbd import aio, wire
from nbd.constants import BASE_ALLOCATION, REQUEST_MAGIC, Cmd

MiB = 1 << 20
GiB = 1 << 30
ServerFactory = Callable[..., Server]


def pattern(offset: int, length: int) -> bytes:
    """What ``nbdkit pattern`` serves at ``offset``: every 8-byte word holds its own offset,
    big-endian."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(first, offset + length, 8))
    return words[offset - first : offset - first + length]


def _rss_anon_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no RssAnon")


@pytest.fixture
def nbdkit_pattern() -> Iterator[Callable[..., str]]:
    """Start ``nbdkit pattern size=SIZE [--filter=delay rdelay=DELAY]``; its nbd:// URI."""
    require("nbdkit")
    procs: list[subprocess.Popen[bytes]] = []

    def start(size: str, rdelay: str | None = None) -> str:
        port = free_port()
        cmd = ["nbdkit", "-r", "-f", "--exit-with-parent", "-p", str(port), "-i", "127.0.0.1"]
        if rdelay is not None:
            cmd += ["--filter=delay"]
        cmd += ["pattern", f"size={size}"]
        if rdelay is not None:
            cmd += [f"rdelay={rdelay}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port("127.0.0.1", port)
        return f"nbd://127.0.0.1:{port}/"

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(15)


def test_pipelined_block_status_on_store_export_is_bounded(
        server_factory: ServerFactory, tmp_path: Path) -> None:
    """200 pipelined 4 GiB BLOCK_STATUS requests: each answer describes at most MAX_SCAN
    chunks (the spec lets a server describe less than asked), and another client is served."""
    big = tmp_path / "big.img"
    head = os.urandom(2 * MiB)
    with open(big, "wb") as f:
        f.write(head)
        f.truncate(64 * GiB)  # sparse: the store learns its zero chunks from block status
    up = server_factory("--export", f"big={big}")
    store = tmp_path / "store"
    store.mkdir()
    srv = server_factory("--store", str(store), "--create-store", "--export",
                         f"bigup={up.uri('big')}")

    async def run() -> list[list[tuple[int, int]]]:
        c = await aio.connect("127.0.0.1", srv.port, "bigup", meta_contexts=(BASE_ALLOCATION,))
        try:
            answers = await asyncio.gather(*(
                c.block_status(4 * MiB + i * 4096, 0xFFFF_F000) for i in range(200)))
            other = await aio.connect("127.0.0.1", srv.port, "bigup")
            assert await other.pread(0, 4096) == head[:4096]
            await other.close()
            return answers
        finally:
            await c.close()

    answers = asyncio.run(run())
    limit = MAX_SCAN * CHUNK_SIZE
    assert len(answers) == 200
    for extents in answers:
        described = sum(n for n, _ in extents)
        assert 0 < described <= limit, described


def test_cache_request_on_cold_store_is_bounded(
        server_factory: ServerFactory, nbdkit_pattern: Callable[..., str],
        tmp_path: Path) -> None:
    uri = nbdkit_pattern("64G")
    store = tmp_path / "store"
    store.mkdir()
    srv = server_factory("--store", str(store), "--create-store", "--export", f"pat={uri}")
    before = _rss_anon_mib(srv.proc.pid)
    with connect(srv.port, "pat") as c:
        assert c.simple(Cmd.CACHE, 0, 1 * GiB) == 0
        with connect(srv.port, "pat", timeout=60.0) as other:
            err, data = other.read(32 * GiB + 100, 4096)
        grown = _rss_anon_mib(srv.proc.pid) - before
    assert err == 0 and data == pattern(32 * GiB + 100, 4096)
    assert grown < 600, f"one CACHE request grew the server's anonymous memory by {grown} MiB"
    srv.stop()  # counters reach the store at shutdown
    stats = json.loads(subprocess.run(
        [str(BIN / "icbd-cache"), "stats", "--store", str(store), "--json"],
        capture_output=True, text=True, check=True).stdout)
    # one 1 GiB CACHE (16384 chunks) starts no more background fetches than the budget
    assert 0 < stats.get("prefetched", 0) <= 64, stats


def test_disc_answers_outstanding_cache_miss_read(
        server_factory: ServerFactory, nbdkit_pattern: Callable[..., str],
        tmp_path: Path) -> None:
    uri = nbdkit_pattern("1G", rdelay="500ms")
    store = tmp_path / "store"
    store.mkdir()
    srv = server_factory("--store", str(store), "--create-store", "--export", f"pat={uri}")
    with connect(srv.port, "pat") as c:
        cookie = c.request(Cmd.READ, 100 * MiB, 4096)  # a miss: the upstream takes 0.5 s
        c.send(wire.REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 999, 0, 0))
        try:
            err, data = c.reply(cookie)
        except ServerClosed as e:
            pytest.fail(f"the READ before NBD_CMD_DISC was never answered: {e}")
        assert err == 0 and data == pattern(100 * MiB, 4096)
