"""Server side of an NBD connection as a sans-IO state machine.

Feed the bytes a client sent to :meth:`ServerConnection.receive_data`; it returns the events
those bytes completed. Bytes to send accumulate in the connection and are taken with
:meth:`ServerConnection.data_to_send` as a list of buffers, ready for one ``writelines``.

Phases (NBD proto.md, 'Protocol phases'): the fixed newstyle handshake (greeting, client flags),
option haggling, then transmission. The state machine answers every option by itself from an
:class:`ExportCatalog`; during transmission it checks each request (magic, command, flags,
bounds, payload size, read-only) and either returns a :class:`~nbd.events.Request` for the
caller to carry out and answer with one of the ``reply_*`` methods, or answers it with an error
itself and returns :class:`~nbd.events.RequestRejected`.

Only :class:`~nbd.errors.RemoteProtocolError` is raised for bad input, and only when the spec
says the connection must end (bad magic, unknown client flags, an export name that does not
exist given to NBD_OPT_EXPORT_NAME, ...). Bytes queued before raising should still be sent.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

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
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from nbd.errors import ExportUnavailable, LocalProtocolError, RemoteProtocolError
from nbd.events import (
    Disconnect,
    ExportInfo,
    OptionHaggled,
    Request,
    RequestRejected,
    StartTLS,
    TransmissionStarted,
    WritePiece,
)

Buffer = bytes | bytearray | memoryview
Event = (OptionHaggled | StartTLS | TransmissionStarted | Request | WritePiece | RequestRejected
         | Disconnect)

#: Context id of ``base:allocation`` once selected with NBD_OPT_SET_META_CONTEXT.
BASE_ALLOCATION_ID = 1

_ZEROES = bytes(wire.ZERO_PAD)
# Plain ints: since Python 3.11, ``~`` on an IntFlag inverts only the defined bits, so
# ``x & ~SomeFlag`` would never see an unknown bit.
_KNOWN_CLIENT_FLAGS = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)

# Which command flags each command accepts, and the transmission flag that must be advertised
# for each (NBD proto.md, 'Command flags').
_FLAG_NEEDS: dict[CmdFlag, TransmissionFlag] = {
    CmdFlag.FUA: TransmissionFlag.SEND_FUA,
    CmdFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
    CmdFlag.DF: TransmissionFlag.SEND_DF,
}
_CMD_FLAGS: dict[Cmd, CmdFlag] = {
    Cmd.READ: CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag(0),
    Cmd.FLUSH: CmdFlag(0),
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag(0),
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.REQ_ONE,
}
# The transmission flag that must be advertised before a command may be used.
_CMD_NEEDS: dict[Cmd, TransmissionFlag] = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
}
_WRITING = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_COMMANDS = {int(c): c for c in _CMD_FLAGS}
# Reply packing on the hot path: a structured OFFSET_DATA header with its offset in one struct.
_pack_data_chunk = struct.Struct(">IHHQIQ").pack
_pack_simple = wire.SIMPLE_REPLY.pack
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)


class ExportCatalog(Protocol):
    """What the state machine asks about exports during option haggling."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export a client named (``""`` is the default export), or None if unknown.
        May raise :class:`~nbd.errors.ExportUnavailable` to refuse it to this client with a
        message (NBD_REP_ERR_POLICY)."""

    def exports(self) -> Sequence[tuple[str, str]]:
        """(name, description) of every export, for NBD_OPT_LIST."""


class Phase(enum.Enum):
    """Where the connection is (NBD proto.md, 'Protocol phases')."""

    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_PENDING = "tls-pending"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True)
class TransmissionState:
    """What a connection in transmission negotiated, so that another process can carry it on
    over the same socket (``icbd-cache serve --handover``): export ``size`` in bytes, the
    transmission ``flags`` as the client was told them (HAS_FLAGS included), structured replies,
    the selected meta contexts, the NO_ZEROES client flag, and ``pending``: bytes received but
    not yet parsed (a request cut in two by the network), to be fed first."""

    size: int
    flags: int
    structured: bool
    meta_contexts: tuple[str, ...]
    no_zeroes: bool
    pending: bytes = b""


class ServerConnection:
    """One client connection, server side.

    ``tls`` says whether STARTTLS can be offered (the caller holds a certificate);
    ``tls_required`` refuses every option but STARTTLS and ABORT until TLS is up
    (NBD proto.md, 'TLS support', FORCEDTLS mode). ``max_payload`` (bytes) bounds READ and WRITE
    lengths and is advertised as the maximum block size. A WRITE longer than ``write_piece``
    bytes (0: never) is checked on its header, returned as a ``streamed``
    :class:`~nbd.events.Request`, and its payload delivered as
    :class:`~nbd.events.WritePiece` events as it arrives, so the connection never holds more
    than one piece of it; a WRITE refused on its header (bad flags, bounds, over
    ``max_payload``, read-only) is answered at once and its payload discarded as it arrives
    (drained), unless it is over :data:`nbd.wire.MAX_DRAIN` (RemoteProtocolError).
    """

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        tls: bool = False,
        tls_required: bool = False,
        max_payload: int = wire.MAX_PAYLOAD,
        write_piece: int = wire.WRITE_PIECE,
    ) -> None:
        if tls_required and not tls:
            raise ValueError("tls_required needs tls")
        if write_piece < 0 or write_piece % 4096:
            raise ValueError("write_piece must be a multiple of 4096")
        self.catalog = catalog
        self.tls_available = tls
        self.tls_required = tls_required
        self.max_payload = max_payload
        self.write_piece = write_piece
        #: The streamed WRITE whose payload is arriving, the absolute offset of the piece
        #: being gathered, the end of the write, and the parts of that piece so far.
        self._stream: Request | None = None
        self._piece_at = 0
        self._stream_end = 0
        self._parts: list[memoryview] = []
        self._parts_have = 0
        self._phase = Phase.CLIENT_FLAGS
        self.tls_active = False
        self.no_zeroes = False
        self.structured = False
        self.meta_export: str | None = None
        self.meta_contexts: tuple[str, ...] = ()
        self.export: ExportInfo | None = None
        self._flags = TransmissionFlag(0)
        self._size = 0
        self._out: list[Buffer] = []
        self._pending: list[bytes] = []
        self._have = 0
        self._need = 4
        self._skip = 0
        self._out.append(
            wire.GREETING.pack(
                NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
            )
        )

    @classmethod
    def resume(cls, catalog: ExportCatalog, info: ExportInfo, state: TransmissionState, *,
               max_payload: int = wire.MAX_PAYLOAD,
               write_piece: int = wire.WRITE_PIECE) -> ServerConnection:
        """A connection in transmission on ``info`` as :meth:`transmission_state` described
        it in another process: no greeting is sent, requests are checked against the flags the
        client was given. Feed ``state.pending`` to :meth:`receive_data` before anything read
        from the socket."""
        conn = cls(catalog, max_payload=max_payload, write_piece=write_piece)
        conn._out = []
        conn.export = info
        conn._flags = TransmissionFlag(state.flags)
        conn._size = state.size
        conn.structured = state.structured
        conn.meta_export = info.name
        conn.meta_contexts = tuple(state.meta_contexts)
        conn.no_zeroes = state.no_zeroes
        conn._phase = Phase.TRANSMISSION
        conn._need = wire.REQUEST.size
        return conn

    def transmission_state(self) -> TransmissionState:
        """What :meth:`resume` needs to carry this connection on elsewhere. Only in
        transmission, with every queued reply taken (:meth:`data_to_send`). Raises
        LocalProtocolError otherwise."""
        if (self._phase is not Phase.TRANSMISSION or self._out or self._skip
                or self._stream is not None):
            raise LocalProtocolError("only an idle connection in transmission can be handed over")
        return TransmissionState(self._size, int(self._flags), self.structured,
                                 self.meta_contexts, self.no_zeroes, b"".join(self._pending))

    @property
    def phase(self) -> Phase:
        """The protocol phase the connection is in."""
        return self._phase

    @phase.setter
    def phase(self, value: Phase) -> None:
        self._phase = value

    @property
    def closed(self) -> bool:
        """True once the connection must not read any more (DISC, ABORT, fatal error, EOF)."""
        return self._phase is Phase.CLOSED

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes) -> list[Event]:
        """Take bytes from the client; return the events they complete, in order.

        ``data == b""`` means end of stream: a client that goes away in transmission without
        NBD_CMD_DISC yields ``Disconnect(clean=False)``.

        Raises RemoteProtocolError when the connection must be dropped.
        """
        events: list[Event] = []
        if self.phase is Phase.CLOSED:
            return events
        if not data:
            self.phase = Phase.CLOSED
            events.append(Disconnect(clean=False))
            return events
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not data:
                return events
        if self._stream is not None:
            pos = self._feed_stream(data, 0, events)
            if pos == len(data):
                return events
            data = data[pos:]
        if self._pending:
            self._pending.append(data)
            self._have += len(data)
            if self._have < self._need:
                return events
            data = b"".join(self._pending)
            self._pending = []
            self._have = 0
        if self.phase is Phase.TRANSMISSION:
            pos = self._transmission(data, events)
        else:
            pos = self._handshake(data, events)
        rest = len(data) - pos
        if rest > 0 and not self.closed:
            self._pending = [data[pos:]]
            self._have = rest
        return events

    def _handshake(self, data: bytes, events: list[Event]) -> int:
        pos = 0
        end = len(data)
        while True:
            phase = self.phase
            if phase is Phase.TRANSMISSION:
                return pos + self._transmission(data[pos:], events) if pos < end else pos
            if phase is not Phase.CLIENT_FLAGS and phase is not Phase.OPTIONS:
                return end  # closed, or bytes sent before the TLS handshake: dropped
            if phase is Phase.CLIENT_FLAGS:
                if end - pos < 4:
                    self._need = 4
                    return pos
                (cflags,) = wire.CLIENT_FLAGS.unpack_from(data, pos)
                pos += 4
                self._client_flags(cflags)
                continue
            if end - pos < 16:
                self._need = 16
                return pos
            magic, opt, length = wire.OPTION_HEADER.unpack_from(data, pos)
            length = int(length)
            if magic != IHAVEOPT:
                self.phase = Phase.CLOSED
                raise RemoteProtocolError(f"bad option magic {magic:#x}")
            if length > wire.MAX_OPTION_LENGTH:
                if opt == Opt.EXPORT_NAME:
                    # No error reply exists for NBD_OPT_EXPORT_NAME: end the session.
                    self.phase = Phase.CLOSED
                    raise RemoteProtocolError(f"NBD_OPT_EXPORT_NAME of {length} bytes")
                # Too big to hold: answer, then discard the payload as it arrives.
                self._refuse(opt, Rep.ERR_TOO_BIG, f"option data of {length} bytes", events)
                pos += 16
                skip = min(length, end - pos)
                pos += skip
                self._skip = length - skip
                if self._skip:
                    return pos
                continue
            if end - pos < 16 + length:
                self._need = 16 + length
                return pos
            payload = data[pos + 16 : pos + 16 + length]
            pos += 16 + length
            self._option(opt, payload, events)

    def _client_flags(self, cflags: int) -> None:
        if cflags & ~_KNOWN_CLIENT_FLAGS:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & ClientFlag.C_NO_ZEROES)
        self.phase = Phase.OPTIONS

    # ------------------------------------------------------------ option haggling

    def _option_reply(self, opt: int, rep: Rep, data: Buffer = b"") -> None:
        self._out.append(wire.OPTION_REPLY_HEADER.pack(REPLY_MAGIC_OPT, opt, rep, len(data)))
        if data:
            self._out.append(data)

    def _find(self, name: str) -> ExportInfo | tuple[Rep, str]:
        """The catalog's export for ``name``, or the refusal (reply type, message):
        NBD_REP_ERR_UNKNOWN for a name it does not know, NBD_REP_ERR_POLICY for an export it
        will not give this client now."""
        try:
            info = self.catalog.lookup(name)
        except ExportUnavailable as e:
            return Rep.ERR_POLICY, str(e) or f"export {name!r} is refused"
        return info if info is not None else (Rep.ERR_UNKNOWN, f"unknown export {name!r}")

    def _refuse(self, opt: int, rep: Rep, message: str, events: list[Event]) -> None:
        self._option_reply(opt, rep, message.encode())
        events.append(OptionHaggled(opt, rep, message))

    def _option(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if self.tls_required and not self.tls_active and opt not in (Opt.STARTTLS, Opt.ABORT):
            if opt == Opt.EXPORT_NAME:
                self.phase = Phase.CLOSED
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
            self._refuse(opt, Rep.ERR_TLS_REQD, "TLS is required (send NBD_OPT_STARTTLS)", events)
            return
        handler = self._OPTIONS.get(opt)
        if handler is None:
            self._refuse(opt, Rep.ERR_UNSUP, f"option {opt} is not supported", events)
            return
        handler(self, opt, payload, events)

    def _opt_export_name(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) > wire.MAX_STRING:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError("export name longer than 4096 bytes")
        name = self._decode(payload)
        if name is None:
            self.phase = Phase.CLOSED
            raise RemoteProtocolError("export name is not UTF-8")
        info = self._find(name)
        if isinstance(info, tuple):
            self.phase = Phase.CLOSED
            raise RemoteProtocolError(f"{info[1]} (NBD_OPT_EXPORT_NAME)")
        self._begin(info, Opt.EXPORT_NAME, name, events)
        self._out.append(wire.EXPORT_NAME_REPLY.pack(info.size, self._flags))
        if not self.no_zeroes:
            self._out.append(_ZEROES)

    def _opt_abort(self, opt: int, payload: bytes, events: list[Event]) -> None:
        self._option_reply(opt, Rep.ACK)
        self.phase = Phase.CLOSED
        events.append(Disconnect(clean=True))

    def _opt_list(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if payload:
            self._refuse(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data", events)
            return
        for name, description in self.catalog.exports():
            raw = name.encode()
            body = wire.U32.pack(len(raw)) + raw + description.encode()
            self._option_reply(opt, Rep.SERVER, body)
        self._option_reply(opt, Rep.ACK)
        events.append(OptionHaggled(opt, Rep.ACK))

    def _opt_starttls(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if payload:
            self._refuse(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data", events)
        elif not self.tls_available:
            self._refuse(opt, Rep.ERR_POLICY, "TLS is not configured on this server", events)
        elif self.tls_active:
            self._refuse(opt, Rep.ERR_INVALID, "TLS is already active", events)
        else:
            self._option_reply(opt, Rep.ACK)
            self.phase = Phase.TLS_PENDING
            events.append(StartTLS())

    def tls_started(self) -> None:
        """The transport now speaks TLS: forget all negotiation done before it (proto.md,
        'TLS support': state from before STARTTLS must not be trusted)."""
        if self.phase is not Phase.TLS_PENDING:
            raise LocalProtocolError("tls_started() without a pending STARTTLS")
        self.tls_active = True
        self.structured = False
        self.meta_export = None
        self.meta_contexts = ()
        self.phase = Phase.OPTIONS
        self._pending = []
        self._have = 0

    def _opt_structured_reply(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if payload:
            self._refuse(opt, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data", events)
        elif self.structured:
            self._refuse(opt, Rep.ERR_INVALID, "structured replies already negotiated", events)
        else:
            self.structured = True
            self._option_reply(opt, Rep.ACK)
            events.append(OptionHaggled(opt, Rep.ACK, "structured replies"))

    def _opt_info_go(self, opt: int, payload: bytes, events: list[Event]) -> None:
        parsed = _parse_info_request(payload)
        if isinstance(parsed, str):
            self._refuse(opt, Rep.ERR_INVALID, parsed, events)
            return
        name, requests = parsed
        info = self._find(name)
        if isinstance(info, tuple):
            self._refuse(opt, *info, events)
            return
        flags = self._transmission_flags(info)
        if Info.NAME in requests:
            raw = info.name.encode()
            self._option_reply(opt, Rep.INFO, wire.U16.pack(Info.NAME) + raw)
        if Info.DESCRIPTION in requests and info.description:
            raw = info.description.encode()
            self._option_reply(opt, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + raw)
        block = wire.INFO_BLOCK_SIZE.pack(
            Info.BLOCK_SIZE, info.min_block, info.preferred_block,
            min(info.max_block, self.max_payload),
        )
        self._option_reply(opt, Rep.INFO, block)
        self._option_reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, info.size, flags))
        self._option_reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self._begin(info, Opt.GO, name, events)
        else:
            events.append(OptionHaggled(opt, Rep.ACK, name))

    def _opt_meta_context(self, opt: int, payload: bytes, events: list[Event]) -> None:
        if opt == Opt.SET_META_CONTEXT:
            # SET replaces the previous selection, even when it fails (proto.md).
            self.meta_export = None
            self.meta_contexts = ()
        if not self.structured:
            self._refuse(opt, Rep.ERR_INVALID, "negotiate structured replies first", events)
            return
        parsed = _parse_meta_request(payload)
        if isinstance(parsed, str):
            self._refuse(opt, Rep.ERR_INVALID, parsed, events)
            return
        name, queries = parsed
        found = self._find(name)
        if isinstance(found, tuple):
            self._refuse(opt, *found, events)
            return
        selected: list[str] = []
        if not queries and opt == Opt.LIST_META_CONTEXT:
            selected.append(BASE_ALLOCATION)
        # "base:" is a wildcard for LIST only; SET MUST ignore it (proto.md, 'The base:
        # metadata namespace'). Queries in unknown namespaces are ignored, not refused.
        listing = opt == Opt.LIST_META_CONTEXT
        wildcards = {BASE_ALLOCATION, "base:"} if listing else {BASE_ALLOCATION}
        for q in queries:
            if q in wildcards and BASE_ALLOCATION not in selected:
                selected.append(BASE_ALLOCATION)
        for ctx in selected:
            ctx_id = BASE_ALLOCATION_ID if opt == Opt.SET_META_CONTEXT else 0
            self._option_reply(opt, Rep.META_CONTEXT, wire.U32.pack(ctx_id) + ctx.encode())
        self._option_reply(opt, Rep.ACK)
        if opt == Opt.SET_META_CONTEXT:
            self.meta_export = name
            self.meta_contexts = tuple(selected)
        events.append(OptionHaggled(opt, Rep.ACK, ",".join(selected)))

    _OPTIONS: ClassVar[dict[int, Callable[[ServerConnection, int, bytes, list[Event]], None]]] = {
        Opt.EXPORT_NAME: _opt_export_name,
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }

    @staticmethod
    def _decode(raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _transmission_flags(self, info: ExportInfo) -> TransmissionFlag:
        flags = info.flags | TransmissionFlag.HAS_FLAGS
        if self.structured:
            flags |= TransmissionFlag.SEND_DF
        else:
            flags &= ~TransmissionFlag.SEND_DF
        if flags & TransmissionFlag.READ_ONLY:
            flags &= ~(
                TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
                | TransmissionFlag.SEND_FUA
            )
        return flags

    def _begin(self, info: ExportInfo, opt: Opt, name: str, events: list[Event]) -> None:
        self.export = info
        self._flags = self._transmission_flags(info)
        self._size = info.size
        if self.meta_export != name:
            self.meta_contexts = ()  # contexts were selected for another export
        self.phase = Phase.TRANSMISSION
        self._need = wire.REQUEST.size
        events.append(
            TransmissionStarted(
                info, self.structured, self.meta_contexts, self.no_zeroes, opt, name
            )
        )

    # ---------------------------------------------------------------- transmission

    def _transmission(self, data: bytes, events: list[Event]) -> int:
        pos = 0
        end = len(data)
        hdr = wire.REQUEST.size
        unpack = wire.REQUEST.unpack_from
        size = self._size
        max_payload = self.max_payload
        append = events.append
        read = Cmd.READ
        while end - pos >= hdr:
            magic, flags, cmd, cookie, offset, length = unpack(data, pos)
            if cmd == 0 and not flags and magic == REQUEST_MAGIC:
                # Hot path: a plain READ, checked inline (same rules as _check).
                pos += hdr
                if 0 < length <= max_payload and offset + length <= size:
                    append(Request(cookie, read, 0, offset, length))
                    continue
                pos -= hdr
            if magic != REQUEST_MAGIC:
                self.phase = Phase.CLOSED
                raise RemoteProtocolError(f"bad request magic {magic:#x}")
            if cmd == 1:  # Cmd.WRITE: the payload follows the header
                if length > wire.MAX_DRAIN:
                    self.phase = Phase.CLOSED
                    raise RemoteProtocolError(f"write of {length} bytes is too large to drain")
                piece = self.write_piece
                if (piece and length > piece) or length > max_payload:
                    # checked on its header: streamed, or answered and drained
                    pos += hdr
                    err = self._check(cmd, flags, offset, length)
                    if err is not None:
                        error, reason = err
                        self._error_reply(cookie, cmd, offset, error, reason)
                        append(RequestRejected(cookie, cmd, error, reason))
                        n = min(length, end - pos)
                        pos += n
                        self._skip = length - n
                    else:
                        req = Request(cookie, Cmd.WRITE, flags, offset, length, b"", True)
                        append(req)
                        self._stream = req
                        self._piece_at = offset
                        self._stream_end = offset + length
                        pos = self._feed_stream(data, pos, events)
                    if self._skip or self._stream is not None:
                        self._need = hdr
                        return pos
                    continue
                if end - pos < hdr + length:
                    self._need = hdr + length
                    return pos
                payload = memoryview(data)[pos + hdr : pos + hdr + length]
                pos += hdr + length
            else:
                payload = b""  # type: ignore[assignment]
                pos += hdr
            err = self._check(cmd, flags, offset, length)
            if err is None:
                if cmd == 2:  # Cmd.DISC
                    self.phase = Phase.CLOSED
                    events.append(Disconnect(clean=True))
                    return end
                append(Request(cookie, _COMMANDS[cmd], flags, offset, length, payload))
            else:
                error, reason = err
                self._error_reply(cookie, cmd, offset, error, reason)
                events.append(RequestRejected(cookie, cmd, error, reason))
        self._need = hdr
        return pos

    def _feed_stream(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Take the payload of the streamed WRITE from ``data[pos:]``: each piece completed
        becomes a :class:`WritePiece`. Returns where the payload ended in ``data`` (``len(data)``
        when it goes on)."""
        req = self._stream
        assert req is not None
        end = len(data)
        view = memoryview(data)
        step = self.write_piece
        while pos < end:
            at = self._piece_at
            stop = min((at // step + 1) * step, self._stream_end)
            n = min(stop - at - self._parts_have, end - pos)
            self._parts.append(view[pos : pos + n])
            self._parts_have += n
            pos += n
            if at + self._parts_have < stop:
                break
            parts = self._parts
            piece = parts[0] if len(parts) == 1 else memoryview(b"".join(parts))
            self._parts = []
            self._parts_have = 0
            self._piece_at = stop
            last = stop == self._stream_end
            events.append(WritePiece(req, at, piece, last))
            if last:
                self._stream = None
                break
        return pos

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """Validate a request (NBD proto.md, 'Request types' and 'Error values')."""
        command = _COMMANDS.get(cmd)
        if command is None:
            return Errno.EINVAL, f"unknown command {cmd}"
        # FUA is valid on every command once SEND_FUA is advertised (proto.md, 'Command
        # flags': the server MUST accept it, even by ignoring it); _FLAG_NEEDS checks that.
        allowed = int(_CMD_FLAGS[command] | CmdFlag.FUA)
        if flags & ~allowed:
            return Errno.EINVAL, f"flags {flags:#x} not valid for {command.name}"
        for flag, needed in _FLAG_NEEDS.items():
            if flags & flag and not self._flags & needed:
                return Errno.EINVAL, f"flag {flag.name} was not negotiated"
        needed_cmd = _CMD_NEEDS.get(command)
        if command in _WRITING and self._flags & TransmissionFlag.READ_ONLY:
            return Errno.EPERM, "export is read-only"
        if needed_cmd is not None and not self._flags & needed_cmd:
            return Errno.EINVAL, f"{command.name} was not negotiated"
        if command is Cmd.DISC or command is Cmd.FLUSH:
            return None
        if command is Cmd.BLOCK_STATUS and not self.meta_contexts:
            return Errno.EINVAL, "no metadata context was selected"
        if length == 0:
            return Errno.EINVAL, f"{command.name} of length 0"
        if offset + length > self._size:
            if command is Cmd.WRITE or command is Cmd.WRITE_ZEROES:
                return Errno.ENOSPC, "write past the end of the export"
            return Errno.EINVAL, "request past the end of the export"
        if length > self.max_payload and command in (Cmd.READ, Cmd.WRITE):
            return Errno.EINVAL, f"{length} bytes is over the maximum payload"
        return None

    # ------------------------------------------------------------------- replies

    def _error_reply(self, cookie: int, cmd: int, offset: int, error: Errno, msg: str) -> None:
        if self.structured and cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
            raw = msg.encode()[:4096]
            self._out.append(
                wire.STRUCTURED_REPLY.pack(
                    STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.ERROR, cookie,
                    wire.ERROR_PAYLOAD.size + len(raw),
                )
                + wire.ERROR_PAYLOAD.pack(error, len(raw))
                + raw
            )
        else:
            self._out.append(wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie))

    def reply_ok(self, request: Request) -> None:
        """Answer a successful WRITE, FLUSH, TRIM, WRITE_ZEROES or CACHE (simple reply)."""
        self._out.append(wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie))

    def reply_error(self, request: Request, error: Errno, message: str = "") -> None:
        """Answer ``request`` with a wire error value (structured for READ and BLOCK_STATUS when
        structured replies were negotiated, per proto.md 'Structured reply chunk message')."""
        self._error_reply(request.cookie, request.command, request.offset, error, message)

    def reply_read(self, request: Request, buffers: Iterable[Buffer]) -> None:
        """Answer a READ with its payload: ``buffers`` together hold exactly ``request.length``
        bytes. Queued without copying (header and payload leave in one ``writelines``)."""
        out = self._out
        if self.structured:
            out.append(_pack_data_chunk(
                STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, request.cookie,
                8 + request.length, request.offset,
            ))
        else:
            out.append(_pack_simple(SIMPLE_REPLY_MAGIC, 0, request.cookie))
        out.extend(buffers)

    def reply_block_status(self, request: Request, extents: Sequence[tuple[int, int]]) -> None:
        """Answer a BLOCK_STATUS with (length in bytes, base:allocation flags) extents that
        start at ``request.offset``; with REQ_ONE only the first is sent, cut to the request
        length (proto.md, NBD_CMD_BLOCK_STATUS)."""
        if request.flags & CmdFlag.REQ_ONE and extents:
            length, flags = extents[0]
            extents = [(min(length, request.length), flags)]
        extents = extents[: wire.MAX_EXTENTS]
        body = bytearray(wire.BLOCK_STATUS_HEADER.pack(BASE_ALLOCATION_ID))
        for length, flags in extents:
            body += wire.EXTENT.pack(length, flags)
        self._out.append(
            wire.STRUCTURED_REPLY.pack(
                STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE, ReplyType.BLOCK_STATUS,
                request.cookie, len(body),
            )
        )
        self._out.append(bytes(body))

    # -------------------------------------------------------------------- output

    def data_to_send(self) -> list[Buffer]:
        """Take the queued output buffers (to pass to one ``writelines``)."""
        out = self._out
        self._out = []
        return out

    def has_output(self) -> bool:
        return bool(self._out)


def _parse_info_request(payload: bytes) -> tuple[str, set[int]] | str:
    """Parse NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, info types.
    Returns (name, requested info types), or a message saying what is malformed."""
    if len(payload) < 6:
        return "option data too short"
    (nlen,) = wire.U32.unpack_from(payload, 0)
    if nlen > wire.MAX_STRING:
        return "export name longer than 4096 bytes"
    if 4 + nlen + 2 > len(payload):
        return "export name length past the end of the option"
    try:
        name = payload[4 : 4 + nlen].decode("utf-8")
    except UnicodeDecodeError:
        return "export name is not UTF-8"
    (count,) = wire.U16.unpack_from(payload, 4 + nlen)
    if 4 + nlen + 2 + 2 * count != len(payload):
        return "information request count does not match the option length"
    base = 6 + nlen
    return name, {wire.U16.unpack_from(payload, base + 2 * i)[0] for i in range(count)}


def _parse_meta_request(payload: bytes) -> tuple[str, list[str]] | str:
    """Parse NBD_OPT_{LIST,SET}_META_CONTEXT data: export name and queries."""
    if len(payload) < 8:
        return "option data too short"
    (nlen,) = wire.U32.unpack_from(payload, 0)
    if nlen > wire.MAX_STRING or 4 + nlen + 4 > len(payload):
        return "bad export name length"
    try:
        name = payload[4 : 4 + nlen].decode("utf-8")
    except UnicodeDecodeError:
        return "export name is not UTF-8"
    pos = 4 + nlen
    (count,) = wire.U32.unpack_from(payload, pos)
    pos += 4
    queries: list[str] = []
    for _ in range(count):
        if pos + 4 > len(payload):
            return "query count past the end of the option"
        (qlen,) = wire.U32.unpack_from(payload, pos)
        pos += 4
        if qlen > wire.MAX_STRING or pos + qlen > len(payload):
            return "bad query length"
        try:
            queries.append(payload[pos : pos + qlen].decode("utf-8"))
        except UnicodeDecodeError:
            return "query is not UTF-8"
        pos += qlen
    if pos != len(payload):
        return "trailing bytes after the queries"
    return name, queries
