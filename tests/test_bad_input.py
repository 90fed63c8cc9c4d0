"""Bad input against a running ``icbd-cache serve``: raw bytes over a socket.

Every test checks the answer the NBD spec (proto.md) asks for, and that the server goes on
serving: the same connection where the spec keeps it open, and always a second client that
reads correct bytes afterwards.

:class:`RawClient` speaks the protocol with nothing but ``nbd.wire`` structs and
``nbd.constants`` (not our client state machine), so it can send what a broken client would;
test_tls.py and test_shutdown.py use it too.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import Server, require, sha256_file

from nbd import wire
from nbd.constants import (
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC_OPT,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
)

MiB = 1 << 20
#: Size of the test export: big enough for a 64 MiB READ and a 40 MiB WRITE inside it.
EXPORT_SIZE = 80 * MiB
#: Bytes of random data at the start of the image (the rest is a sparse hole).
DATA_SIZE = 4 * MiB
#: How long a test waits for the server to close a socket (seconds).
CLOSE_WAIT = 5.0

ServerFactory = Callable[..., Server]


class ServerClosed(Exception):
    """The server closed the connection (EOF or reset) while a reply was expected."""


class RawClient:
    """A blocking NBD client built from wire structs, one step per method.

    Option replies and transmission replies are parsed as they come, without assuming what
    the server should have sent; assertions are left to the tests.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                 sock: socket.socket | None = None) -> None:
        self.sock = sock if sock is not None else socket.create_connection(
            (host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.structured = False
        self.cookie = 0
        self.size = 0
        self.tflags = 0
        #: cookie -> (offset, READ length or 0) of each request not answered yet
        self.pending: dict[int, tuple[int, int]] = {}
        self._chunks: dict[int, bytearray] = {}
        self._errors: dict[int, int] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ bytes

    def send(self, *parts: bytes | bytearray | memoryview) -> None:
        for p in parts:
            self.sock.sendall(p)

    def recv_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ServerClosed if the stream ends first."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except ConnectionResetError as e:
                raise ServerClosed(f"reset after {got} of {n} bytes") from e
            if k == 0:
                raise ServerClosed(f"EOF after {got} of {n} bytes")
            got += k
        return bytes(buf)

    # ------------------------------------------------------------- handshake

    def greeting(self) -> int:
        """Read the server greeting; return the handshake flags."""
        magic, opt_magic, hflags = wire.GREETING.unpack(self.recv_exact(wire.GREETING.size))
        assert magic == NBDMAGIC and opt_magic == IHAVEOPT
        assert hflags & HandshakeFlag.FIXED_NEWSTYLE
        return int(hflags)

    def handshake(self) -> None:
        """Greeting, then client flags (fixed newstyle, no zeroes)."""
        self.greeting()
        self.send(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        """One option reply: (option, reply type, data)."""
        magic, opt, rep, length = wire.OPTION_REPLY_HEADER.unpack(
            self.recv_exact(wire.OPTION_REPLY_HEADER.size))
        assert magic == REPLY_MAGIC_OPT, f"option reply magic {magic:#x}"
        return int(opt), int(rep), self.recv_exact(length)

    def option_final(self, opt: int) -> tuple[int, list[tuple[int, bytes]]]:
        """Replies to ``opt`` up to the final one (ACK or an error): (final type, the
        replies before it as (type, data))."""
        before: list[tuple[int, bytes]] = []
        while True:
            ropt, rep, data = self.option_reply()
            assert ropt == opt, f"reply for option {ropt}, expected {opt}"
            if rep == Rep.ACK or rep & (1 << 31):
                return rep, before
            before.append((rep, data))

    def ask(self, opt: int, data: bytes = b"") -> int:
        """Send an option, return its final reply type."""
        self.option(opt, data)
        return self.option_final(opt)[0]

    def structured_reply(self) -> int:
        rep = self.ask(Opt.STRUCTURED_REPLY)
        if rep == Rep.ACK:
            self.structured = True
        return rep

    @staticmethod
    def info_data(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
        """NBD_OPT_GO / NBD_OPT_INFO data."""
        return (wire.U32.pack(len(name)) + name + wire.U16.pack(len(infos))
                + b"".join(wire.U16.pack(i) for i in infos))

    def go(self, name: str | bytes) -> int:
        """NBD_OPT_GO; on ACK the client is in transmission. Returns the final reply type."""
        raw = name.encode() if isinstance(name, str) else name
        self.option(Opt.GO, self.info_data(raw, (Info.BLOCK_SIZE,)))
        rep, before = self.option_final(Opt.GO)
        for rtype, data in before:
            if rtype == Rep.INFO and wire.U16.unpack_from(data)[0] == Info.EXPORT:
                _, self.size, self.tflags = wire.INFO_EXPORT.unpack(data)
        return rep

    # ----------------------------------------------------------- transmission

    def request(self, cmd: int, offset: int, length: int, flags: int = 0,
                data: bytes = b"") -> int:
        """Send one request (no checks: anything a broken client would send); its cookie."""
        self.cookie += 1
        self.pending[self.cookie] = (offset, length if cmd == Cmd.READ else 0)
        self.send(wire.REQUEST.pack(REQUEST_MAGIC, flags, cmd, self.cookie, offset, length),
                  data)
        return self.cookie

    def burst(self, requests: list[tuple[int, int, int]]) -> list[int]:
        """(command, offset, length) requests sent back to back in one write; cookies."""
        out = bytearray()
        cookies = []
        for cmd, offset, length in requests:
            self.cookie += 1
            self.pending[self.cookie] = (offset, length if cmd == Cmd.READ else 0)
            out += wire.REQUEST.pack(REQUEST_MAGIC, 0, cmd, self.cookie, offset, length)
            cookies.append(self.cookie)
        self.send(out)
        return cookies

    def next_reply(self) -> tuple[int, int, bytes]:
        """The next complete reply, whichever request it answers (the server may answer out
        of order): (cookie, error, READ data)."""
        while True:
            (magic,) = wire.U32.unpack(self.recv_exact(4))
            if magic == SIMPLE_REPLY_MAGIC:
                _, error, cookie = wire.SIMPLE_REPLY.unpack(
                    wire.U32.pack(magic) + self.recv_exact(12))
                assert cookie in self.pending, f"reply for unknown cookie {cookie}"
                _, read_length = self.pending.pop(cookie)
                data = self.recv_exact(read_length) if read_length and not error else b""
                return cookie, int(error), data
            assert magic == STRUCTURED_REPLY_MAGIC, f"reply magic {magic:#x}"
            assert self.structured, "structured reply without NBD_OPT_STRUCTURED_REPLY"
            _, rflags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack(
                wire.U32.pack(magic) + self.recv_exact(wire.STRUCTURED_REPLY.size - 4))
            assert cookie in self.pending, f"chunk for unknown cookie {cookie}"
            offset, read_length = self.pending[cookie]
            buf = self._chunks.setdefault(cookie, bytearray(read_length))
            body = self.recv_exact(length)
            if rtype == ReplyType.OFFSET_DATA:
                (off,) = wire.OFFSET.unpack_from(body)
                rel = off - offset
                assert rel >= 0 and rel + length - 8 <= read_length
                buf[rel : rel + length - 8] = body[8:]
            elif rtype == ReplyType.OFFSET_HOLE:
                off, hlen = wire.OFFSET_HOLE.unpack(body)
                rel = off - offset
                assert rel >= 0 and rel + hlen <= read_length
                buf[rel : rel + hlen] = bytes(hlen)
            elif rtype & (1 << 15):
                error, mlen = wire.ERROR_PAYLOAD.unpack_from(body)
                assert error != 0 and mlen <= length - wire.ERROR_PAYLOAD.size
                self._errors[cookie] = int(error)
            else:
                assert rtype == ReplyType.NONE and length == 0, f"chunk type {rtype}"
            if rflags & ReplyFlag.DONE:
                del self.pending[cookie]
                data = bytes(self._chunks.pop(cookie))
                error = self._errors.pop(cookie, 0)
                return cookie, error, data if not error else b""

    def reply(self, cookie: int) -> tuple[int, bytes]:
        """The reply to ``cookie``, which must be the next one: (error, READ data)."""
        got, error, data = self.next_reply()
        assert got == cookie, f"reply for cookie {got}, expected {cookie}"
        return error, data

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        """One READ, waiting for its reply."""
        return self.reply(self.request(Cmd.READ, offset, length, flags))

    def simple(self, cmd: int, offset: int, length: int, flags: int = 0,
               data: bytes = b"") -> int:
        """One request that is not a READ; its error value."""
        return self.reply(self.request(cmd, offset, length, flags, data))[0]


def connect(port: int, export: str, *, structured: bool = False,
            timeout: float = 10.0) -> RawClient:
    """A RawClient in transmission on ``export``."""
    c = RawClient(port, timeout=timeout)
    c.handshake()
    if structured:
        assert c.structured_reply() == Rep.ACK
    rep = c.go(export)
    assert rep == Rep.ACK, f"NBD_OPT_GO answered {rep:#x}"
    return c


def closed_by_server(sock: socket.socket, timeout: float = CLOSE_WAIT) -> bool:
    """True if the server closes ``sock`` (EOF or reset) within ``timeout`` seconds; bytes
    already sent before the close (a greeting) are read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def still_open(sock: socket.socket, wait: float = 0.2) -> bool:
    """True if the server does not close ``sock`` within ``wait`` seconds (bytes it sends,
    such as a greeting not read yet, are read and dropped)."""
    return not closed_by_server(sock, wait)


def expected(image: Path, offset: int, length: int) -> bytes:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length).ljust(length, b"\0")


def check_serves(port: int, export: str, image: Path, *, structured: bool = False) -> None:
    """A new client reads correct bytes (one raw READ of 64 KiB at 1 MiB)."""
    with connect(port, export, structured=structured) as c:
        err, data = c.read(1 * MiB, 64 * 1024)
        assert err == 0
        assert data == expected(image, 1 * MiB, 64 * 1024)


def nbdcopy_matches(srv: Server, export: str, image: Path, tmp_path: Path) -> None:
    """nbdcopy the whole export to a file and compare checksums with the image."""
    require("nbdcopy")
    out = tmp_path / f"copy-{export}-{time.monotonic_ns()}.img"
    subprocess.run(["nbdcopy", srv.uri(export), str(out)], check=True, timeout=60,
                   capture_output=True)
    assert sha256_file(out) == sha256_file(image)
    out.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """An 80 MiB image: 4 MiB of random bytes, then a sparse hole."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(DATA_SIZE))
        f.truncate(EXPORT_SIZE)
    return path


@pytest.fixture
def srv(server_factory: ServerFactory, disk: Path) -> Server:
    """A server with a read-only export ``ro`` and a copy-on-write export ``rw`` of ``disk``."""
    return server_factory("--export", f"ro={disk}", "--export", f"rw={disk},cow")


# ------------------------------------------------------------------ handshake errors


@pytest.mark.parametrize(
    "stage", ["http-request", "unknown-client-flag", "option-magic", "request-magic"])
def test_garbage_closes_only_that_connection(srv: Server, disk: Path, stage: str) -> None:
    other = connect(srv.port, "ro")  # a client already in transmission
    with RawClient(srv.port) as c:
        if stage == "http-request":
            c.greeting()
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # "GET " as client flags
        elif stage == "unknown-client-flag":
            # Valid bits plus an unknown one, then a valid option: the server MUST drop the
            # connection (proto.md, 'Client flags'), not answer the option.
            c.greeting()
            flags = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES | (1 << 31)
            c.send(wire.CLIENT_FLAGS.pack(flags))
            c.option(Opt.GO, RawClient.info_data(b"ro"))
        elif stage == "option-magic":
            c.handshake()
            c.send(wire.OPTION_HEADER.pack(0x1122334455667788, Opt.GO, 0))
        else:
            c.handshake()
            assert c.go("ro") == Rep.ACK
            c.send(wire.REQUEST.pack(0xDEADBEEF, 0, Cmd.READ, 1, 0, 4096))
        assert closed_by_server(c.sock)
    with other:
        err, data = other.read(0, 4096)
        assert err == 0 and data == expected(disk, 0, 4096)
    check_serves(srv.port, "ro", disk)
    assert srv.proc.poll() is None


def test_unknown_option_with_payload_then_go(srv: Server, disk: Path) -> None:
    with RawClient(srv.port) as c:
        c.handshake()
        c.option(99, os.urandom(1000))
        opt, rep, _ = c.option_reply()
        assert (opt, rep) == (99, Rep.ERR_UNSUP)
        assert c.go("ro") == Rep.ACK
        assert c.size == EXPORT_SIZE
        err, data = c.read(0, 8192)
        assert err == 0 and data == expected(disk, 0, 8192)


def test_long_export_name_in_go_is_invalid_and_connection_lives(
        srv: Server, disk: Path) -> None:
    with RawClient(srv.port) as c:
        c.handshake()
        long_name = b"x" * 5000
        for opt in (Opt.INFO, Opt.GO):
            c.option(opt, RawClient.info_data(long_name))
            assert c.option_final(opt)[0] == Rep.ERR_INVALID
        assert c.go("ro") == Rep.ACK
        err, data = c.read(0, 4096)
        assert err == 0 and data == expected(disk, 0, 4096)


def test_long_export_name_in_export_name_disconnects(srv: Server, disk: Path) -> None:
    with RawClient(srv.port) as c:
        c.handshake()
        c.option(Opt.EXPORT_NAME, b"x" * 5000)
        assert closed_by_server(c.sock)
    check_serves(srv.port, "ro", disk)


# ------------------------------------------------------------- transmission errors


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_request_errors_keep_the_connection(srv: Server, disk: Path, structured: bool) -> None:
    size = EXPORT_SIZE

    def alive(c: RawClient) -> None:
        err, data = c.read(4096, 4096)
        assert err == 0 and data == expected(disk, 4096, 4096)

    with connect(srv.port, "ro", structured=structured) as c:
        assert c.size == size
        cases: list[tuple[str, Callable[[], int], Errno]] = [
            ("read past the end", lambda: c.read(size - 4096, 8192)[0], Errno.EINVAL),
            ("offset+length over 2^64", lambda: c.read(2**64 - 4096, 8192)[0], Errno.EINVAL),
            ("unknown command 42", lambda: c.simple(42, 0, 4096), Errno.EINVAL),
            ("unknown command flag", lambda: c.read(0, 4096, flags=1 << 14)[0], Errno.EINVAL),
            ("write to read-only", lambda: c.simple(Cmd.WRITE, 0, 4096, data=bytes(4096)),
             Errno.EPERM),
            ("64 MiB READ", lambda: c.read(0, 64 * MiB)[0], Errno.EINVAL),
        ]
        for what, do, want in cases:
            got = do()
            assert got == want, f"{what}: {got} instead of {want.name}"
            alive(c)

    with connect(srv.port, "rw", structured=structured) as c:
        err = c.simple(Cmd.WRITE, size - 4096, 8192, data=bytes(8192))
        assert err == Errno.ENOSPC
        alive(c)
        # Over the 32 MiB payload limit but under the 64 MiB drain limit: drained, refused.
        big = b"\xab" * (40 * MiB)
        assert c.simple(Cmd.WRITE, 0, len(big), data=big) == Errno.EINVAL
        err, data = c.read(0, 8192)
        assert err == 0 and data == expected(disk, 0, 8192)  # nothing of it was written
        assert c.simple(Cmd.WRITE, 0, 4096, data=b"\x5a" * 4096) == 0
        err, data = c.read(0, 8192)
        assert err == 0 and data == b"\x5a" * 4096 + expected(disk, 4096, 4096)

    check_serves(srv.port, "ro", disk, structured=structured)
    assert srv.proc.poll() is None


def test_pipelined_errors_each_answered(srv: Server, disk: Path) -> None:
    """Bad and good requests sent back to back in one packet each get their own reply."""
    with connect(srv.port, "ro") as c:
        # Past the end, good, unknown command: one write, three replies (the server may
        # answer the errors first).
        c.burst([(Cmd.READ, EXPORT_SIZE, 4096), (Cmd.READ, 0, 4096), (42, 0, 0)])
        replies = {cookie: (err, data) for cookie, err, data in
                   (c.next_reply() for _ in range(3))}
        assert replies == {1: (Errno.EINVAL, b""), 2: (0, expected(disk, 0, 4096)),
                           3: (Errno.EINVAL, b"")}
        err, data = c.read(8192, 4096)
        assert err == 0 and data == expected(disk, 8192, 4096)


# --------------------------------------------------------------- misbehaving clients


def test_client_gone_in_the_middle_of_a_read_reply(
        srv: Server, disk: Path, tmp_path: Path) -> None:
    lines_before = len(srv.log_text().splitlines())
    for i in range(5):
        c = connect(srv.port, "ro", structured=bool(i % 2))
        c.request(Cmd.READ, 0, 32 * MiB)
        c.recv_exact(8192)
        if i >= 3:  # the last ones leave with a reset instead of a FIN
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        c.close()
    time.sleep(0.5)
    assert srv.proc.poll() is None
    check_serves(srv.port, "ro", disk)
    nbdcopy_matches(srv, "ro", disk, tmp_path)
    new = srv.log_text().splitlines()[lines_before:]
    noisy = [ln for ln in new if re.search(r"WARNING|ERROR|Traceback|exception", ln)]
    assert not noisy, "\n".join(noisy[:20])
    assert len(new) < 30, "\n".join(new[:40])


def _open_idle(port: int, n: int, stack: ExitStack) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        stack.callback(s.close)
        socks.append(s)
    return socks


def test_idle_clients_do_not_block_a_real_one(srv: Server, disk: Path) -> None:
    require("nbdinfo")
    with ExitStack() as stack:
        idle = _open_idle(srv.port, 200, stack)
        out = subprocess.run(["nbdinfo", "--size", srv.uri("ro")], capture_output=True,
                             text=True, timeout=30, check=True)
        assert int(out.stdout) == EXPORT_SIZE
        check_serves(srv.port, "ro", disk)
        # The idle ones are all still there (default handshake timeout: 10 s).
        time.sleep(0.3)
        assert all(still_open(s, 0.01) for s in idle)


def test_handshake_timeout_closes_idle_clients(
        server_factory: ServerFactory, disk: Path) -> None:
    srv = server_factory("--export", f"ro={disk}", "--handshake-timeout", "2")
    with ExitStack() as stack:
        idle = _open_idle(srv.port, 200, stack)
        check_serves(srv.port, "ro", disk)  # within the 2 s: served
        # A client in transmission is not subject to the handshake timeout.
        working = stack.enter_context(connect(srv.port, "ro"))
        deadline = time.monotonic() + CLOSE_WAIT
        for s in idle:
            assert closed_by_server(s, max(0.1, deadline - time.monotonic())), \
                "idle client still open after the handshake timeout"
        err, data = working.read(0, 4096)
        assert err == 0 and data == expected(disk, 0, 4096)
    check_serves(srv.port, "ro", disk)


def test_max_connections(server_factory: ServerFactory, disk: Path) -> None:
    srv = server_factory("--export", f"ro={disk}", "--max-connections", "50",
                         "--handshake-timeout", "60")
    with ExitStack() as stack:
        first = [stack.enter_context(RawClient(srv.port)) for _ in range(50)]
        for c in first:
            c.greeting()  # accepted and counted
        extra = _open_idle(srv.port, 10, stack)
        for s in extra:
            assert closed_by_server(s, 2.0), "connection beyond --max-connections stayed open"
        time.sleep(0.3)
        assert all(still_open(c.sock, 0.01) for c in first)
        # The first 50 are served normally.
        c = first[0]
        c.send(wire.CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
        assert c.go("ro") == Rep.ACK
        err, data = c.read(0, 4096)
        assert err == 0 and data == expected(disk, 0, 4096)
        # Once one leaves, a new client takes its place.
        first[-1].close()
        time.sleep(0.3)
        check_serves(srv.port, "ro", disk)
