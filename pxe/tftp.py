"""A small read-only TFTP server on asyncio, for PXE ROMs and PXELINUX.

Protocol: RFC 1350 read requests (RRQ) in ``octet`` and ``netascii`` mode, the option
extension (RFC 2347, OACK) with ``blksize`` (RFC 2348), ``timeout`` and ``tsize`` (RFC 2349).
Write requests are refused (the boot tree is read-only); unknown options (``windowsize``,
``multicast``, ...) are ignored, as RFC 2347 asks, so the client falls back to plain lock-step.

Notes on the design:

* :class:`ReadTransfer` is the protocol of one transfer with no sockets and no clock: it turns
  received packets and timer expiries into the next packet to send. :class:`TftpServer` binds
  it to asyncio: one datagram endpoint per transfer on a fresh port (the server's transfer id),
  each with its own retransmit timer, so a client that stops acknowledging costs one idle
  socket until its retries run out and never delays anyone else.
* The reply socket is bound to the address the request was sent to (``IP_PKTINFO``), so a
  multi-homed server answers from the address the client knows; PXE ROMs drop anything else.
* Duplicate ACKs are ignored, never answered (the Sorcerer's Apprentice bug of RFC 1350);
  a lost DATA is sent again only when the timer expires. Block numbers wrap 65535 -> 0, so
  files larger than 65535 blocks (32 MiB at 512 bytes) transfer with clients that wrap too.
* Names are resolved by the caller's opener (the boot tree), never against the file system:
  ``..``, NUL and empty names are refused here before the opener sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol, cast

from icbdcache.access import AllowList
from icbdcache.log import Throttled, kv

log = logging.getLogger("pxe.tftp")

#: RFC 1350's block size (bytes) when the client negotiates none.
DEFAULT_BLKSIZE = 512
#: RFC 2348 bounds of ``blksize`` (bytes): 65464 = 65535 - 20 (IP) - 8 (UDP) - 4 (TFTP) - 39.
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464
#: RFC 2349 bounds of ``timeout`` (seconds).
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255
#: netascii is converted in memory; larger files must be fetched in octet mode (bytes).
MAX_NETASCII = 16 << 20
#: Largest request datagram read (bytes); requests are small, a PXE ROM's is under 100.
MAX_REQUEST = 2048
#: Linux's IP_PKTINFO (typeshed lacks it): ask for the destination address of each datagram.
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)


class Op(IntEnum):
    """TFTP opcodes (RFC 1350, RFC 2347)."""

    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    """TFTP error codes (RFC 1350, 8 from RFC 2347)."""

    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class TftpError(Exception):
    """A request that is answered with an ERROR packet of ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Request:
    """A parsed RRQ or WRQ. Option names are lower-cased; values kept as sent."""

    op: Op
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------- wire format


def parse_request(data: bytes) -> Request:
    """Parse an RRQ/WRQ: ``opcode filename 0 mode 0 [option 0 value 0]...``.

    Raises TftpError(ILLEGAL_OPERATION) for anything else or a malformed request."""
    if len(data) < 4:
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "short packet")
    (opcode,) = struct.unpack_from("!H", data)
    if opcode not in (Op.RRQ, Op.WRQ):
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, f"unexpected opcode {opcode}")
    fields = data[2:].split(b"\0")
    if len(fields) < 3 or fields[-1] != b"":
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "malformed request")
    fields = fields[:-1]
    try:
        filename = fields[0].decode("utf-8")
        mode = fields[1].decode("ascii").lower()
        opts = [f.decode("ascii") for f in fields[2:]]
    except UnicodeDecodeError:
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "malformed request") from None
    options: dict[str, str] = {}
    for i in range(0, len(opts) - 1, 2):
        options.setdefault(opts[i].lower(), opts[i + 1])
    return Request(Op(opcode), filename, mode, options)


def encode_request(op: Op, filename: str, mode: str = "octet",
                   options: dict[str, str] | None = None) -> bytes:
    """An RRQ/WRQ packet (used by tests and clients)."""
    parts = [filename, mode]
    for k, v in (options or {}).items():
        parts += [k, v]
    return struct.pack("!H", op) + b"".join(p.encode() + b"\0" for p in parts)


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    return struct.pack("!HH", Op.DATA, block & 0xFFFF) + bytes(payload)


def encode_ack(block: int) -> bytes:
    return struct.pack("!HH", Op.ACK, block & 0xFFFF)


def encode_error(code: ErrorCode, message: str) -> bytes:
    return struct.pack("!HH", Op.ERROR, code) + message.encode("ascii", "replace") + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    return struct.pack("!H", Op.OACK) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items()
    )


def clean_path(name: str) -> str:
    """The boot-tree path a client asked for: leading ``/`` dropped, ``\\`` read as ``/``
    (some PXE stacks send DOS paths), ``.`` and empty components removed. Raises
    TftpError(ACCESS_VIOLATION) for ``..`` or NUL, TftpError(FILE_NOT_FOUND) for nothing."""
    if "\0" in name:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "bad file name")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "path outside the boot root")
    if not parts:
        raise TftpError(ErrorCode.FILE_NOT_FOUND, "no file name")
    return "/".join(parts)


# ------------------------------------------------------------------------------------- readers


class Reader(Protocol):
    """An open file of the boot tree: ``size`` bytes, read at any offset."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class BytesReader:
    """A Reader over bytes in memory (generated configs, converted netascii)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset : offset + length])

    def close(self) -> None:
        self._data.release()


class FileReader:
    """A Reader over a file on disk (``pread``, so concurrent transfers share nothing).

    Raises FileNotFoundError/PermissionError/IsADirectoryError as ``open`` does."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self._fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
        self._size = st.st_size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def to_netascii(data: bytes) -> bytes:
    """RFC 764 netascii: CR -> CR NUL, LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


# ------------------------------------------------------------------------ one transfer, sans-IO


class ReadTransfer:
    """The sending side of one RRQ, without I/O.

    ``start()`` gives the first packet (OACK when an option was accepted, else DATA 1);
    ``receive(packet)`` the next packet to send (or None); ``expire()`` the packet to send
    again when the retransmit timer (``timeout`` seconds) fires, or None once ``retries``
    retransmissions of one packet went unanswered. ``done`` is set when the last DATA is
    acknowledged or the client sent an ERROR; ``result`` says which.
    """

    def __init__(self, request: Request, reader: Reader, *, timeout: float = 1.0,
                 retries: int = 5, max_blksize: int = MAX_BLKSIZE) -> None:
        self.request = request
        self.reader = reader
        self.size = reader.size
        self.blksize = DEFAULT_BLKSIZE
        self.timeout = timeout
        self.retries = retries
        self.accepted: dict[str, str] = {}
        for name, value in request.options.items():
            if name == "blksize":
                n = _int(value)
                if n is not None and n >= MIN_BLKSIZE:
                    self.blksize = min(n, max_blksize, MAX_BLKSIZE)
                    self.accepted[name] = str(self.blksize)
            elif name == "timeout":
                n = _int(value)
                if n is not None and MIN_TIMEOUT <= n <= MAX_TIMEOUT:
                    self.timeout = float(n)
                    self.accepted[name] = str(n)
            elif name == "tsize":
                self.accepted[name] = str(self.size)
        #: blocks of the file: the last one is shorter than blksize (possibly empty)
        self.blocks = self.size // self.blksize + 1
        self.block = 0  # block of the last packet sent (0: the OACK)
        self.last: bytes = b""
        self.tries = 0
        self.retransmits = 0
        self.acked = 0  # file bytes the client acknowledged
        self.done = False
        self.result = "running"

    def start(self) -> bytes:
        if self.accepted:
            self.last = encode_oack(self.accepted)
        else:
            self.last = self._data(1)
        return self.last

    def _data(self, block: int) -> bytes:
        self.block = block
        self.tries = 0
        off = (block - 1) * self.blksize
        return encode_data(block, self.reader.read(off, min(self.blksize, self.size - off)))

    def receive(self, packet: bytes) -> bytes | None:
        if self.done or len(packet) < 4:
            return None
        op, num = struct.unpack_from("!HH", packet)
        if op == Op.ERROR:
            # e.g. a PXE ROM that only asked for tsize aborts with "option refused" (8)
            self.done = True
            self.result = "aborted" if num != ErrorCode.OPTION_REFUSED or self.block else "probe"
            return None
        if op != Op.ACK or num != self.block & 0xFFFF:
            return None  # a duplicate or stray ACK: the timer, not this, resends
        self.acked = min(self.size, self.block * self.blksize)
        if self.block >= self.blocks:
            self.done = True
            self.result = "ok"
            return None
        self.last = self._data(self.block + 1)
        return self.last

    def expire(self) -> bytes | None:
        if self.done:
            return None
        if self.tries >= self.retries:
            self.done = True
            self.result = "timeout"
            return None
        self.tries += 1
        self.retransmits += 1
        return self.last


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


# ------------------------------------------------------------------------------- asyncio server

Opener = Callable[[str], Awaitable[Reader]]


class _Transfer(asyncio.DatagramProtocol):
    """One transfer's socket and timer around a ReadTransfer."""

    def __init__(self, server: TftpServer, peer: tuple[str, int], xfer: ReadTransfer | None,
                 error: bytes | None) -> None:
        self.server = server
        self.peer = peer
        self.xfer = xfer
        self.error = error
        self.transport: asyncio.DatagramTransport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.t0 = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        transport = self.transport
        self.server.active[self.peer] = self
        if self.xfer is None:
            transport.sendto(self.error or b"", self.peer)
            self.finish()
            return
        transport.sendto(self.xfer.start(), self.peer)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        assert self.xfer is not None
        self.timer = asyncio.get_running_loop().call_later(self.xfer.timeout, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.xfer is None or self.transport is None:
            return
        pkt = self.xfer.expire()
        if pkt is None:
            self.finish()
            return
        self.transport.sendto(pkt, self.peer)
        self._arm()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is None or self.xfer is None:
            return
        if addr[:2] != self.peer[:2]:
            # RFC 1350: a packet from another transfer id gets an error, the transfer goes on
            self.transport.sendto(encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer id"),
                                  addr)
            return
        pkt = self.xfer.receive(data)
        if pkt is not None:
            self.transport.sendto(pkt, self.peer)
            self._arm()
        elif self.xfer.done:
            self.finish()

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: the client is gone; the timer ends the transfer if it stays so
        log.debug(kv(event="tftp_icmp", peer=_fmt(self.peer), error=exc))

    def finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()
        self.server._finished(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.xfer is not None:
            self.xfer.reader.close()


class _Listener:
    """The well-known port: reads requests with the address they were sent to."""

    def __init__(self, server: TftpServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.v6 = sock.family == socket.AF_INET6

    def readable(self) -> None:
        for _ in range(64):  # drain a burst, but let other callbacks run
            try:
                data, anc, _flags, addr = self.sock.recvmsg(MAX_REQUEST, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug(kv(event="tftp_recv_error", error=e))
                return
            self.server._request(data, addr, _local_address(anc, self.v6))


def _local_address(ancdata: list[tuple[int, int, bytes]], v6: bool) -> str | None:
    """The destination address of a request, from IP_PKTINFO / IPV6_PKTINFO."""
    for level, kind, data in ancdata:
        if not v6 and level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])  # in_pktinfo.ipi_addr
        if v6 and level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])  # in6_pktinfo.ipi6_addr
    return None


def _fmt(addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host = addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


class TftpServer:
    """Serve files from ``opener`` (path -> Reader; raises FileNotFoundError, PermissionError)
    on UDP ``host``:``port`` (port 0: any, see :attr:`port`).

    ``timeout`` is the retransmit interval in seconds unless a client negotiates its own;
    a packet is sent ``retries`` more times before the transfer is given up. ``max_blksize``
    caps the block size clients may ask for (bytes); ``max_transfers`` bounds the transfers
    in flight (requests beyond it get an error and are retried by the client). ``allow``:
    the client networks answered (others get an access violation, logged at most once a
    second); replace it to change it while serving.
    """

    def __init__(self, opener: Opener, host: str = "0.0.0.0", port: int = 69, *,
                 timeout: float = 1.0, retries: int = 5, max_blksize: int = MAX_BLKSIZE,
                 max_transfers: int = 256, allow: AllowList | None = None) -> None:
        self.opener = opener
        self.allow = allow or AllowList()
        self.refusals = Throttled(log, 1.0, logging.INFO)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.retries = retries
        self.max_blksize = max_blksize
        self.max_transfers = max_transfers
        self.active: dict[tuple[str, int], _Transfer | None] = {}
        self._requests: dict[tuple[str, int], bytes] = {}  # the request of each active peer
        self.sock: socket.socket | None = None
        self.stats = {"transfers": 0, "ok": 0, "failed": 0, "bytes": 0, "retransmits": 0,
                      "not_found": 0, "refused": 0}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind the well-known port and start answering. Raises OSError naming the port and
        protocol (in use: another TFTP server; EACCES: port 69 without root)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ipaddress.ip_address(self.host).version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # no SO_REUSEADDR: on UDP it lets a second server bind the same port and take
            # half of the requests
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            sock.bind((self.host, self.port))
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            where = f"TFTP port {self.port}/udp on {self.host}"
            if e.errno == errno.EADDRINUSE:
                raise OSError(e.errno, f"{where} is in use (another TFTP server: "
                                       "tftpd-hpa, dnsmasq, a second pxe serve?)") from None
            if e.errno == errno.EACCES:
                raise OSError(e.errno, f"{where}: permission denied (ports below 1024 need "
                                       "root or CAP_NET_BIND_SERVICE)") from None
            raise OSError(e.errno, f"{where}: {e.strerror or e}") from None
        self.sock = sock
        self.port = sock.getsockname()[1]
        listener = _Listener(self, sock)
        loop.add_reader(sock.fileno(), listener.readable)
        log.info(kv(event="tftp_listening", address=_fmt((self.host, self.port))))

    async def close(self) -> None:
        """Stop listening and abandon the transfers in flight."""
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for t in list(self.active.values()):
            if t is not None:
                t.finish()
        for task in list(self._tasks):
            task.cancel()
        self.active.clear()

    def _request(self, data: bytes, addr: tuple[str, int], local: str | None) -> None:
        key = (addr[0], addr[1])
        if key in self.active:
            current = self.active[key]
            if current is None or self._requests.get(key) == data:
                return  # the client repeated its request; the transfer's timer answers
            # A new request from the same port: the client gave up on the old transfer (a
            # tsize probe it aborted, a ROM that reuses its port). Replace it.
            current.finish()
        try:
            req = parse_request(data)
        except TftpError as e:
            if len(data) >= 2 and struct.unpack_from("!H", data)[0] in (Op.ACK, Op.ERROR):
                return  # a late packet of a finished transfer that reached the wrong port
            self._reply_error(addr, e.code, e.message)
            return
        if not self.allow.allows(addr[0]):
            self.stats["refused"] += 1
            self.refusals.warning(kv(event="refused", peer=_fmt(addr), file=req.filename,
                                     reason="not in --allow", allow=str(self.allow)))
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.sendto(encode_error(ErrorCode.ACCESS_VIOLATION,
                                                  "access denied"), addr)
            return
        if req.op == Op.WRQ:
            self._reply_error(addr, ErrorCode.ACCESS_VIOLATION, "read-only server")
            return
        if len(self.active) >= self.max_transfers:
            self._reply_error(addr, ErrorCode.NOT_DEFINED, "server busy, try again")
            return
        self.active[key] = None
        self._requests[key] = data
        task = asyncio.get_running_loop().create_task(self._start(req, addr, local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reply_error(self, addr: tuple[str, int], code: ErrorCode, message: str) -> None:
        log.info(kv(event="tftp_refused", peer=_fmt(addr), code=int(code), error=message))
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.sendto(encode_error(code, message), addr)

    async def _start(self, req: Request, addr: tuple[str, int], local: str | None) -> None:
        key = (addr[0], addr[1])
        xfer: ReadTransfer | None = None
        error: bytes | None = None
        try:
            path = clean_path(req.filename)
            if req.mode not in ("octet", "netascii"):
                raise TftpError(ErrorCode.ILLEGAL_OPERATION, f"mode {req.mode} not supported")
            reader = await self.opener(path)
            if req.mode == "netascii":
                reader = _netascii(reader)
            xfer = ReadTransfer(req, reader, timeout=self.timeout, retries=self.retries,
                                max_blksize=self.max_blksize)
        except TftpError as e:
            error = encode_error(e.code, e.message)
            log.info(kv(event="tftp_refused", peer=_fmt(addr), file=req.filename,
                        code=int(e.code), error=e.message))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            error = encode_error(ErrorCode.FILE_NOT_FOUND, "file not found")
            self.stats["not_found"] += 1
            # PXELINUX probes pxelinux.cfg/ for its MAC and IP before 'default': expected
            probe = req.filename.lstrip("/").startswith("pxelinux.cfg/")
            log.log(logging.DEBUG if probe else logging.INFO,
                    kv(event="tftp_not_found", peer=_fmt(addr), file=req.filename))
        except PermissionError:
            error = encode_error(ErrorCode.ACCESS_VIOLATION, "access denied")
            log.info(kv(event="tftp_refused", peer=_fmt(addr), file=req.filename,
                        code=int(ErrorCode.ACCESS_VIOLATION)))
        except OSError as e:
            error = encode_error(ErrorCode.NOT_DEFINED, "cannot read file")
            log.warning(kv(event="tftp_error", peer=_fmt(addr), file=req.filename, error=e))
        bind = local or self.host
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        try:
            loop = asyncio.get_running_loop()
            await loop.create_datagram_endpoint(
                lambda: _Transfer(self, key, xfer, error), local_addr=(bind, 0), family=family)
        except OSError as e:
            log.warning(kv(event="tftp_socket_error", peer=_fmt(addr), error=e))
            if xfer is not None:
                xfer.reader.close()
            self.active.pop(key, None)
            return

    def _finished(self, t: _Transfer) -> None:
        if self.active.get(t.peer) is t:
            self.active.pop(t.peer, None)
            self._requests.pop(t.peer, None)
        x = t.xfer
        if x is None:
            return
        self.stats["transfers"] += 1
        self.stats["retransmits"] += x.retransmits
        secs = time.monotonic() - t.t0
        if x.result == "ok":
            self.stats["ok"] += 1
            self.stats["bytes"] += x.size
            log.info(kv(event="tftp_sent", peer=_fmt(t.peer), file=x.request.filename,
                        bytes=x.size, blksize=x.blksize, seconds=f"{secs:.3f}",
                        retransmits=x.retransmits))
        elif x.result == "probe":
            log.debug(kv(event="tftp_probe", peer=_fmt(t.peer), file=x.request.filename))
        else:
            self.stats["failed"] += 1
            log.info(kv(event="tftp_failed", peer=_fmt(t.peer), file=x.request.filename,
                        result=x.result if x.result != "running" else "closed",
                        bytes=x.acked, of=x.size, blksize=x.blksize,
                        seconds=f"{secs:.3f}"))


def _netascii(reader: Reader) -> Reader:
    try:
        if reader.size > MAX_NETASCII:
            raise TftpError(ErrorCode.ILLEGAL_OPERATION,
                            "file too large for netascii, use octet mode")
        return BytesReader(to_netascii(reader.read(0, reader.size)))
    finally:
        reader.close()
