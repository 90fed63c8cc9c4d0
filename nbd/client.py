"""Client side of an NBD connection as a sans-IO state machine.

Used by the upstream source (an icbd-cache fetching from another NBD server), by tests that
must speak the protocol byte by byte, and by the benchmark. Flow (NBD proto.md, 'Fixed newstyle
negotiation'): read the greeting, send client flags, optionally NBD_OPT_STARTTLS, then
NBD_OPT_STRUCTURED_REPLY, NBD_OPT_SET_META_CONTEXT and NBD_OPT_GO (or only NBD_OPT_LIST), and
in transmission queue requests with :meth:`ClientConnection.request` and collect
:class:`~nbd.events.Reply` events, which may arrive in any order.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from nbd import wire
from nbd.constants import (
    BASE_ALLOCATION,
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
    TransmissionFlag,
)
from nbd.errors import LocalProtocolError, RemoteProtocolError
from nbd.events import ExportInfo, ExportListed, Negotiated, OptionRefused, Reply, StartTLS

ClientEvent = Negotiated | ExportListed | OptionRefused | Reply | StartTLS


class ClientPhase(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    TLS_PENDING = "tls-pending"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(slots=True)
class _InFlight:
    command: Cmd
    offset: int
    length: int
    #: a READ's payload as its structured chunks arrive (made at the first chunk that is not
    #: the whole payload at once: see :meth:`ClientConnection._whole_read`)
    data: bytearray | None = None
    error: Errno = Errno.OK
    message: str = ""
    extents: list[tuple[int, int]] = field(default_factory=list)
    #: (start, end) within the request of each content chunk of a structured READ reply.
    covered: list[tuple[int, int]] = field(default_factory=list)


class ClientConnection:
    """One connection, client side.

    ``export`` is the export name to open; ``list_exports`` asks NBD_OPT_LIST and stops there.
    ``structured`` and ``meta_contexts`` say what to negotiate; ``tls`` sends NBD_OPT_STARTTLS
    first and yields :class:`StartTLS`, after which the caller upgrades the transport and calls
    :meth:`tls_started`.
    """

    def __init__(
        self,
        export: str = "",
        *,
        structured: bool = True,
        meta_contexts: tuple[str, ...] = (),
        list_exports: bool = False,
        tls: bool = False,
        no_zeroes: bool = True,
    ) -> None:
        self.export_name = export
        self.want_structured = structured
        self.want_meta = meta_contexts
        self.list_exports = list_exports
        self.want_tls = tls
        self.want_no_zeroes = no_zeroes
        self.phase = ClientPhase.GREETING
        self.structured = False
        self.no_zeroes = False
        self.export: ExportInfo | None = None
        self.meta_contexts: dict[int, str] = {}
        self._buf = bytearray()
        self._out: list[bytes | memoryview] = []
        self._steps: list[Opt] = []
        self._tried: set[Opt] = set()
        self._size: int | None = None
        self._tflags = 0
        self._name: str | None = None
        self._description = ""
        self._block = (1, 4096, wire.DEFAULT_MAX_PAYLOAD)
        self._listed: list[tuple[str, str]] = []
        self._cookie = 0
        self._inflight: dict[int, _InFlight] = {}

    # ------------------------------------------------------------------ helpers

    def data_to_send(self) -> list[bytes | memoryview]:
        """Take the queued output buffers."""
        out = self._out
        self._out = []
        return out

    def _send_option(self, opt: Opt, data: bytes = b"") -> None:
        self._out.append(wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data)
        self._steps.append(opt)

    def _next_option(self) -> None:
        """Send the next option of the plan, in the order the spec needs them."""
        if self.want_tls:
            self.want_tls = False
            self._send_option(Opt.STARTTLS)
            return
        if self.list_exports:
            self._send_option(Opt.LIST)
            return
        if self.want_structured and Opt.STRUCTURED_REPLY not in self._tried:
            self._tried.add(Opt.STRUCTURED_REPLY)
            self._send_option(Opt.STRUCTURED_REPLY)
            return
        if self.structured and self.want_meta and Opt.SET_META_CONTEXT not in self._tried:
            self._tried.add(Opt.SET_META_CONTEXT)
            name = self.export_name.encode()
            body = wire.U32.pack(len(name)) + name + wire.U32.pack(len(self.want_meta))
            for q in self.want_meta:
                raw = q.encode()
                body += wire.U32.pack(len(raw)) + raw
            self._send_option(Opt.SET_META_CONTEXT, body)
            return
        name = self.export_name.encode()
        wanted = (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE)
        body = wire.U32.pack(len(name)) + name + wire.U16.pack(len(wanted))
        body += b"".join(wire.U16.pack(i) for i in wanted)
        self._send_option(Opt.GO, body)

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[ClientEvent]:
        """Take bytes from the server; return the events they complete.

        Raises RemoteProtocolError on anything the spec does not allow a server to send.
        """
        if not data:
            if self.phase is not ClientPhase.CLOSED:
                self.phase = ClientPhase.CLOSED
                if self._inflight:
                    raise RemoteProtocolError("server closed with requests in flight")
            return []
        self._buf += data
        events: list[ClientEvent] = []
        try:
            while True:
                phase = self.phase
                if phase is ClientPhase.GREETING:
                    if not self._greeting():
                        break
                elif phase is ClientPhase.OPTIONS:
                    if not self._option_reply(events):
                        break
                elif phase is ClientPhase.TRANSMISSION:
                    if not self._reply(events):
                        break
                else:
                    break
        except RemoteProtocolError:
            self.phase = ClientPhase.CLOSED
            raise
        except (struct.error, ValueError) as exc:  # a field too short, a string not UTF-8
            self.phase = ClientPhase.CLOSED
            raise RemoteProtocolError(f"malformed message from the server: {exc}") from exc
        return events

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _greeting(self) -> bool:
        raw = self._take(wire.GREETING.size)
        if raw is None:
            return False
        magic, opt_magic, hflags = wire.GREETING.unpack(raw)
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise RemoteProtocolError("not a newstyle NBD server")
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("server does not do fixed newstyle")
        cflags = ClientFlag.C_FIXED_NEWSTYLE
        if self.want_no_zeroes and hflags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.C_NO_ZEROES
            self.no_zeroes = True
        self._out.append(wire.CLIENT_FLAGS.pack(cflags))
        self.phase = ClientPhase.OPTIONS
        self._next_option()
        return True

    def _option_reply(self, events: list[ClientEvent]) -> bool:
        opt = self._steps[0] if self._steps else None
        if opt is Opt.EXPORT_NAME:
            n = wire.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else wire.ZERO_PAD)
            raw = self._take(n)
            if raw is None:
                return False
            size, flags = wire.EXPORT_NAME_REPLY.unpack_from(raw)
            self._finish(ExportInfo(self.export_name, size, TransmissionFlag(flags)), events)
            return True
        if len(self._buf) < wire.OPTION_REPLY_HEADER.size:
            return False
        magic, ropt, rtype, length = wire.OPTION_REPLY_HEADER.unpack_from(self._buf)
        if len(self._buf) < wire.OPTION_REPLY_HEADER.size + length:
            return False
        del self._buf[: wire.OPTION_REPLY_HEADER.size]
        body = self._take(length) or b""
        if magic != REPLY_MAGIC_OPT or ropt != opt:
            raise RemoteProtocolError(f"unexpected option reply {magic:#x} for option {ropt}")
        rep = Rep(rtype) if rtype in Rep._value2member_map_ else rtype
        if rtype & (1 << 31):
            self._steps.pop(0)
            msg = body.decode(errors="replace")
            if opt is Opt.SET_META_CONTEXT:
                self.meta_contexts.clear()  # proto.md: disregard contexts sent before an error
            if opt is Opt.STRUCTURED_REPLY or opt is Opt.SET_META_CONTEXT:
                self._next_option()
            elif opt is Opt.GO and rtype == Rep.ERR_UNSUP:
                self._send_option(Opt.EXPORT_NAME, self.export_name.encode())
            else:
                events.append(OptionRefused(int(opt or 0), int(rep), msg))
                self.phase = ClientPhase.CLOSED
            return True
        if rtype == Rep.ACK:
            self._steps.pop(0)
            self._ack(opt, events)
        elif rtype == Rep.SERVER and opt is Opt.LIST:
            (nlen,) = wire.U32.unpack_from(body)
            self._listed.append((body[4 : 4 + nlen].decode(), body[4 + nlen :].decode()))
        elif rtype == Rep.META_CONTEXT and opt is Opt.SET_META_CONTEXT:
            (ctx_id,) = wire.U32.unpack_from(body)
            self.meta_contexts[ctx_id] = body[4:].decode()
        elif rtype == Rep.INFO and opt is Opt.GO:
            self._store_info(body)
        return True

    def _store_info(self, body: bytes) -> None:
        (itype,) = wire.U16.unpack_from(body)
        if itype == Info.EXPORT:
            _, self._size, self._tflags = wire.INFO_EXPORT.unpack(body)
        elif itype == Info.NAME:
            self._name = body[2:].decode()
        elif itype == Info.DESCRIPTION:
            self._description = body[2:].decode()
        elif itype == Info.BLOCK_SIZE:
            _, mn, pref, mx = wire.INFO_BLOCK_SIZE.unpack(body)
            self._block = (mn, pref, mx)

    def _ack(self, opt: Opt | None, events: list[ClientEvent]) -> None:
        if opt is Opt.STARTTLS:
            self.phase = ClientPhase.TLS_PENDING
            events.append(StartTLS())
        elif opt is Opt.LIST:
            events.append(ExportListed(tuple(self._listed)))
            self.phase = ClientPhase.CLOSED
            self._send_option(Opt.ABORT)
        elif opt is Opt.STRUCTURED_REPLY:
            self.structured = True
            self._next_option()
        elif opt is Opt.SET_META_CONTEXT:
            self._next_option()
        elif opt is Opt.GO:
            if self._size is None:
                raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            mn, pref, mx = self._block
            info = ExportInfo(
                self._name if self._name is not None else self.export_name,
                self._size, TransmissionFlag(self._tflags), self._description, mn, pref, mx,
            )
            self._finish(info, events)

    def tls_started(self) -> None:
        """The transport now speaks TLS: go on with option haggling."""
        if self.phase is not ClientPhase.TLS_PENDING:
            raise LocalProtocolError("tls_started() without STARTTLS")
        if self._buf:
            # proto.md, NBD_OPT_STARTTLS: after the ACK the server sends nothing more in
            # plaintext; such bytes would pass as if they had come over TLS (injection)
            self.phase = ClientPhase.CLOSED
            raise RemoteProtocolError(
                f"{len(self._buf)} bytes came in plaintext after the STARTTLS reply")
        self.phase = ClientPhase.OPTIONS
        self._next_option()

    def _finish(self, info: ExportInfo, events: list[ClientEvent]) -> None:
        self.export = info
        self.phase = ClientPhase.TRANSMISSION
        events.append(Negotiated(info, self.structured, dict(self.meta_contexts)))

    # ---------------------------------------------------------------- transmission

    def request(
        self,
        command: Cmd,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | memoryview = b"",
    ) -> int:
        """Queue one request; return its cookie. For WRITE, ``length`` defaults to len(data).
        No checking is done here on purpose, so tests can send what a broken client would."""
        if self.phase is not ClientPhase.TRANSMISSION:
            raise LocalProtocolError(f"request in phase {self.phase.value}")
        if command is Cmd.WRITE and not length:
            length = len(data)
        self._cookie += 1
        cookie = self._cookie
        self._out.append(wire.REQUEST.pack(REQUEST_MAGIC, flags, command, cookie, offset, length))
        if data:
            self._out.append(data)
        if command is Cmd.DISC:
            self.phase = ClientPhase.CLOSED
        else:
            self._inflight[cookie] = _InFlight(command, offset, length)
        return cookie

    @property
    def in_flight(self) -> int:
        """Number of requests still waiting for their reply."""
        return len(self._inflight)

    def _reply(self, events: list[ClientEvent]) -> bool:
        if len(self._buf) < 4:
            return False
        (magic,) = wire.U32.unpack_from(self._buf)
        if magic == SIMPLE_REPLY_MAGIC:
            if len(self._buf) < wire.SIMPLE_REPLY.size:
                return False
            _, error, cookie = wire.SIMPLE_REPLY.unpack_from(self._buf)
            req = self._inflight.get(cookie)
            if req is None:
                raise RemoteProtocolError(f"reply for unknown cookie {cookie}")
            extra = req.length if (req.command is Cmd.READ and error == 0) else 0
            if len(self._buf) < wire.SIMPLE_REPLY.size + extra:
                return False
            del self._inflight[cookie]
            if extra:
                events.append(Reply(cookie, Errno.OK, _copy(self._buf, _SIMPLE, _SIMPLE + extra)))
                del self._buf[: _SIMPLE + extra]
                return True
            del self._buf[:_SIMPLE]
            events.append(_done(cookie, req, Errno(error) if error in _ERRNOS else Errno.EINVAL))
            return True
        if magic != STRUCTURED_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad reply magic {magic:#x}")
        if len(self._buf) < wire.STRUCTURED_REPLY.size:
            return False
        _, rflags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack_from(self._buf)
        req = self._inflight.get(cookie)
        if req is None:
            raise RemoteProtocolError(f"structured reply for unknown cookie {cookie}")
        if length > (req.length + _SLACK if req.command is Cmd.READ else _MAX_OTHER_CHUNK):
            # refused before it is buffered: a server cannot make the client hold 4 GiB
            raise RemoteProtocolError(
                f"chunk of {length} bytes for a {req.command.name} of {req.length}")
        if len(self._buf) < _STRUCTURED + length:
            return False
        if (rtype == _OFFSET_DATA and rflags & _DONE
                and self._whole_read(req, cookie, length, events)):
            return True
        del self._buf[:_STRUCTURED]
        body = bytes(self._buf[:length])
        del self._buf[:length]
        # Chunk rules of proto.md 'Structured reply types': content chunks lie within the
        # request; anything unexpected that is not an error chunk means a hard disconnect.
        if rtype == ReplyType.OFFSET_DATA and req.command is Cmd.READ:
            if length < 9:
                raise RemoteProtocolError(f"OFFSET_DATA chunk of {length} bytes")
            (off,) = wire.OFFSET.unpack_from(body)
            rel = _within(req, off, length - 8, "OFFSET_DATA")
            _payload(req)[rel : rel + length - 8] = memoryview(body)[8:]
            req.covered.append((rel, rel + length - 8))
        elif rtype == ReplyType.OFFSET_HOLE and req.command is Cmd.READ:
            if length != wire.OFFSET_HOLE.size:
                raise RemoteProtocolError(f"OFFSET_HOLE chunk of {length} bytes")
            off, hlen = wire.OFFSET_HOLE.unpack_from(body)
            rel = _within(req, off, hlen, "OFFSET_HOLE")
            _payload(req)[rel : rel + hlen] = bytes(hlen)
            req.covered.append((rel, rel + hlen))
        elif rtype == ReplyType.BLOCK_STATUS and req.command is Cmd.BLOCK_STATUS:
            if length < 12 or (length - 4) % 8:
                raise RemoteProtocolError(f"BLOCK_STATUS chunk of {length} bytes")
            (ctx_id,) = wire.BLOCK_STATUS_HEADER.unpack_from(body)
            # One chunk comes per selected context; Reply.extents holds the first context's.
            if not self.meta_contexts or ctx_id == next(iter(self.meta_contexts)):
                for i in range(4, length, 8):
                    req.extents.append(wire.EXTENT.unpack_from(body, i))
        elif rtype & (1 << 15):
            if length < wire.ERROR_PAYLOAD.size:
                raise RemoteProtocolError(f"error chunk of {length} bytes")
            err, mlen = wire.ERROR_PAYLOAD.unpack_from(body)
            if mlen > length - wire.ERROR_PAYLOAD.size:
                raise RemoteProtocolError("error message longer than its chunk")
            # An error chunk must carry a nonzero error; unknown values count as EINVAL.
            req.error = Errno(err) if err in _ERRNOS and err else Errno.EINVAL
            req.message = body[6 : 6 + mlen].decode(errors="replace")
        elif rtype != ReplyType.NONE or length or not rflags & ReplyFlag.DONE:
            raise RemoteProtocolError(f"unexpected chunk type {rtype} for {req.command.name}")
        if rflags & ReplyFlag.DONE:
            del self._inflight[cookie]
            if req.command is Cmd.READ and req.error == Errno.OK:
                _check_covered(req)
            events.append(_done(cookie, req, req.error))
        return True

    def _whole_read(self, req: _InFlight, cookie: int, length: int,
                    events: list[ClientEvent]) -> bool:
        """The usual READ reply, taken with one copy of its payload: a single OFFSET_DATA
        chunk with the DONE flag holding the whole request (``length``: the chunk's, in
        bytes; the buffer holds all of it). False, and nothing taken, for any other chunk,
        which the general path checks and assembles."""
        if (req.command is not Cmd.READ or req.covered or req.error != Errno.OK
                or length != req.length + 8):
            return False
        (off,) = wire.OFFSET.unpack_from(self._buf, _STRUCTURED)
        if off != req.offset:
            return False
        start = _STRUCTURED + 8
        data = _copy(self._buf, start, start + req.length)
        del self._buf[: start + req.length]
        del self._inflight[cookie]
        events.append(Reply(cookie, Errno.OK, data))
        return True


_ERRNOS = {int(e) for e in Errno}


def _within(req: _InFlight, offset: int, length: int, what: str) -> int:
    """Where ``length`` bytes at ``offset`` start in ``req``'s buffer; a protocol error unless
    they are nonempty and inside the request."""
    rel = offset - req.offset
    if length <= 0 or rel < 0 or rel + length > req.length:
        raise RemoteProtocolError(f"{what} of {length} bytes at {offset} outside the request")
    return rel


def _check_covered(req: _InFlight) -> None:
    """A successful structured READ must be covered by content chunks exactly once each byte
    (proto.md, NBD_CMD_READ: chunks MUST NOT overlap, and without an error they MUST cover
    the whole request); otherwise the gaps would silently read as zeros."""
    pos = 0
    for start, end in sorted(req.covered):
        if start != pos:
            what = "overlap" if start < pos else "leave a gap"
            raise RemoteProtocolError(f"content chunks of a READ reply {what} at {pos}")
        pos = end
    if pos != req.length:
        raise RemoteProtocolError(f"READ reply of {pos} bytes for {req.length} requested")


_SIMPLE = wire.SIMPLE_REPLY.size
_STRUCTURED = wire.STRUCTURED_REPLY.size
#: Bytes a structured chunk of a READ may carry beyond the request's length (its offset, or
#: an error chunk's header and message), and the most any other request's chunk may carry
#: (a BLOCK_STATUS of 4 Mi extents and its context id).
_SLACK = 8 + 6 + 65536
_MAX_OTHER_CHUNK = 4 + 8 * (4 << 20)
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    """``buf[start:end]`` as bytes, copied once (a slice of a bytearray would copy twice);
    the view is released before the caller deletes from ``buf``."""
    with memoryview(buf) as view:
        return view[start:end].tobytes()


def _payload(req: _InFlight) -> bytearray:
    """The buffer a READ's structured chunks are assembled in, made at the first."""
    if req.data is None:
        req.data = bytearray(req.length)
    return req.data


def _done(cookie: int, req: _InFlight, error: Errno) -> Reply:
    data = bytes(req.data) if (req.data is not None and error == Errno.OK) else b""
    return Reply(cookie, error, data, tuple(req.extents), req.message)


__all__ = ["BASE_ALLOCATION", "ClientConnection", "ClientEvent", "ClientPhase"]
