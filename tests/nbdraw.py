"""A raw NBD client for tests that must send what well-behaved clients never would.

Builds every message with :mod:`nbd.wire` and :mod:`nbd.constants`, not with the project's
client state machine, so the bytes on the wire are checked independently of it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

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
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
)

MiB = 1 << 20
#: Seconds a test waits for the server to close a connection.
CLOSE_WAIT = 5.0


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
