"""The asyncio adapter for the client side of NBD.

A thin binding of :class:`nbd.client.ClientConnection` to an asyncio transport::

    client = await nbd.aio.connect("10.0.0.1", 10809, "ubuntu-lab@7",
                                   meta_contexts=("base:allocation",))
    async with client:
        data = await client.pread(0, 4096)
        extents = await client.block_status(0, client.info.size)

:func:`connect` opens a TCP or Unix socket, negotiates (NBD_OPT_STARTTLS first when ``ssl`` is
given, then NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT and NBD_OPT_GO, falling back to
NBD_OPT_EXPORT_NAME on old servers) and returns an :class:`AsyncClient`. Any number of
coroutines may issue requests at once: each reply is matched to its request by cookie as it
arrives, so replies may come back in any order.

Errors: a request the server refuses raises :class:`nbd.errors.RequestError` and the
connection goes on; a refused option during the handshake raises
:class:`nbd.errors.NegotiationError`; a lost or closed connection raises
:class:`ConnectionError` (the cause, e.g. :class:`nbd.errors.RemoteProtocolError` for a server
that broke the protocol, is chained); asking for something the server did not advertise
(TRIM without NBD_FLAG_SEND_TRIM, ...) raises :class:`nbd.errors.LocalProtocolError` without
sending anything. Offsets and lengths are in bytes throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, cast

from nbd.client import ClientConnection, ClientEvent
from nbd.constants import Cmd, CmdFlag, TransmissionFlag
from nbd.errors import LocalProtocolError, NegotiationError, RemoteProtocolError, RequestError
from nbd.events import ExportInfo, ExportListed, Negotiated, OptionRefused, Reply, StartTLS

__all__ = ["DEFAULT_PORT", "AsyncClient", "connect", "list_exports"]

#: The IANA port of NBD (proto.md, 'Newstyle negotiation').
DEFAULT_PORT = 10809
_MAX_OFFSET = 1 << 64
_MAX_LENGTH = (1 << 32) - 1

Buffer = bytes | bytearray | memoryview


async def connect(
    host: str,
    port: int | None = None,
    export: str = "",
    *,
    unix: str | None = None,
    structured: bool = True,
    meta_contexts: Iterable[str] = (),
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float | None = None,
) -> AsyncClient:
    """Connect to an NBD server and open ``export`` ("" is the server's default export).

    ``host`` and ``port`` (default 10809) name a TCP server; with ``unix`` (a socket path)
    ``host`` is only the name checked against a TLS certificate. ``structured`` asks for
    structured replies; ``meta_contexts`` (e.g. ``("base:allocation",)``, needed by
    :meth:`AsyncClient.block_status`) are selected with NBD_OPT_SET_META_CONTEXT. With ``ssl``
    the session is upgraded to TLS (NBD_OPT_STARTTLS, then ``loop.start_tls``) before any
    other option, and a server that refuses TLS is an error. ``server_hostname`` overrides
    the name checked against the server's certificate (default ``host``). ``timeout``
    bounds connecting plus the handshake, in seconds (None: no limit); it does not apply
    to later requests.

    Raises :class:`NegotiationError` when the server refuses an option (unknown export,
    TLS required or refused, ...), :class:`ConnectionError`/:class:`OSError` when the
    connection fails or closes during the handshake, :class:`nbd.errors.RemoteProtocolError`
    when the server breaks the protocol, :class:`ssl.SSLError` when the TLS handshake fails and
    :class:`TimeoutError` after ``timeout``.
    """
    conn = ClientConnection(
        export, structured=structured, meta_contexts=tuple(meta_contexts), tls=ssl is not None
    )

    async def attempt() -> AsyncClient:
        channel = await _open(host, port, unix)
        try:
            result = await _handshake(channel, conn, ssl, server_hostname or host or None)
        except BaseException:
            channel.abort()
            raise
        assert isinstance(result, Negotiated)
        return AsyncClient(channel, conn, result)

    return await asyncio.wait_for(attempt(), timeout)


async def list_exports(
    host: str,
    port: int | None = None,
    *,
    unix: str | None = None,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float | None = None,
) -> list[tuple[str, str]]:
    """The (name, description) of every export the server lists (NBD_OPT_LIST).

    The session ends with NBD_OPT_ABORT. Arguments and errors are those of :func:`connect`;
    a server that does not support listing raises :class:`NegotiationError`.
    """
    conn = ClientConnection(list_exports=True, tls=ssl is not None)

    async def attempt() -> list[tuple[str, str]]:
        channel = await _open(host, port, unix)
        try:
            result = await _handshake(channel, conn, ssl, server_hostname or host or None)
            assert isinstance(result, ExportListed)
            # The state machine queued NBD_OPT_ABORT; wait briefly for the server's ACK (or its
            # close) so that it sees a soft disconnect rather than a dropped connection.
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(channel.read(), 1.0)
        finally:
            await channel.close()
        return list(result.exports)

    return await asyncio.wait_for(attempt(), timeout)


class _Channel(asyncio.Protocol):
    """One NBD connection's transport and protocol. During the handshake its bytes are read
    with :meth:`read`; in transmission each arrives at ``deliver`` (the client's parser),
    with no stream buffer between (two copies of every READ payload fewer than
    :class:`asyncio.StreamReader`). Writes go straight to the transport; :meth:`drain`
    waits while the transport is above its high-water mark."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.deliver: Callable[[bytes], None] | None = None
        self.lost: Callable[[BaseException], None] | None = None
        self._buffer = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.deliver is not None:
            self.deliver(data)
            return
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)
        if self.lost is not None:
            self.lost(exc if exc is not None
                      else ConnectionResetError("the NBD server closed the connection"))

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        w, self._writable = self._writable, None
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        r, self._readable = self._readable, None
        if r is not None and not r.done():
            r.set_result(None)

    @property
    def gone(self) -> bool:
        """True once the connection is lost or closed."""
        return self._closed.done()

    # the handshake's side
    async def read(self) -> bytes:
        """The bytes received since the last read (b"" at end of file). Raises the error
        that closed the connection, if any."""
        while not self._buffer and not self._eof:
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        if not self._buffer and self._error is not None:
            raise self._error
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def read_nowait(self) -> bytes:
        """What was received and not read yet (b"" if nothing)."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def write(self, buffers: Iterable[Buffer]) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.writelines(buffers)

    async def drain(self) -> None:
        """Wait until the transport takes more. Raises ConnectionResetError once closed.
        (Shielded: a caller cancelled while it waits must not cancel the other waiters.)"""
        if self._writable is not None:
            await asyncio.shield(self._writable)
        t = self.transport
        if t is None or t.is_closing():
            raise ConnectionResetError("the NBD connection is closed")

    async def start_tls(self, ssl: _ssl.SSLContext, server_hostname: str | None) -> None:
        """Upgrade to TLS (raises ssl.SSLError, OSError)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        t = await loop.start_tls(self.transport, self, ssl, server_hostname=server_hostname)
        if t is None:
            raise ConnectionResetError("the NBD connection closed during the TLS handshake")
        self.transport = t

    def get_extra_info(self, name: str) -> Any:
        """The transport's extra info (``sockname``, ``peername``, ``ssl_object``, ...)."""
        return None if self.transport is None else self.transport.get_extra_info(name)

    def abort(self) -> None:
        """Drop the connection at once (a hard disconnect)."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.abort()

    async def close(self) -> None:
        """Close and wait until the transport is gone (a TLS peer may not answer
        close_notify: the transport's own timeout then ends it)."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()
        if t is not None:
            await asyncio.shield(self._closed)


async def _open(host: str, port: int | None, unix: str | None) -> _Channel:
    loop = asyncio.get_running_loop()
    channel = _Channel()
    if unix is not None:
        await loop.create_unix_connection(lambda: channel, unix)
    else:
        # asyncio (and uvloop) set TCP_NODELAY on TCP sockets, as proto.md recommends.
        await loop.create_connection(lambda: channel, host, port or DEFAULT_PORT)
    return channel


async def _handshake(
    channel: _Channel,
    conn: ClientConnection,
    ssl: _ssl.SSLContext | None,
    server_hostname: str | None,
) -> Negotiated | ExportListed:
    """Run option haggling to its end: transmission (Negotiated) or the export list."""
    while True:
        data = await channel.read()
        if not data:
            raise ConnectionResetError("the NBD server closed the connection during the handshake")
        events: list[ClientEvent] = conn.receive_data(data)
        channel.write(conn.data_to_send())
        for ev in events:
            if isinstance(ev, StartTLS):
                assert ssl is not None
                await channel.drain()
                if channel.read_nowait():  # plaintext after the STARTTLS reply
                    raise RemoteProtocolError("bytes came in plaintext after the STARTTLS reply")
                await channel.start_tls(ssl, server_hostname)
                conn.tls_started()
                channel.write(conn.data_to_send())
            elif isinstance(ev, OptionRefused):
                raise NegotiationError(ev.option, ev.reply, ev.message)
            elif isinstance(ev, Negotiated | ExportListed):
                channel.write(conn.data_to_send())
                await channel.drain()
                return ev
        await channel.drain()


class AsyncClient:
    """An NBD connection in transmission (made by :func:`connect`).

    ``info`` describes the export (size and block sizes in bytes, transmission flags);
    ``structured`` says whether structured replies were negotiated and ``meta_contexts`` maps
    the server's context ids to the selected metadata context names.

    Requests may run concurrently from any number of tasks. Cancelling one is safe: its reply
    is dropped when it arrives and the connection goes on. To bound a request in time, wrap it
    in :func:`asyncio.wait_for`. Use ``async with`` or :meth:`close` to end the session.

    Requests made in one turn of the event loop leave in one write (sent at the end of the
    turn, :meth:`_send`): one system call, and one wake-up of the server, for all of them.
    Replies are parsed as they arrive, in the transport's callback.
    """

    def __init__(self, channel: _Channel, conn: ClientConnection,
                 negotiated: Negotiated) -> None:
        self.info: ExportInfo = negotiated.export
        self.structured: bool = negotiated.structured_replies
        self.meta_contexts: dict[int, str] = dict(negotiated.meta_contexts)
        self._channel = channel
        self._conn = conn
        self._waiters: dict[int, asyncio.Future[Reply]] = {}
        self._error: BaseException | None = None
        self._closing = False
        self._send_queued = False
        self._loop = asyncio.get_running_loop()
        leftover = channel.read_nowait()
        channel.deliver = self._received
        channel.lost = self._fail
        if channel.gone:  # lost between the handshake's end and now
            self._error = ConnectionResetError("the NBD server closed the connection")
        elif leftover:
            self._received(leftover)

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        """True once the connection is closed or lost; requests then raise ConnectionError."""
        return self._closing or self._error is not None

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiters)

    def get_extra_info(self, name: str) -> Any:
        """The transport's extra info (``sockname``, ``peername``, ...; None if unknown)."""
        return self._channel.get_extra_info(name)

    async def close(self) -> None:
        """End the session cleanly: wait for the requests in flight, send NBD_CMD_DISC, shut
        TLS down (if running) and close the socket. Safe to call more than once."""
        if self._closing:
            return
        self._closing = True
        if self._waiters and self._error is None:
            await asyncio.wait(list(self._waiters.values()))
        if self._error is None:
            self._conn.request(Cmd.DISC)
            self._send()
            with contextlib.suppress(OSError):
                await self._channel.drain()
        self._fail(ConnectionAbortedError("the NBD connection was closed"))
        with contextlib.suppress(Exception):  # a TLS peer may not answer close_notify
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _received(self, data: bytes) -> None:
        """Bytes from the server: hand each Reply to the future waiting on its cookie."""
        if self._error is not None:
            return
        try:
            events = self._conn.receive_data(data)
        except Exception as exc:  # RemoteProtocolError, ...
            self._fail(exc)
            return
        waiters = self._waiters
        for ev in events:
            if type(ev) is Reply:
                waiter = waiters.pop(ev.cookie, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev)

    def _fail(self, error: BaseException) -> None:
        """The connection is gone: fail every waiter; a broken connection is dropped."""
        if self._error is None:
            self._error = error
            if not self._closing:
                self._channel.abort()
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(self._lost())

    def _lost(self) -> ConnectionError:
        exc = ConnectionError(f"NBD connection lost: {self._error}")
        exc.__cause__ = self._error
        return exc

    def _send(self) -> None:
        """Write every request queued so far (called once at the end of a loop turn)."""
        self._send_queued = False
        out = self._conn.data_to_send()
        if out and self._error is None:
            self._channel.write(out)

    # ------------------------------------------------------------------- requests

    async def _request(
        self, command: Cmd, offset: int = 0, length: int = 0, flags: int = 0,
        data: Buffer = b"",
    ) -> Reply:
        if self._error is not None or self._closing:
            raise self._lost() if self._error else ConnectionError("the NBD client is closed")
        payload = memoryview(data).cast("B") if data else b""
        cookie = self._conn.request(command, offset, length, flags, payload)
        waiter: asyncio.Future[Reply] = self._loop.create_future()
        self._waiters[cookie] = waiter
        if payload:
            self._send()  # a WRITE's payload is handed to the transport at once
        elif not self._send_queued:
            self._send_queued = True
            self._loop.call_soon(self._send)
        try:
            try:
                await self._channel.drain()
            except OSError as exc:
                self._fail(exc)  # fails this waiter too
            reply = await waiter
        finally:
            self._waiters.pop(cookie, None)
        if reply.error:
            raise RequestError(reply.error, reply.message)
        return reply

    def _need(self, flag: TransmissionFlag, what: str) -> None:
        if not self.info.flags & flag:
            raise LocalProtocolError(f"the server did not advertise {what} for this export")

    async def pread(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (NBD_CMD_READ); ``length`` 0 reads nothing.

        ``length`` should not exceed ``info.max_block``. Raises RequestError (EINVAL past
        the end of the export or over the server's limits, EIO, ...), ConnectionError,
        ValueError for an offset or length that does not fit the wire format.
        """
        _check_range(offset, length)
        if not length:
            return b""
        return (await self._request(Cmd.READ, offset, length)).data

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (NBD_CMD_WRITE); with ``fua`` the server replies only
        once the data is on stable storage. Empty ``data`` writes nothing.

        Raises RequestError (EPERM on a read-only export, ENOSPC past the end, ...),
        ConnectionError, LocalProtocolError for ``fua`` without NBD_FLAG_SEND_FUA, ValueError.
        """
        view = memoryview(data).cast("B")
        _check_range(offset, view.nbytes)
        if not view.nbytes:
            return
        flags = self._fua(fua)
        await self._request(Cmd.WRITE, offset, view.nbytes, flags, view)

    async def flush(self) -> None:
        """Make every write already answered durable (NBD_CMD_FLUSH).

        Raises RequestError, ConnectionError, LocalProtocolError without NBD_FLAG_SEND_FLUSH.
        """
        self._need(TransmissionFlag.SEND_FLUSH, "NBD_FLAG_SEND_FLUSH")
        await self._request(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Tell the server ``length`` bytes at ``offset`` are no longer needed (NBD_CMD_TRIM);
        their contents are undefined afterwards.

        Raises RequestError (EPERM on a read-only export, EINVAL past the end),
        ConnectionError, LocalProtocolError without NBD_FLAG_SEND_TRIM, ValueError.
        """
        _check_range(offset, length, empty=False)
        self._need(TransmissionFlag.SEND_TRIM, "NBD_FLAG_SEND_TRIM")
        await self._request(Cmd.TRIM, offset, length, self._fua(fua))

    async def zero(
        self, offset: int, length: int, *, fua: bool = False, no_hole: bool = False,
        fast: bool = False,
    ) -> None:
        """Write ``length`` zero bytes at ``offset`` without sending them
        (NBD_CMD_WRITE_ZEROES). ``no_hole`` asks the server to keep the range allocated;
        ``fast`` asks it to fail with ENOTSUP unless zeroing is faster than writing.

        Raises RequestError (ENOTSUP for a slow ``fast`` zero, EPERM, ENOSPC, ...),
        ConnectionError, LocalProtocolError without NBD_FLAG_SEND_WRITE_ZEROES (or
        NBD_FLAG_SEND_FAST_ZERO for ``fast``), ValueError.
        """
        _check_range(offset, length, empty=False)
        self._need(TransmissionFlag.SEND_WRITE_ZEROES, "NBD_FLAG_SEND_WRITE_ZEROES")
        flags = self._fua(fua) | (CmdFlag.NO_HOLE if no_hole else 0)
        if fast:
            self._need(TransmissionFlag.SEND_FAST_ZERO, "NBD_FLAG_SEND_FAST_ZERO")
            flags |= CmdFlag.FAST_ZERO
        await self._request(Cmd.WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        """Ask the server to prefetch ``length`` bytes at ``offset`` (NBD_CMD_CACHE); a hint
        whose success guarantees nothing.

        Raises RequestError, ConnectionError, LocalProtocolError without
        NBD_FLAG_SEND_CACHE, ValueError.
        """
        _check_range(offset, length, empty=False)
        self._need(TransmissionFlag.SEND_CACHE, "NBD_FLAG_SEND_CACHE")
        await self._request(Cmd.CACHE, offset, length)

    async def block_status(
        self, offset: int, length: int, *, req_one: bool = False
    ) -> list[tuple[int, int]]:
        """The status of the range from ``offset``: consecutive (length in bytes, flags)
        extents of the first selected metadata context (for ``base:allocation``, flags
        bit 0 = hole, bit 1 = reads as zeros). The server may describe less than ``length``
        bytes (ask again from where it stopped) and its last extent may run past it; with
        ``req_one`` it sends one extent, no longer than ``length``.

        Raises RequestError (EINVAL past the end), ConnectionError, LocalProtocolError unless
        a metadata context was selected in :func:`connect`, ValueError.
        """
        _check_range(offset, length, empty=False)
        if not self.meta_contexts:
            raise LocalProtocolError(
                "no metadata context was selected (connect with meta_contexts=...)"
            )
        flags = CmdFlag.REQ_ONE if req_one else 0
        reply = await self._request(Cmd.BLOCK_STATUS, offset, length, flags)
        return list(reply.extents)

    def _fua(self, fua: bool) -> int:
        if not fua:
            return 0
        self._need(TransmissionFlag.SEND_FUA, "NBD_FLAG_SEND_FUA")
        return int(CmdFlag.FUA)


def _check_range(offset: int, length: int, *, empty: bool = True) -> None:
    """Offsets are 64-bit and lengths 32-bit on the wire."""
    if not 0 <= offset < _MAX_OFFSET or offset + length > _MAX_OFFSET:
        raise ValueError(f"offset {offset} (length {length}) does not fit in 64 bits")
    if not (0 if empty else 1) <= length <= _MAX_LENGTH:
        raise ValueError(f"length {length} is not in [{0 if empty else 1}, 2**32 - 1]")
