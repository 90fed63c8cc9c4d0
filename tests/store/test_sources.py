"""Tests of :mod:`icbdcache.sources`: snapshot files and NBD upstreams (a real nbdkit).

Every nbdkit is started as a process and stopped by its PID. Assertions count bytes, requests
and errors; none measures time (waits are bounded loops of short sleeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import free_port, make_image, require, wait_port

from icbdcache.sources import (
    Source,
    SourceDataError,
    SourceUnavailable,
    open_source,
)
from icbdcache.sources.nbd import NBDSource
from icbdcache.sources.snapshot import SnapshotSource

CHUNK = 64 * 1024
#: Not a multiple of the chunk size, so the last chunk is short.
SIZE = 8 * 1024 * 1024 + 3 * 4096 + 512


def chunk_range(index: int, size: int = SIZE) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` the way the read path asks for it."""
    offset = index * CHUNK
    return offset, min(CHUNK, size - offset)


def run(coro: Callable[[], Awaitable[None]], loop: str = "asyncio") -> None:
    """Run a test body on a fresh loop: plain asyncio, or uvloop (what the server uses)."""
    if loop == "uvloop":
        import uvloop  # a dependency of the project: never skipped

        uvloop.run(coro())
    else:
        asyncio.run(coro())  # type: ignore[arg-type]


@pytest.fixture
def img(tmp_path: Path) -> tuple[Path, bytes]:
    path = make_image(tmp_path / "disk.img", SIZE)
    return path, path.read_bytes()


# ---------------------------------------------------------------------------------- snapshot


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_snapshot_reads_exact_bytes(img: tuple[Path, bytes], loop: str) -> None:
    path, data = img
    nchunks = -(-SIZE // CHUNK)

    async def main() -> None:
        src = open_source(str(path), size=SIZE)
        assert isinstance(src, SnapshotSource)
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            off, n = chunk_range(i)
            async with sem:
                got = await src.read(off, n)
            assert got == data[off : off + n], f"chunk {i}"

        await asyncio.gather(*(one(i) for i in range(nchunks)))
        assert await src.read(5, 7) == data[5:12]
        assert await src.read(0, 0) == b""
        assert src.healthy
        assert src.stats.requests == nchunks + 1  # the empty read is not counted
        assert src.stats.bytes == SIZE + 7
        assert src.stats.errors == 0
        with pytest.raises(ValueError):
            await src.read(SIZE - 10, 11)
        await src.close()
        with pytest.raises(SourceUnavailable):
            await src.read(0, 10)

    run(main, loop)


def test_snapshot_missing_file_then_appears(tmp_path: Path) -> None:
    path = tmp_path / "snap" / "lab@7.raw"

    async def main() -> None:
        src = SnapshotSource(path, size=SIZE)
        for _ in range(2):
            with pytest.raises(SourceUnavailable):
                await src.read(0, CHUNK)
        assert not src.healthy
        assert src.stats.errors == 2
        path.parent.mkdir()
        make_image(path, SIZE)
        data = path.read_bytes()
        off, n = chunk_range(100)
        assert await src.read(off, n) == data[off : off + n]
        assert src.healthy
        assert src.stats.requests == 1 and src.stats.bytes == n
        # Gone again: the open descriptor still reads the old (immutable) file.
        path.unlink()
        assert await src.read(0, 100) == data[:100]
        await src.close()

    run(main)


def test_snapshot_truncated_then_complete(tmp_path: Path) -> None:
    path = make_image(tmp_path / "full.img", SIZE)
    data = path.read_bytes()
    part = tmp_path / "part.img"
    part.write_bytes(data[: SIZE // 2])

    async def main() -> None:
        src = SnapshotSource(part, size=SIZE)
        with pytest.raises(SourceUnavailable, match="truncated"):
            await src.read(0, CHUNK)
        os.replace(path, part)  # the copy is complete
        assert await src.read(SIZE - 512, 512) == data[-512:]
        await src.close()

    run(main)


def test_snapshot_short_read_after_open(tmp_path: Path) -> None:
    """Without an expected size the file's size is taken; if it shrinks later, a read past
    its new end is a short read: unavailable, and the file is opened again next time."""
    path = make_image(tmp_path / "img", SIZE)
    data = path.read_bytes()

    async def main() -> None:
        src = SnapshotSource(path)
        assert await src.read(0, 10) == data[:10]
        assert src.size == SIZE
        os.truncate(path, SIZE // 2)
        with pytest.raises(SourceUnavailable, match="truncated"):
            await src.read(SIZE - CHUNK, CHUNK)
        with pytest.raises(SourceUnavailable, match="truncated"):
            await src.read(0, 10)  # reopened: the file is now shorter than the version
        path.write_bytes(data)
        assert await src.read(SIZE - CHUNK, CHUNK) == data[-CHUNK:]
        await src.close()

    run(main)


def test_snapshot_longer_file_is_a_data_error(tmp_path: Path) -> None:
    path = make_image(tmp_path / "img", SIZE + 4096)

    async def main() -> None:
        src = SnapshotSource(path, size=SIZE)
        with pytest.raises(SourceDataError):
            await src.read(0, CHUNK)
        assert src.stats.errors == 1
        await src.close()

    run(main)


# ---------------------------------------------------------------------------------- specs


def test_open_source_specs(tmp_path: Path) -> None:
    s = open_source(str(tmp_path / "x.img"))
    assert isinstance(s, SnapshotSource) and s.name == str(tmp_path / "x.img")
    n = open_source("nbd://example.org/lab%407", size=SIZE, timeout=2.0, connections=2)
    assert isinstance(n, NBDSource)
    assert n.address == ("example.org", 10809) and n.export == "lab@7"
    assert n.size == SIZE and n.timeout == 2.0 and n.connections == 2
    assert n.name == "nbd://example.org/lab%407"
    n = open_source("nbd://[::1]:10900/")
    assert isinstance(n, NBDSource) and n.address == ("::1", 10900) and n.export == ""
    n = open_source("nbd+unix:///disk?socket=/run/up.sock")
    assert isinstance(n, NBDSource) and n.address == "/run/up.sock" and n.export == "disk"
    n = open_source("nbds://example.org/lab")  # TLS, the upstream checked by the system CAs
    assert isinstance(n, NBDSource) and n.ssl is not None and n.ssl.check_hostname
    for bad in ("", "http://host/x", "nbds://host/x?tls-certificates=/nonexistent",
                "nbds://host/x?tls=1", "nbd:///x", "nbd+unix:///x",
                "nbd+unix://host/x?socket=/s", "nbd://host:99999/x", "nbd://host/x?tls=1"):
        with pytest.raises(ValueError):
            open_source(bad)


# ---------------------------------------------------------------------------------- nbd


class Nbdkit:
    """An ``nbdkit -f -r ... file FILE`` process on a TCP port or a Unix socket."""

    def __init__(self, image: Path, *extra: str, port: int | None = None,
                 unix: Path | None = None, filters: tuple[str, ...] = ()) -> None:
        self.image = image
        self.extra = extra
        self.filters = filters
        self.unix = unix
        self.port = port if port is not None or unix is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.unix is not None:
            return f"nbd+unix:///?socket={self.unix}"
        return f"nbd://127.0.0.1:{self.port}/"

    def start(self) -> Nbdkit:
        cmd = ["nbdkit", "-f", "-r", "--exit-with-parent"]
        if self.unix is not None:
            cmd += ["-U", str(self.unix)]
        else:
            cmd += ["-p", str(self.port), "-i", "127.0.0.1"]
        cmd += [f"--filter={f}" for f in self.filters]
        cmd += ["file", str(self.image), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if self.unix is not None:
            for _ in range(400):  # the file exists from bind(), connections work from listen()
                if self.proc.poll() is not None:
                    break
                with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                    s.connect(str(self.unix))
                    break
                time.sleep(0.05)
        else:
            try:
                wait_port("127.0.0.1", int(self.port or 0))
            except TimeoutError:
                self.stop()
                raise
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"nbdkit did not start: {err}")
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(15)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., Nbdkit]]:
    """Start nbdkit on an image; every one started is killed at teardown."""
    require("nbdkit")
    started: list[Nbdkit] = []

    def factory(image: Path, *extra: str, **kw: object) -> Nbdkit:
        n = Nbdkit(image, *extra, **kw).start()  # type: ignore[arg-type]
        started.append(n)
        return n

    yield factory
    for n in started:
        n.stop()


async def read_until_ok(src: Source, off: int, n: int, tries: int = 400) -> tuple[bytes, int]:
    """Read until it works (bounded by ``tries``, 50 ms apart); (data, failures before)."""
    for failures in range(tries):
        try:
            return await src.read(off, n), failures
        except SourceUnavailable:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{src.name}: still unavailable after {tries} tries")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_nbd_random_chunks_concurrently(img: tuple[Path, bytes], nbdkit: Callable[..., Nbdkit],
                                        loop: str) -> None:
    path, data = img
    up = nbdkit(path)
    rng = random.Random(7)
    nchunks = -(-SIZE // CHUNK)
    picks = [rng.randrange(nchunks) for _ in range(199)] + [nchunks - 1]  # with the short one

    async def main() -> None:
        src = open_source(up.uri, size=SIZE, timeout=10.0, connections=4)
        assert isinstance(src, NBDSource)
        sem = asyncio.Semaphore(16)
        peak = 0

        async def one(i: int) -> int:
            nonlocal peak
            off, n = chunk_range(i)
            async with sem:
                got = await src.read(off, n)
                peak = max(peak, src.open_connections)
            assert got == data[off : off + n], f"chunk {i}"
            return n

        total = sum(await asyncio.gather(*(one(i) for i in picks)))
        assert src.stats.requests == 200
        assert src.stats.bytes == total
        assert src.stats.errors == 0
        assert 1 <= peak <= 4
        assert src.healthy
        await src.close()
        with pytest.raises(SourceUnavailable):
            await src.read(0, 1)
        assert not src.healthy

    run(main, loop)


def test_nbd_upstream_killed_then_restarted(img: tuple[Path, bytes],
                                            nbdkit: Callable[..., Nbdkit]) -> None:
    path, data = img
    up = nbdkit(path)

    async def main() -> None:
        src = open_source(up.uri, size=SIZE, timeout=2.0)
        assert await src.read(0, CHUNK) == data[:CHUNK]
        up.stop()
        with pytest.raises(SourceUnavailable):
            await src.read(CHUNK, CHUNK)
        with pytest.raises(SourceUnavailable):
            await src.read(CHUNK, CHUNK)
        assert src.stats.errors == 2
        up.start()  # same port
        off, n = chunk_range(7)
        got, _ = await read_until_ok(src, off, n)
        assert got == data[off : off + n]
        assert src.healthy
        assert src.stats.requests == 2
        assert src.stats.bytes == CHUNK + n
        await src.close()

    run(main)


def test_nbd_idle_connection_closed_by_upstream(img: tuple[Path, bytes],
                                                nbdkit: Callable[..., Nbdkit]) -> None:
    """An idle connection the upstream closes is dropped without a back-off: once the
    upstream is back, the next read reconnects and succeeds at the first try."""
    path, data = img
    up = nbdkit(path)

    async def main() -> None:
        src = NBDSource(("127.0.0.1", int(up.port or 0)), size=SIZE, backoff=(600.0, 600.0))
        assert await src.read(0, 10) == data[:10]
        up.stop()
        for _ in range(400):
            if src.open_connections == 0:
                break
            await asyncio.sleep(0.05)
        assert src.open_connections == 0
        assert src.healthy
        up.start()
        assert await src.read(CHUNK, 10) == data[CHUNK : CHUNK + 10]
        assert src.stats.errors == 0 and src.stats.requests == 2
        await src.close()

    run(main)


def test_nbd_fails_fast_while_backing_off(img: tuple[Path, bytes],
                                          nbdkit: Callable[..., Nbdkit]) -> None:
    """With a long back-off, reads after a failure raise at once and say why."""
    path, data = img
    up = nbdkit(path)

    async def main() -> None:
        src = NBDSource(("127.0.0.1", int(up.port or 0)), size=SIZE, timeout=5.0,
                        backoff=(600.0, 600.0))
        assert await src.read(0, 10) == data[:10]
        up.stop()
        with pytest.raises(SourceUnavailable):
            await src.read(0, 10)
        assert not src.healthy
        up.start()  # back, but the back-off is not over: no attempt is made
        for _ in range(5):
            with pytest.raises(SourceUnavailable, match="backing off"):
                await src.read(0, 10)
        assert src.stats.errors == 6
        assert src.open_connections == 0
        await src.close()

    run(main)


def test_nbd_slow_upstream_times_out(img: tuple[Path, bytes],
                                     nbdkit: Callable[..., Nbdkit]) -> None:
    path, _ = img
    up = nbdkit(path, "delay-read=10", filters=("delay",))

    async def main() -> None:
        src = open_source(up.uri, size=SIZE, timeout=1.0)
        with pytest.raises(SourceUnavailable):
            await src.read(0, CHUNK)
        assert src.stats.errors == 1 and src.stats.requests == 0
        await src.close()

    run(main)


def test_nbd_export_of_another_size(img: tuple[Path, bytes],
                                    nbdkit: Callable[..., Nbdkit]) -> None:
    path, _ = img
    up = nbdkit(path)

    async def main() -> None:
        src = open_source(up.uri, size=SIZE + 4096)
        with pytest.raises(SourceDataError, match="expected"):
            await src.read(0, CHUNK)
        await src.close()

    run(main)


def test_nbd_unix_socket_block_size_limits(tmp_path: Path,
                                           nbdkit: Callable[..., Nbdkit]) -> None:
    """An upstream that refuses requests over 16 KiB or not aligned to 4 KiB (EINVAL): reads
    are split and widened, and still return exactly the bytes asked for. (The image size is
    a multiple of the minimum block size, as proto.md asks of a server.)"""
    size = SIZE - SIZE % 4096
    path = make_image(tmp_path / "aligned.img", size)
    data = path.read_bytes()
    up = nbdkit(path, "blocksize-error-policy=error", "blocksize-minimum=4096",
                "blocksize-maximum=16384", unix=tmp_path / "up.sock",
                filters=("blocksize-policy",))

    async def main() -> None:
        src = open_source(up.uri, size=size)
        for off, n in [chunk_range(3, size), chunk_range(-(-size // CHUNK) - 1, size),
                       (4095, 2), (12345, 40000), (size - 100, 100)]:
            assert await src.read(off, n) == data[off : off + n], (off, n)
        assert src.stats.errors == 0 and src.stats.requests == 5
        await src.close()

    run(main)


def test_nbd_silent_upstream() -> None:
    """A server that accepts but never greets: the read gives up after its timeout, and a read
    waiting for the connection when the source is closed fails as unavailable (it is not
    cancelled)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(8)
            lsock.setblocking(False)
            port = int(lsock.getsockname()[1])
            accepted: list[socket.socket] = []

            src = NBDSource(("127.0.0.1", port), size=SIZE, timeout=1.0)
            with pytest.raises(SourceUnavailable):
                await src.read(0, CHUNK)
            accepted.append((await loop.sock_accept(lsock))[0])
            await src.close()

            src = NBDSource(("127.0.0.1", port), size=SIZE, timeout=30.0)
            reader = asyncio.create_task(src.read(0, CHUNK))
            accepted.append((await loop.sock_accept(lsock))[0])  # now in the handshake
            await src.close()
            with pytest.raises(SourceUnavailable):
                await reader
            assert src.stats.errors == 1
            for s in accepted:
                s.close()

    run(main)
