"""Tests of :mod:`nbd.aio`, the asyncio client adapter.

Against nbdkit (a real, independent server: file and memory plugins, TCP, Unix socket, TLS,
export lists), started and stopped by PID, and against an in-process asyncio server built on
:class:`nbd.server.ServerConnection` for what nbdkit cannot be made to do on cue: replies in
reverse order, held replies, a dropped connection, garbage on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import free_port, make_image, require, wait_port

from nbd import aio
from nbd.constants import BASE_ALLOCATION, Errno, Rep, TransmissionFlag
from nbd.errors import LocalProtocolError, NegotiationError, RemoteProtocolError, RequestError
from nbd.events import Disconnect, ExportInfo, Request
from nbd.server import Event, ServerConnection

MiB = 1 << 20
TF = TransmissionFlag
NO_FLAGS = TF(0)


# ----------------------------------------------------------------------------- nbdkit


class Nbdkit:
    """A foreground nbdkit process, stopped by PID."""

    def __init__(self, tmp: Path, *args: str, unix: bool = False) -> None:
        require("nbdkit")
        self.port = free_port()
        self.sock = str(tmp / f"nbdkit-{self.port}.sock") if unix else None
        where = ["-U", self.sock] if self.sock else ["-p", str(self.port), "-i", "127.0.0.1"]
        self.log = tmp / f"nbdkit-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", *where, *args], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            if self.sock:
                self._wait_socket()
            else:
                wait_port("127.0.0.1", self.port)
        except Exception:
            self.stop()
            raise RuntimeError(f"nbdkit did not start: {self.log.read_text()}") from None

    def _wait_socket(self) -> None:
        import time

        assert self.sock is not None
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(self.sock)
            time.sleep(0.05)

    async def connect(self, export: str = "", **kw: object) -> aio.AsyncClient:
        if self.sock:
            return await aio.connect("localhost", export=export, unix=self.sock, **kw)  # type: ignore[arg-type]
        return await aio.connect("127.0.0.1", self.port, export, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Callable[..., Nbdkit]]:
    """Start nbdkit with the given arguments; every one started is stopped at teardown."""
    started: list[Nbdkit] = []

    def start(*args: str, unix: bool = False) -> Nbdkit:
        srv = Nbdkit(tmp_path, *args, unix=unix)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """An 8 MiB image: random data, every fourth MiB a hole."""
    return make_image(tmp_path / "disk.img", 8 * MiB, seed=5)


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize("structured", [True, False])
def test_read_only_file_export(nbdkit: Callable[..., Nbdkit], disk: Path, structured: bool) -> None:
    srv = nbdkit("-r", "file", str(disk))
    image = disk.read_bytes()

    async def main() -> None:
        client = await srv.connect(structured=structured)
        async with client:
            assert client.info.size == len(image) == 8 * MiB
            assert client.info.flags & TF.READ_ONLY and client.structured is structured
            for off, n in [(0, 4096), (12345, 777), (3 * MiB - 100, 200), (8 * MiB - 1, 1),
                           (MiB - 5, 2 * MiB + 10)]:
                assert await client.pread(off, n) == image[off : off + n], (off, n)
            assert await client.pread(100, 0) == b""
            with pytest.raises(RequestError) as err:
                await client.pread(8 * MiB - 1, 2)
            assert err.value.error is Errno.EINVAL
            with pytest.raises(RequestError) as err:
                await client.pwrite(0, b"no")
            assert err.value.error is Errno.EPERM
            assert await client.pread(0, 3) == image[:3], "errors do not end the connection"
            with pytest.raises(LocalProtocolError):
                await client.trim(0, 4096)  # not advertised on a read-only export
            with pytest.raises(LocalProtocolError):
                await client.block_status(0, 4096)  # no metadata context selected
            with pytest.raises(ValueError):
                await client.pread(-1, 1)
            with pytest.raises(ValueError):
                await client.pread(0, 1 << 32)
        assert client.closed
        with pytest.raises(ConnectionError):
            await client.pread(0, 1)

    run(main())


def test_many_concurrent_reads_each_get_their_bytes(
    nbdkit: Callable[..., Nbdkit], disk: Path
) -> None:
    srv = nbdkit("-r", "file", str(disk))
    image = disk.read_bytes()

    async def main() -> None:
        async with await srv.connect() as client:
            spans = [((i * 7919 * 4096) % (8 * MiB - 65536), 512 + (i * 977) % 65000)
                     for i in range(200)]
            got = await asyncio.gather(*(client.pread(o, n) for o, n in spans))
            assert client.in_flight == 0
            for (o, n), data in zip(spans, got, strict=True):
                assert data == image[o : o + n]

    run(main())


def test_block_status_matches_the_files_holes(nbdkit: Callable[..., Nbdkit], disk: Path) -> None:
    srv = nbdkit("-r", "file", str(disk))
    # What the filesystem says: (start, end) of every data region.
    data_regions = []
    with open(disk, "rb") as f:
        pos = 0
        while pos < 8 * MiB:
            try:
                start = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            data_regions.append((start, end))
            pos = end

    def is_data(off: int) -> bool:
        return any(a <= off < b for a, b in data_regions)

    async def main() -> None:
        client = await srv.connect(meta_contexts=(BASE_ALLOCATION,))
        async with client:
            assert list(client.meta_contexts.values()) == [BASE_ALLOCATION]
            extents: list[tuple[int, int, int]] = []
            pos = 0
            while pos < client.info.size:
                got = await client.block_status(pos, client.info.size - pos)
                assert got and all(n > 0 for n, _ in got)
                for n, flags in got:
                    extents.append((pos, pos + n, flags))
                    pos += n
            assert pos >= client.info.size
            for off in range(0, 8 * MiB, 64 * 1024):
                (flags,) = [f for a, b, f in extents if a <= off < b]
                if is_data(off):
                    assert not flags & 1, off
                else:
                    assert flags & 3 == 3, off  # a hole reads as zeros
            if len(data_regions) > 1:  # the filesystem keeps holes: so must nbdkit's answer
                assert any(f & 1 for _, _, f in extents)
            (one,) = await client.block_status(MiB // 2, 4096, req_one=True)
            assert one[0] <= 4096

    run(main())


def test_writable_memory_export(nbdkit: Callable[..., Nbdkit]) -> None:
    srv = nbdkit("memory", "1M")

    async def main() -> None:
        async with await srv.connect(meta_contexts=(BASE_ALLOCATION,)) as client:
            assert not client.info.flags & TF.READ_ONLY
            blocks = {i: bytes([i]) * 4096 for i in range(1, 64)}
            await asyncio.gather(*(client.pwrite(i * 4096, b) for i, b in blocks.items()))
            got = await asyncio.gather(*(client.pread(i * 4096, 4096) for i in blocks))
            assert got == list(blocks.values())
            await client.pwrite(0, bytearray(b"fua!"), fua=True)
            await client.pwrite(4, memoryview(b"view"))
            await client.flush()
            assert await client.pread(0, 8) == b"fua!view"
            await client.zero(4096, 8192)
            await client.zero(3 * 4096, 4096, no_hole=True, fua=True)
            assert await client.pread(4096, 3 * 4096) == bytes(3 * 4096)
            try:
                await client.zero(5 * 4096, 4096, fast=True)
            except RequestError as exc:  # a server may always refuse fast zeroes
                assert exc.error is Errno.ENOTSUP
            await client.trim(MiB - 65536, 65536)
            await client.cache(0, 65536)
            with pytest.raises(RequestError) as err:
                await client.pwrite(MiB - 1, b"xy")
            assert err.value.error is Errno.ENOSPC
            with pytest.raises(RequestError) as err:
                await client.trim(MiB, 1)
            assert err.value.error is Errno.EINVAL
            (first, *_) = await client.block_status(0, MiB)
            assert first[0] > 0 and not first[1] & 1  # written data is allocated

    run(main())


def test_unix_socket(nbdkit: Callable[..., Nbdkit]) -> None:
    srv = nbdkit("memory", "64K", unix=True)

    async def main() -> None:
        async with await srv.connect() as client:
            assert client.info.size == 65536
            await client.pwrite(65530, b"sixby")
            assert await client.pread(65530, 6) == b"sixby\x00"

    run(main())


def test_list_exports_and_export_names(nbdkit: Callable[..., Nbdkit]) -> None:
    srv = nbdkit(
        "--filter=exportname", "memory", "1M", "exportname=lab@6", "exportname=lab@7",
        "exportname-list=explicit", "exportname-strict=true", "exportdesc=fixed:lab image",
    )

    async def main() -> None:
        assert await aio.list_exports("127.0.0.1", srv.port) == [
            ("lab@6", "lab image"), ("lab@7", "lab image"),
        ]
        async with await srv.connect("lab@7") as client:
            assert client.info.name == "lab@7" and client.info.description == "lab image"
        with pytest.raises(NegotiationError) as err:
            await srv.connect("lab@8")
        assert err.value.reply == Rep.ERR_UNKNOWN

    run(main())


def make_certs(tmp: Path) -> Path:
    """nbdkit's --tls-certificates directory, from a throwaway CA (trustme)."""
    import trustme  # a dev dependency, like pytest

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certs = tmp / "pki"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "ca-cert.pem"))
    for i, pem in enumerate(cert.cert_chain_pems):
        pem.write_to_path(str(certs / "server-cert.pem"), append=i > 0)
    cert.private_key_pem.write_to_path(str(certs / "server-key.pem"))
    (certs / "server-key.pem").chmod(0o600)
    return certs


def test_tls(nbdkit: Callable[..., Nbdkit], tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    srv = nbdkit("--tls=require", f"--tls-certificates={certs}", "memory", "1M")
    trusted = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))

    async def main() -> None:
        client = await aio.connect(
            "127.0.0.1", srv.port, ssl=trusted, server_hostname="localhost",
            meta_contexts=(BASE_ALLOCATION,),
        )
        async with client:
            # Negotiated after STARTTLS: structured replies and the context survived the reset.
            assert client.structured and list(client.meta_contexts.values()) == [BASE_ALLOCATION]
            await client.pwrite(0, b"over tls")
            assert await client.pread(0, 8) == b"over tls"
        assert await aio.list_exports(
            "127.0.0.1", srv.port, ssl=trusted, server_hostname="localhost"
        ) == [("", "")]
        with pytest.raises(NegotiationError) as err:
            await aio.connect("127.0.0.1", srv.port)
        assert err.value.reply == Rep.ERR_TLS_REQD
        with pytest.raises(ssl.SSLError):
            await aio.connect(
                "127.0.0.1", srv.port, ssl=ssl.create_default_context(),
                server_hostname="localhost",
            )

    run(main())


def test_tls_refused_by_a_server_without_tls(nbdkit: Callable[..., Nbdkit], tmp_path: Path) -> None:
    srv = nbdkit("memory", "1M")  # --tls=off by default

    async def main() -> None:
        with pytest.raises(NegotiationError) as err:
            await aio.connect("127.0.0.1", srv.port, ssl=ssl.create_default_context())
        assert err.value.reply in (Rep.ERR_POLICY, Rep.ERR_UNSUP)

    run(main())


def test_a_write_cancelled_while_the_transport_is_full_leaves_the_others_alone(
    nbdkit: Callable[..., Nbdkit],
) -> None:
    """Three 32 MiB writes to a slow server wait for the transport; one is cancelled: the
    other two still complete (they shared one wait for room), and the connection goes on."""
    srv = nbdkit("--filter=delay", "memory", "128M", "wdelay=300ms")

    async def main() -> None:
        async with await srv.connect() as client:
            blocks = [bytes([i + 1]) * (32 * MiB) for i in range(3)]
            tasks = [asyncio.create_task(client.pwrite(i * 32 * MiB, b))
                     for i, b in enumerate(blocks)]
            await asyncio.sleep(0.05)
            tasks[0].cancel()
            got = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(got[0], asyncio.CancelledError)
            assert got[1:] == [None, None]
            assert await client.pread(32 * MiB, 4096) == bytes([2]) * 4096
            assert await client.pread(64 * MiB + 5, 4096) == bytes([3]) * 4096

    run(main())


def test_plaintext_after_the_starttls_reply_is_refused(tmp_path: Path) -> None:
    """A server (or a man in the middle) that sends an option reply in plaintext right behind
    its STARTTLS ACK: those bytes must not be taken as if they came over TLS."""
    certs = make_certs(tmp_path)
    trusted = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs / "server-cert.pem", certs / "server-key.pem")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))  # fixed newstyle
        await reader.readexactly(4 + 16)  # client flags, the STARTTLS option
        forged = struct.pack(">QIII", 0x3E889045565A9, 7, 3, 10) + b"\x00\x02INJECTED"
        writer.write(struct.pack(">QIII", 0x3E889045565A9, 5, 1, 0) + forged)
        await writer.drain()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.start_tls(server_ctx)  # then TLS, as a real server goes on
            await reader.read(1 << 16)  # the client's next option, or its close
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(RemoteProtocolError, match="plaintext after the STARTTLS"):
                await aio.connect("127.0.0.1", port, "x", ssl=trusted,
                                  server_hostname="localhost", timeout=10)
        finally:
            server.close()

    run(main())


# -------------------------------------------------------------- in-process test server


class Catalog:
    def __init__(self, info: ExportInfo) -> None:
        self.info = info

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name in ("", self.info.name) else None

    def exports(self) -> list[tuple[str, str]]:
        return [(self.info.name, self.info.description)]


class LocalServer:
    """ServerConnection over asyncio with a bytearray export and replies on cue.

    Replies to the requests of one read go out in reverse order; with ``hold`` they wait for
    :meth:`release` (then also reversed). ``drop`` aborts the connection at the first request;
    ``garbage`` is sent instead of replies.
    """

    def __init__(self, size: int = MiB, flags: TransmissionFlag = NO_FLAGS) -> None:
        self.info = ExportInfo("mem", size, flags)
        self.data = bytearray(os.urandom(size))
        self.hold = False
        self.drop = False
        self.garbage: bytes | None = None
        self.held: list[tuple[ServerConnection, asyncio.StreamWriter, Request]] = []
        self.events: list[Event] = []

    def answer(self, conn: ServerConnection, ev: Request) -> None:
        a, b = ev.offset, ev.offset + ev.length
        if ev.command == 0:
            conn.reply_read(ev, [bytes(self.data[a:b])])
        else:
            if ev.command == 1:
                self.data[a:b] = ev.data
            conn.reply_ok(ev)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection(Catalog(self.info))
        writer.writelines(conn.data_to_send())
        try:
            while not conn.closed:
                events = conn.receive_data(await reader.read(65536))
                self.events += events
                reqs = [e for e in events if isinstance(e, Request)]
                if reqs and self.drop:
                    writer.transport.abort()
                    return
                if reqs and self.garbage is not None:
                    writer.write(self.garbage)
                elif self.hold:
                    self.held += [(conn, writer, r) for r in reqs]
                else:
                    for r in reversed(reqs):
                        self.answer(conn, r)
                writer.writelines(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, RemoteProtocolError):
            pass
        finally:
            writer.close()

    def release(self) -> None:
        held, self.held = self.held, []
        for conn, writer, req in reversed(held):
            self.answer(conn, req)
            writer.writelines(conn.data_to_send())

    async def wait_held(self, n: int) -> None:
        for _ in range(500):
            if len(self.held) >= n:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {len(self.held)} of {n} requests arrived")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            server.close()


def test_replies_in_any_order_reach_their_callers() -> None:
    srv = LocalServer()
    srv.hold = True

    async def main() -> None:
        async with srv.running() as port, await aio.connect("127.0.0.1", port) as client:
            spans = [(i * 10007, 1 + i * 37) for i in range(50)]
            tasks = [asyncio.create_task(client.pread(o, n)) for o, n in spans]
            await srv.wait_held(50)
            assert client.in_flight == 50
            srv.release()  # the last request is answered first
            got = await asyncio.gather(*tasks)
            assert got == [bytes(srv.data[o : o + n]) for o, n in spans]

    run(main())


def _segments_sent(client: aio.AsyncClient) -> int:
    """TCP segments the client's socket has sent (tcp_info's tcpi_segs_out, Linux 4.2+)."""
    sock = client.get_extra_info("socket")
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, 136)[0])


def test_requests_made_in_one_turn_of_the_loop_leave_in_one_segment() -> None:
    srv = LocalServer()
    srv.hold = True  # no reply, so no ACK from the client either: only requests leave

    async def main() -> None:
        async with srv.running() as port, await aio.connect("127.0.0.1", port) as client:
            before = _segments_sent(client)
            spans = [(i * 4096, 4096) for i in range(30)]
            tasks = [asyncio.create_task(client.pread(o, n)) for o, n in spans]
            await srv.wait_held(30)
            sent = _segments_sent(client) - before
            srv.release()
            assert await asyncio.gather(*tasks) == [bytes(srv.data[o : o + n])
                                                    for o, n in spans]
            assert 1 <= sent <= 2, f"30 requests of one loop turn left in {sent} segments"

    run(main())


def test_a_cancelled_request_is_dropped_and_the_connection_goes_on() -> None:
    srv = LocalServer()
    srv.hold = True

    async def main() -> None:
        async with srv.running() as port, await aio.connect("127.0.0.1", port) as client:
            late = asyncio.create_task(client.pread(0, 10))
            await srv.wait_held(1)
            late.cancel()
            with pytest.raises(asyncio.CancelledError):
                await late
            assert client.in_flight == 0
            srv.hold = False
            srv.release()  # the cancelled request's reply arrives, and is dropped
            assert await client.pread(10, 10) == bytes(srv.data[10:20])
            assert not client.closed

    run(main())


def test_close_waits_for_requests_in_flight_then_sends_disc() -> None:
    srv = LocalServer()
    srv.hold = True

    async def main() -> None:
        async with srv.running() as port:
            client = await aio.connect("127.0.0.1", port)
            read = asyncio.create_task(client.pread(100, 5))
            await srv.wait_held(1)
            closing = asyncio.create_task(client.close())
            await asyncio.sleep(0.1)
            assert not read.done() and not closing.done()
            assert not any(isinstance(e, Disconnect) for e in srv.events)
            srv.release()
            assert await read == bytes(srv.data[100:105])
            await closing
            for _ in range(100):
                if Disconnect(clean=True) in srv.events:
                    break
                await asyncio.sleep(0.01)
            assert Disconnect(clean=True) in srv.events
            await client.close()  # twice is fine

    run(main())


def test_a_dropped_connection_fails_requests_in_flight_and_later_ones() -> None:
    srv = LocalServer()
    srv.drop = True

    async def main() -> None:
        async with srv.running() as port:
            client = await aio.connect("127.0.0.1", port)
            with pytest.raises(ConnectionError):
                await client.pread(0, 1)
            assert client.closed
            with pytest.raises(ConnectionError):
                await client.pwrite(0, b"x")
            await client.close()

    run(main())


def test_garbage_from_the_server_is_a_lost_connection_caused_by_a_protocol_error() -> None:
    srv = LocalServer()
    srv.garbage = b"\xde\xad\xbe\xef" * 8

    async def main() -> None:
        async with srv.running() as port:
            client = await aio.connect("127.0.0.1", port)
            with pytest.raises(ConnectionError) as err:
                await client.pread(0, 1)
            assert isinstance(err.value.__cause__, RemoteProtocolError)
            await client.close()

    run(main())


def test_features_not_advertised_are_refused_without_sending() -> None:
    srv = LocalServer(flags=NO_FLAGS)

    async def main() -> None:
        async with srv.running() as port, await aio.connect("127.0.0.1", port) as client:
            assert not client.structured or client.info.flags & TF.SEND_DF
            for call in (
                client.flush(), client.trim(0, 1), client.zero(0, 1), client.cache(0, 1),
                client.pwrite(0, b"x", fua=True), client.block_status(0, 1),
            ):
                with pytest.raises(LocalProtocolError):
                    await call
            assert not any(isinstance(e, Request) for e in srv.events)
            await client.pwrite(0, b"plain write is fine")
            assert srv.data[:19] == b"plain write is fine"

    run(main())


def test_unknown_export_is_a_negotiation_error() -> None:
    srv = LocalServer()

    async def main() -> None:
        async with srv.running() as port:
            with pytest.raises(NegotiationError) as err:
                await aio.connect("127.0.0.1", port, "nope")
            assert (err.value.reply, "nope" in err.value.message) == (Rep.ERR_UNKNOWN, True)
            assert await aio.list_exports("127.0.0.1", port) == [("mem", "")]

    run(main())


def test_connect_timeout_and_early_close() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never greets
        writer.close()

    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def main() -> None:
        quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = quiet.sockets[0].getsockname()[1]
        with pytest.raises(TimeoutError):
            await aio.connect("127.0.0.1", port, timeout=0.3)
        quiet.close()
        closer = await asyncio.start_server(rude, "127.0.0.1", 0)
        with pytest.raises(ConnectionError):
            await aio.connect("127.0.0.1", closer.sockets[0].getsockname()[1], timeout=5)
        closer.close()
        with pytest.raises(OSError):
            await aio.connect("127.0.0.1", free_port(), timeout=5)

    run(main())
