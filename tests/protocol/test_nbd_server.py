"""Byte-level tests of :class:`nbd.server.ServerConnection`.

The connection is driven with hand-built client bytes (from the :mod:`nbd.wire` structs, never
through :class:`nbd.client.ClientConnection`) and its output is compared byte for byte with
what NBD proto.md prescribes, so that the two state machines cannot share a mistake. Magic
numbers that matter are spelled out literally once (``GREETING``, the reply magics) rather than
taken from :mod:`nbd.constants`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from nbd import wire
from nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
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
)
from nbd.server import Event, Phase, ServerConnection

TF = TransmissionFlag
SIZE = 1 << 20

#: The greeting, literally: "NBDMAGIC", "IHAVEOPT", handshake flags FIXED_NEWSTYLE | NO_ZEROES.
GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
OPT_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
SIMPLE_MAGIC = bytes.fromhex("67446698")
STRUCTURED_MAGIC = bytes.fromhex("668e33ef")

#: Read-only default export; flags on the wire: HAS_FLAGS|READ_ONLY|SEND_FLUSH|SEND_CACHE.
DISK = ExportInfo("disk", SIZE, TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_CACHE, "the disk")
DISK_WIRE_FLAGS = 0x0001 | 0x0002 | 0x0004 | 0x0400
#: Writable export with every write feature advertised.
RW = ExportInfo(
    "rw", SIZE,
    TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO
    | TF.SEND_CACHE,
)
#: Writable export that advertises nothing optional.
BARE = ExportInfo("bare", SIZE, TF(0))
#: Reached by the alias "lab" (a name resolved to a canonical version).
LAB = ExportInfo("lab@7", 8192, TF.READ_ONLY, "lab, version 7")

COOKIE = 0xDEADBEEFCAFEF00D


class Catalog:
    """The ExportCatalog the server asks: exports by name, plus aliases ("" is the default)."""

    def __init__(self, exports: Sequence[ExportInfo], aliases: dict[str, str]) -> None:
        self._exports = list(exports)
        self._by_name = {e.name: e for e in exports}
        self._aliases = aliases

    def lookup(self, name: str) -> ExportInfo | None:
        return self._by_name.get(self._aliases.get(name, name))

    def exports(self) -> Sequence[tuple[str, str]]:
        return [(e.name, e.description) for e in self._exports]


CATALOG = Catalog([DISK, RW, BARE, LAB], {"": "disk", "lab": "lab@7"})


# ------------------------------------------------------------------------------ helpers


def out(conn: ServerConnection) -> bytes:
    """Everything the server queued, joined."""
    return b"".join(bytes(b) for b in conn.data_to_send())


def option(opt: int, data: bytes = b"", *, length: int | None = None) -> bytes:
    """Client option: IHAVEOPT, option, data length, data."""
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data) if length is None else length) + data


def reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    """Expected option reply: magic, option, reply type, length, data."""
    return OPT_REPLY_MAGIC + struct.pack(">III", opt, rep, len(data)) + data


def parse_replies(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Split a stream of option replies strictly (magic checked, lengths tile the buffer)."""
    replies = []
    pos = 0
    while pos < len(buf):
        assert buf[pos : pos + 8] == OPT_REPLY_MAGIC, f"bad magic at {pos}: {buf[pos:pos + 8]!r}"
        opt, rep, length = struct.unpack_from(">III", buf, pos + 8)
        body = buf[pos + 20 : pos + 20 + length]
        assert len(body) == length, "reply length runs past the output"
        replies.append((opt, rep, body))
        pos += 20 + length
    return replies


def assert_refused(buf: bytes, opt: int, rep: Rep) -> str:
    """``buf`` is exactly one error reply to ``opt`` with a UTF-8 message; return it."""
    ((ropt, rrep, body),) = parse_replies(buf)
    assert (ropt, rrep) == (opt, rep)
    assert rep.is_error
    assert body, "error replies should say why"
    return body.decode("utf-8")


def info_request(name: bytes | str, *infos: int) -> bytes:
    """NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count, info types."""
    raw = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_request(name: str, *queries: str) -> bytes:
    """NBD_OPT_{LIST,SET}_META_CONTEXT data: name, query count, queries."""
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q.encode())) + q.encode()
    return body


def request(
    cmd: int, cookie: int = COOKIE, offset: int = 0, length: int = 0, flags: int = 0,
    data: bytes = b"",
) -> bytes:
    """Transmission request (magic, flags, type, cookie, offset, length), then ``data``."""
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length) + data


def simple(cookie: int = COOKIE, error: int = 0) -> bytes:
    return SIMPLE_MAGIC + struct.pack(">IQ", error, cookie)


def chunk(cookie: int, rtype: int, payload: bytes, flags: int = 1) -> bytes:
    return STRUCTURED_MAGIC + struct.pack(">HHQI", flags, rtype, cookie, len(payload)) + payload


def assert_error_chunk(buf: bytes, cookie: int, error: Errno) -> str:
    """``buf`` is exactly one final NBD_REPLY_TYPE_ERROR chunk; return its message."""
    assert buf[:4] == STRUCTURED_MAGIC
    flags, rtype, rcookie, length = struct.unpack_from(">HHQI", buf, 4)
    assert (flags, rtype, rcookie) == (1, 0x8001, cookie)
    assert len(buf) == 20 + length
    err, mlen = struct.unpack_from(">IH", buf, 20)
    assert err == error
    assert mlen == length - 6
    return buf[26:].decode("utf-8")


def handshake(
    *, no_zeroes: bool = True, tls: bool = False, tls_required: bool = False,
    max_payload: int = wire.MAX_PAYLOAD,
) -> ServerConnection:
    """A connection past the greeting and client flags, in option haggling."""
    conn = ServerConnection(CATALOG, tls=tls, tls_required=tls_required, max_payload=max_payload)
    assert out(conn) == GREETING
    cflags = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if no_zeroes else 0)
    assert conn.receive_data(struct.pack(">I", cflags)) == []
    assert out(conn) == b""
    assert conn.phase is Phase.OPTIONS
    return conn


def structured(conn: ServerConnection) -> None:
    conn.receive_data(option(Opt.STRUCTURED_REPLY))
    assert out(conn) == reply(Opt.STRUCTURED_REPLY, Rep.ACK)


def set_meta(conn: ServerConnection, name: str, *queries: str) -> bytes:
    conn.receive_data(option(Opt.SET_META_CONTEXT, meta_request(name, *queries)))
    return out(conn)


def transmission(
    export: str = "disk", *, structured_replies: bool = False, meta: bool = False,
    max_payload: int = wire.MAX_PAYLOAD,
) -> ServerConnection:
    """A connection in transmission on ``export`` (NBD_OPT_GO), output drained."""
    conn = handshake(max_payload=max_payload)
    if structured_replies or meta:
        structured(conn)
    if meta:
        set_meta(conn, export, BASE_ALLOCATION)
    events = conn.receive_data(option(Opt.GO, info_request(export)))
    assert isinstance(events[-1], TransmissionStarted)
    out(conn)
    assert conn.phase is Phase.TRANSMISSION
    return conn


def rejected(events: list[Event]) -> RequestRejected:
    (ev,) = events
    assert isinstance(ev, RequestRejected)
    return ev


def accepted(events: list[Event]) -> Request:
    (ev,) = events
    assert isinstance(ev, Request), ev
    return ev


# ------------------------------------------------------------------ constants vs proto.md


def test_wire_values_are_the_numbers_in_proto_md() -> None:
    """The tests build bytes from nbd.constants; pin those to proto.md's literal numbers."""
    assert [int(o) for o in Opt] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert [o.name for o in Opt][8:] == ["LIST_META_CONTEXT", "SET_META_CONTEXT",
                                         "EXTENDED_HEADERS"]
    assert [int(r) for r in Rep] == [1, 2, 3, 4] + [(1 << 31) + i for i in range(1, 11)]
    assert [int(i) for i in Info] == [0, 1, 2, 3]
    assert [int(c) for c in Cmd] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [int(f) for f in CmdFlag] == [1, 2, 4, 8, 16, 32]
    assert [int(t) for t in ReplyType] == [0, 1, 2, 5, 6, 0x8001, 0x8002]
    assert [int(f) for f in TransmissionFlag] == [1 << i for i in range(13)]
    assert [int(e) for e in Errno] == [0, 1, 5, 12, 22, 28, 75, 95, 108]
    assert (0x25609513, int.from_bytes(b"IHAVEOPT", "big")) == (REQUEST_MAGIC, IHAVEOPT)


# ------------------------------------------------------------------------------ handshake


def test_greeting_bytes_exact() -> None:
    conn = ServerConnection(CATALOG)
    assert out(conn) == GREETING
    assert len(GREETING) == wire.GREETING.size == 18
    assert out(conn) == b""  # sent once
    assert conn.phase is Phase.CLIENT_FLAGS


@pytest.mark.parametrize("cflags", [0, 1, 2, 3])
def test_known_client_flags_enter_option_haggling(cflags: int) -> None:
    conn = ServerConnection(CATALOG)
    out(conn)
    assert conn.receive_data(struct.pack(">I", cflags)) == []
    assert conn.phase is Phase.OPTIONS
    assert conn.no_zeroes is bool(cflags & 2)
    assert out(conn) == b""


def test_export_name_reply_without_zeroes() -> None:
    conn = handshake(no_zeroes=True)
    events = conn.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert out(conn) == struct.pack(">QH", SIZE, DISK_WIRE_FLAGS)
    (ev,) = events
    assert ev == TransmissionStarted(DISK, False, (), True, Opt.EXPORT_NAME, "disk")
    assert conn.phase is Phase.TRANSMISSION


@pytest.mark.parametrize("cflags", [0, ClientFlag.C_FIXED_NEWSTYLE])
def test_export_name_reply_with_124_zeroes(cflags: int) -> None:
    conn = ServerConnection(CATALOG)
    out(conn)
    conn.receive_data(struct.pack(">I", cflags) + option(Opt.EXPORT_NAME, b"disk"))
    sent = out(conn)
    assert sent == struct.pack(">QH", SIZE, DISK_WIRE_FLAGS) + bytes(124)
    assert len(sent) == 134


@pytest.mark.parametrize("cflags", [4, 0x80, 1 << 31, 0xFFFFFFFF, 3 | 8])
def test_unknown_client_flags_drop_the_connection(cflags: int) -> None:
    conn = ServerConnection(CATALOG)
    out(conn)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(struct.pack(">I", cflags))
    assert conn.closed
    assert out(conn) == b""
    assert conn.receive_data(option(Opt.LIST)) == []  # nothing more is read
    assert out(conn) == b""


def test_client_flags_one_byte_at_a_time() -> None:
    conn = ServerConnection(CATALOG)
    out(conn)
    for b in struct.pack(">I", 3)[:3]:
        assert conn.receive_data(bytes([b])) == []
        assert conn.phase is Phase.CLIENT_FLAGS
    assert conn.receive_data(b"\x03") == []
    assert conn.phase is Phase.OPTIONS and conn.no_zeroes


@pytest.mark.parametrize(
    "magic", [0, REQUEST_MAGIC, IHAVEOPT ^ 1, int.from_bytes(b"NBDMAGIC", "big")]
)
def test_bad_option_magic_drops_the_connection(magic: int) -> None:
    conn = handshake()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(struct.pack(">QII", magic, Opt.LIST, 0))
    assert conn.closed
    assert out(conn) == b""


def test_eof_during_option_haggling_is_an_unclean_disconnect() -> None:
    conn = handshake()
    assert conn.receive_data(b"") == [Disconnect(clean=False)]
    assert conn.closed
    assert conn.receive_data(b"") == []


# ------------------------------------------------------------------- NBD_OPT_EXPORT_NAME


def test_export_name_default_export() -> None:
    conn = handshake()
    (ev,) = conn.receive_data(option(Opt.EXPORT_NAME))
    assert isinstance(ev, TransmissionStarted)
    assert ev.export == DISK and ev.requested == ""
    assert out(conn) == struct.pack(">QH", SIZE, DISK_WIRE_FLAGS)


def test_export_name_alias() -> None:
    conn = handshake()
    (ev,) = conn.receive_data(option(Opt.EXPORT_NAME, b"lab"))
    assert isinstance(ev, TransmissionStarted) and ev.export == LAB
    assert out(conn) == struct.pack(">QH", 8192, 0x0001 | 0x0002)


def test_export_name_with_structured_replies_advertises_df() -> None:
    conn = handshake()
    structured(conn)
    (ev,) = conn.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(ev, TransmissionStarted) and ev.structured_replies
    assert out(conn) == struct.pack(">QH", SIZE, DISK_WIRE_FLAGS | 0x0080)


@pytest.mark.parametrize(
    "name",
    [b"nope", b"Disk", b"disk\x00", b"\xff\xfe", b"x" * 4097],
    ids=["unknown", "case", "nul", "not-utf8", "over-4096"],
)
def test_export_name_refused_drops_the_connection(name: bytes) -> None:
    conn = handshake()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(option(Opt.EXPORT_NAME, name))
    assert conn.closed
    assert out(conn) == b"", "NBD_OPT_EXPORT_NAME has no error reply"


def test_export_name_larger_than_max_option_drops_without_an_option_reply() -> None:
    conn = handshake()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(option(Opt.EXPORT_NAME, length=wire.MAX_OPTION_LENGTH + 1))
    assert conn.closed
    assert out(conn) == b"", "a client reading the export-name reply would misparse one"


# ------------------------------------------------------------------- NBD_OPT_INFO / GO


def info_replies(opt: int, info: ExportInfo, wire_flags: int, *, max_block: int) -> list[bytes]:
    return [
        reply(opt, Rep.INFO, struct.pack(">HQH", 0, info.size, wire_flags)),
        reply(opt, Rep.INFO, struct.pack(">H", 1) + info.name.encode()),
        reply(opt, Rep.INFO, struct.pack(">H", 2) + info.description.encode()),
        reply(opt, Rep.INFO, struct.pack(">HIII", 3, 1, 4096, max_block)),
    ]


def split_replies(buf: bytes) -> list[bytes]:
    return [reply(o, r, b) for o, r, b in parse_replies(buf)]


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_and_go_reply_export_name_description_block_size_then_ack(opt: Opt) -> None:
    conn = handshake(no_zeroes=False)  # GO never pads, NO_ZEROES or not
    events = conn.receive_data(
        option(opt, info_request("disk", Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))
    )
    sent = split_replies(out(conn))
    assert sent[-1] == reply(opt, Rep.ACK)
    assert sorted(sent[:-1]) == sorted(
        info_replies(opt, DISK, DISK_WIRE_FLAGS, max_block=wire.MAX_PAYLOAD)
    )
    if opt == Opt.GO:
        assert events == [TransmissionStarted(DISK, False, (), False, Opt.GO, "disk")]
        assert conn.phase is Phase.TRANSMISSION
    else:
        assert events == [OptionHaggled(Opt.INFO, Rep.ACK, "disk")]
        assert conn.phase is Phase.OPTIONS


def test_info_without_requests_still_sends_export_info() -> None:
    conn = handshake()
    conn.receive_data(option(Opt.INFO, info_request("rw")))
    replies = parse_replies(out(conn))
    assert replies[-1] == (Opt.INFO, Rep.ACK, b"")
    infos = {struct.unpack_from(">H", body)[0]: body for _, rep, body in replies[:-1]}
    assert all(rep == Rep.INFO for _, rep, _ in replies[:-1])
    rw_flags = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0400 | 0x0800
    assert infos[Info.EXPORT] == struct.pack(">HQH", 0, SIZE, rw_flags)
    assert Info.NAME not in infos and Info.DESCRIPTION not in infos


def test_go_default_export_and_alias_report_the_canonical_name() -> None:
    conn = handshake()
    conn.receive_data(option(Opt.INFO, info_request("", Info.NAME)))
    assert reply(Opt.INFO, Rep.INFO, b"\x00\x01disk") in split_replies(out(conn))
    (ev,) = conn.receive_data(option(Opt.GO, info_request("lab", Info.NAME)))
    assert isinstance(ev, TransmissionStarted) and ev.export == LAB and ev.requested == "lab"
    assert reply(Opt.GO, Rep.INFO, b"\x00\x01lab@7") in split_replies(out(conn))


def test_go_read_only_export_does_not_advertise_write_features() -> None:
    ro = ExportInfo("ro", SIZE, TF.READ_ONLY | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES)
    conn = ServerConnection(Catalog([ro], {}))
    conn.receive_data(struct.pack(">I", 3) + option(Opt.GO, info_request("ro")))
    assert reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, SIZE, 0x0003)) in split_replies(
        out(conn)[len(GREETING):]
    )


def test_block_size_maximum_is_bounded_by_max_payload() -> None:
    conn = handshake(max_payload=65536)
    conn.receive_data(option(Opt.INFO, info_request("disk", Info.BLOCK_SIZE)))
    assert reply(Opt.INFO, Rep.INFO, struct.pack(">HIII", 3, 1, 4096, 65536)) in split_replies(
        out(conn)
    )


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_info_go_unknown_export_is_err_unknown_and_haggling_goes_on(opt: Opt) -> None:
    conn = handshake()
    events = conn.receive_data(option(opt, info_request("nope", Info.NAME)))
    assert assert_refused(out(conn), opt, Rep.ERR_UNKNOWN)
    assert events == [OptionHaggled(opt, Rep.ERR_UNKNOWN, "unknown export 'nope'")]
    assert conn.phase is Phase.OPTIONS
    (ev,) = conn.receive_data(option(Opt.GO, info_request("disk")))
    assert isinstance(ev, TransmissionStarted)


class RefusingCatalog(Catalog):
    """Refuses ``rw`` to this client (ExportUnavailable), as a server does to a client whose
    copy-on-write overlay is gone."""

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "rw":
            raise ExportUnavailable("your overlay was lost; boot anew")
        return super().lookup(name)


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_an_export_refused_to_this_client_is_err_policy_with_the_reason(opt: Opt) -> None:
    conn = ServerConnection(RefusingCatalog([DISK, RW], {}))
    conn.receive_data(struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES))
    out(conn)
    events = conn.receive_data(option(opt, info_request("rw", Info.NAME)))
    assert assert_refused(out(conn), opt, Rep.ERR_POLICY) == "your overlay was lost; boot anew"
    assert events == [OptionHaggled(opt, Rep.ERR_POLICY, "your overlay was lost; boot anew")]
    assert conn.phase is Phase.OPTIONS  # haggling goes on: another export is fine
    (ev,) = conn.receive_data(option(Opt.GO, info_request("disk")))
    assert isinstance(ev, TransmissionStarted)


def test_export_name_refused_to_this_client_drops_the_connection() -> None:
    conn = ServerConnection(RefusingCatalog([DISK, RW], {}))
    conn.receive_data(struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE))
    out(conn)
    with pytest.raises(RemoteProtocolError, match="overlay was lost"):
        conn.receive_data(option(Opt.EXPORT_NAME, b"rw"))
    assert conn.phase is Phase.CLOSED


MALFORMED_INFO = {
    "empty": b"",
    "short": b"\x00\x00\x00\x00\x00",
    "name-past-end": struct.pack(">I", 5) + b"disk" + b"\x00\x00",
    "huge-name-length": struct.pack(">I", 0xFFFFFFFF) + b"disk\x00\x00",
    "count-too-big": info_request("disk") [:-2] + struct.pack(">H", 2) + b"\x00\x01",
    "count-too-small": info_request("disk", Info.NAME)[:-4] + b"\x00\x00\x00\x01",
    "odd-trailing": info_request("disk", Info.NAME) + b"\x00",
    "not-utf8": info_request(b"\xc3\x28"),
}


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
@pytest.mark.parametrize("data", MALFORMED_INFO.values(), ids=MALFORMED_INFO.keys())
def test_info_go_malformed_is_err_invalid(opt: Opt, data: bytes) -> None:
    conn = handshake()
    conn.receive_data(option(opt, data))
    assert_refused(out(conn), opt, Rep.ERR_INVALID)
    assert conn.phase is Phase.OPTIONS


def test_info_name_over_4096_bytes_is_err_invalid_but_4096_is_looked_up() -> None:
    conn = handshake()
    conn.receive_data(option(Opt.GO, info_request("x" * 4097)))
    assert "4096" in assert_refused(out(conn), Opt.GO, Rep.ERR_INVALID)
    conn.receive_data(option(Opt.GO, info_request("x" * 4096)))
    assert_refused(out(conn), Opt.GO, Rep.ERR_UNKNOWN)


# ----------------------------------------------------------------------- NBD_OPT_LIST


def test_list_replies_server_per_export_then_ack() -> None:
    conn = handshake()
    events = conn.receive_data(option(Opt.LIST))
    assert out(conn) == (
        reply(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x04disk" + b"the disk")
        + reply(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x02rw")
        + reply(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x04bare")
        + reply(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x05lab@7" + b"lab, version 7")
        + reply(Opt.LIST, Rep.ACK)
    )
    assert events == [OptionHaggled(Opt.LIST, Rep.ACK)]


def test_list_of_empty_catalog_is_a_lone_ack() -> None:
    conn = ServerConnection(Catalog([], {}))
    conn.receive_data(struct.pack(">I", 1) + option(Opt.LIST))
    assert out(conn) == GREETING + reply(Opt.LIST, Rep.ACK)


def test_list_with_data_is_err_invalid() -> None:
    conn = handshake()
    conn.receive_data(option(Opt.LIST, b"disk"))
    assert_refused(out(conn), Opt.LIST, Rep.ERR_INVALID)


# ----------------------------------------------------------------------- NBD_OPT_ABORT


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_acks_and_disconnects(data: bytes) -> None:
    conn = handshake()
    events = conn.receive_data(option(Opt.ABORT, data) + option(Opt.LIST))
    assert events == [Disconnect(clean=True)]
    assert out(conn) == reply(Opt.ABORT, Rep.ACK)  # and nothing for the LIST after it
    assert conn.closed
    assert conn.receive_data(option(Opt.LIST)) == []
    assert out(conn) == b""


# -------------------------------------------------------------------- NBD_OPT_STARTTLS


def test_starttls_without_tls_is_err_policy() -> None:
    conn = handshake()
    assert conn.receive_data(option(Opt.STARTTLS)) == [
        OptionHaggled(Opt.STARTTLS, Rep.ERR_POLICY, "TLS is not configured on this server")
    ]
    assert_refused(out(conn), Opt.STARTTLS, Rep.ERR_POLICY)
    assert conn.phase is Phase.OPTIONS


def test_starttls_with_data_is_err_invalid() -> None:
    conn = handshake(tls=True)
    conn.receive_data(option(Opt.STARTTLS, b"x"))
    assert_refused(out(conn), Opt.STARTTLS, Rep.ERR_INVALID)
    assert conn.phase is Phase.OPTIONS


def test_starttls_acks_then_forgets_negotiation_done_before_tls() -> None:
    conn = handshake(tls=True)
    structured(conn)
    assert set_meta(conn, "disk", BASE_ALLOCATION).endswith(reply(Opt.SET_META_CONTEXT, Rep.ACK))
    assert conn.meta_contexts == (BASE_ALLOCATION,)
    events = conn.receive_data(option(Opt.STARTTLS))
    assert events == [StartTLS()]
    assert out(conn) == reply(Opt.STARTTLS, Rep.ACK)
    assert conn.phase is Phase.TLS_PENDING
    # Plaintext that arrives before the TLS handshake is not option haggling.
    assert conn.receive_data(option(Opt.LIST)) == []
    assert out(conn) == b""
    conn.tls_started()
    assert conn.tls_active and not conn.structured
    assert len(conn.meta_contexts) == 0
    # Structured replies can (must) be negotiated again, and are not "already" on.
    structured(conn)
    (ev,) = conn.receive_data(option(Opt.GO, info_request("disk")))
    assert isinstance(ev, TransmissionStarted)
    assert ev.structured_replies and ev.meta_contexts == ()


def test_tls_state_reset_is_seen_by_go() -> None:
    conn = handshake(tls=True)
    structured(conn)
    conn.receive_data(option(Opt.STARTTLS))
    conn.tls_started()
    out(conn)
    (ev,) = conn.receive_data(option(Opt.GO, info_request("disk")))
    assert isinstance(ev, TransmissionStarted) and not ev.structured_replies
    assert reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, SIZE, DISK_WIRE_FLAGS)) in (
        split_replies(out(conn))
    ), "SEND_DF must be clear once structured replies were forgotten"


def test_second_starttls_is_err_invalid() -> None:
    conn = handshake(tls=True)
    conn.receive_data(option(Opt.STARTTLS))
    conn.tls_started()
    out(conn)
    conn.receive_data(option(Opt.STARTTLS))
    assert_refused(out(conn), Opt.STARTTLS, Rep.ERR_INVALID)


def test_tls_started_without_starttls_is_a_local_error() -> None:
    conn = handshake(tls=True)
    with pytest.raises(LocalProtocolError):
        conn.tls_started()


def test_tls_required_needs_tls() -> None:
    with pytest.raises(ValueError):
        ServerConnection(CATALOG, tls_required=True)


TLS_REQD_OPTIONS = {
    "LIST": (Opt.LIST, b""),
    "INFO": (Opt.INFO, info_request("disk")),
    "GO": (Opt.GO, info_request("disk")),
    "INFO-unknown": (Opt.INFO, info_request("nope")),
    "STRUCTURED_REPLY": (Opt.STRUCTURED_REPLY, b""),
    "LIST_META_CONTEXT": (Opt.LIST_META_CONTEXT, meta_request("disk")),
    "SET_META_CONTEXT": (Opt.SET_META_CONTEXT, meta_request("disk", BASE_ALLOCATION)),
    "PEEK_EXPORT": (Opt.PEEK_EXPORT, b""),
    "EXTENDED_HEADERS": (Opt.EXTENDED_HEADERS, b""),
    "unknown": (0x1234, b"junk"),
}


@pytest.mark.parametrize("opt,data", TLS_REQD_OPTIONS.values(), ids=TLS_REQD_OPTIONS.keys())
def test_tls_required_refuses_every_option_but_starttls_and_abort(opt: int, data: bytes) -> None:
    conn = handshake(tls=True, tls_required=True)
    conn.receive_data(option(opt, data))
    assert_refused(out(conn), opt, Rep.ERR_TLS_REQD)
    assert conn.phase is Phase.OPTIONS and not conn.structured


def test_tls_required_export_name_drops_the_connection() -> None:
    conn = handshake(tls=True, tls_required=True)
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert conn.closed and out(conn) == b""


def test_tls_required_abort_and_starttls_are_answered() -> None:
    conn = handshake(tls=True, tls_required=True)
    assert conn.receive_data(option(Opt.STARTTLS)) == [StartTLS()]
    assert out(conn) == reply(Opt.STARTTLS, Rep.ACK)
    conn.tls_started()
    conn.receive_data(option(Opt.LIST))
    assert parse_replies(out(conn))[-1] == (Opt.LIST, Rep.ACK, b"")
    (ev,) = conn.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert isinstance(ev, TransmissionStarted)
    conn2 = handshake(tls=True, tls_required=True)
    assert conn2.receive_data(option(Opt.ABORT)) == [Disconnect(clean=True)]
    assert out(conn2) == reply(Opt.ABORT, Rep.ACK)


# ------------------------------------------------------------- NBD_OPT_STRUCTURED_REPLY


def test_structured_reply_ack_then_second_is_err_invalid() -> None:
    conn = handshake()
    assert conn.receive_data(option(Opt.STRUCTURED_REPLY)) == [
        OptionHaggled(Opt.STRUCTURED_REPLY, Rep.ACK, "structured replies")
    ]
    assert out(conn) == reply(Opt.STRUCTURED_REPLY, Rep.ACK)
    conn.receive_data(option(Opt.STRUCTURED_REPLY))
    assert_refused(out(conn), Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert conn.structured


def test_structured_reply_with_data_is_err_invalid() -> None:
    conn = handshake()
    conn.receive_data(option(Opt.STRUCTURED_REPLY, b"\x00"))
    assert_refused(out(conn), Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert not conn.structured


# -------------------------------------------------------------- NBD_OPT_*_META_CONTEXT


BASE_ALLOC = b"base:allocation"


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_before_structured_replies_is_err_invalid(opt: Opt) -> None:
    conn = handshake()
    conn.receive_data(option(opt, meta_request("disk", BASE_ALLOCATION)))
    assert_refused(out(conn), opt, Rep.ERR_INVALID)
    assert conn.meta_contexts == ()


@pytest.mark.parametrize("queries", [(), ("base:",), (BASE_ALLOCATION,), ("x-a:b", "base:")])
def test_list_meta_context_lists_base_allocation_with_id_zero(queries: tuple[str, ...]) -> None:
    conn = handshake()
    structured(conn)
    conn.receive_data(option(Opt.LIST_META_CONTEXT, meta_request("disk", *queries)))
    assert out(conn) == (
        reply(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\x00\x00\x00\x00" + BASE_ALLOC)
        + reply(Opt.LIST_META_CONTEXT, Rep.ACK)
    )
    assert conn.meta_contexts == (), "LIST selects nothing"


def test_list_meta_context_other_namespace_finds_nothing() -> None:
    conn = handshake()
    structured(conn)
    conn.receive_data(option(Opt.LIST_META_CONTEXT, meta_request("disk", "qemu:dirty-bitmap:a")))
    assert out(conn) == reply(Opt.LIST_META_CONTEXT, Rep.ACK)


def set_meta_context_id(sent: bytes) -> int:
    (meta, ack) = parse_replies(sent)
    assert ack == (Opt.SET_META_CONTEXT, Rep.ACK, b"")
    assert meta[:2] == (Opt.SET_META_CONTEXT, Rep.META_CONTEXT)
    assert meta[2][4:] == BASE_ALLOC
    ctx_id: int = struct.unpack_from(">I", meta[2])[0]
    return ctx_id


def test_set_meta_context_selects_base_allocation_for_go() -> None:
    conn = handshake()
    structured(conn)
    sent = set_meta(conn, "disk", "x-foo:bar", BASE_ALLOCATION, BASE_ALLOCATION)
    set_meta_context_id(sent)  # one META_CONTEXT, even when asked for twice, then ACK
    (ev,) = conn.receive_data(option(Opt.GO, info_request("disk")))
    assert isinstance(ev, TransmissionStarted) and ev.meta_contexts == (BASE_ALLOCATION,)


@pytest.mark.parametrize(
    "queries", [(), ("base:",), ("x-foo:bar",), ("qemu:dirty-bitmap:b",), ("base:nope",)]
)
def test_set_meta_context_without_base_allocation_selects_nothing(
    queries: tuple[str, ...],
) -> None:
    conn = handshake()
    structured(conn)
    assert set_meta(conn, "disk", *queries) == reply(Opt.SET_META_CONTEXT, Rep.ACK)
    assert conn.meta_contexts == ()


def test_set_meta_context_unknown_export_is_err_unknown() -> None:
    conn = handshake()
    structured(conn)
    assert_refused(set_meta(conn, "nope", BASE_ALLOCATION), Opt.SET_META_CONTEXT, Rep.ERR_UNKNOWN)


MALFORMED_META = {
    "short": b"\x00\x00\x00\x04disk",
    "name-past-end": struct.pack(">I", 9) + b"disk" + struct.pack(">I", 0),
    "count-past-end": meta_request("disk")[:-4] + struct.pack(">I", 1),
    "query-past-end": meta_request("disk", BASE_ALLOCATION)[:-1],
    "trailing": meta_request("disk", BASE_ALLOCATION) + b"\x00",
    "query-not-utf8": meta_request("disk")[:-4] + struct.pack(">II", 1, 2) + b"\xc3\x28",
}


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
@pytest.mark.parametrize("data", MALFORMED_META.values(), ids=MALFORMED_META.keys())
def test_meta_context_malformed_is_err_invalid(opt: Opt, data: bytes) -> None:
    conn = handshake()
    structured(conn)
    conn.receive_data(option(opt, data))
    assert_refused(out(conn), opt, Rep.ERR_INVALID)


def test_failed_set_meta_context_still_replaces_the_selection() -> None:
    conn = handshake()
    structured(conn)
    set_meta(conn, "disk", BASE_ALLOCATION)
    assert conn.meta_contexts == (BASE_ALLOCATION,)
    conn.receive_data(option(Opt.SET_META_CONTEXT, MALFORMED_META["trailing"]))
    assert_refused(out(conn), Opt.SET_META_CONTEXT, Rep.ERR_INVALID)
    assert len(conn.meta_contexts) == 0


def test_meta_contexts_dropped_when_go_names_another_export() -> None:
    conn = handshake()
    structured(conn)
    set_meta(conn, "disk", BASE_ALLOCATION)
    (ev,) = conn.receive_data(option(Opt.GO, info_request("rw")))
    assert isinstance(ev, TransmissionStarted) and ev.meta_contexts == ()
    out(conn)
    rejected(conn.receive_data(request(Cmd.BLOCK_STATUS, length=512)))


def test_meta_contexts_kept_when_go_repeats_the_alias() -> None:
    conn = handshake()
    structured(conn)
    set_meta(conn, "lab", BASE_ALLOCATION)
    (ev,) = conn.receive_data(option(Opt.GO, info_request("lab")))
    assert isinstance(ev, TransmissionStarted)
    assert ev.export == LAB and ev.meta_contexts == (BASE_ALLOCATION,)


# ---------------------------------------------------------- unknown and oversize options


@pytest.mark.parametrize("opt", [0, Opt.PEEK_EXPORT, Opt.EXTENDED_HEADERS, 0x1234, 0xFFFFFFFF])
def test_unknown_option_is_err_unsup_and_its_payload_skipped(opt: int) -> None:
    conn = handshake()
    # The payload looks like an option itself: it must be skipped, not parsed.
    payload = option(Opt.ABORT) + b"tail"
    events = conn.receive_data(option(opt, payload) + option(Opt.LIST))
    sent = out(conn)
    ((ropt, rrep, msg), *rest) = parse_replies(sent)
    assert (ropt, rrep) == (opt, Rep.ERR_UNSUP) and msg
    assert rest[-1] == (Opt.LIST, Rep.ACK, b"")
    assert [type(e) for e in events] == [OptionHaggled, OptionHaggled]
    assert not conn.closed


@pytest.mark.parametrize("piece", [1, 1000, 4096, 65536])
def test_option_larger_than_max_is_err_too_big_and_discarded_in_pieces(piece: int) -> None:
    conn = handshake()
    length = wire.MAX_OPTION_LENGTH + 1 + 123
    head = option(0x1234, length=length)
    # The header and the first bytes of the payload arrive together.
    events = conn.receive_data(head + b"\x01" * 5)
    assert events == [OptionHaggled(0x1234, Rep.ERR_TOO_BIG, f"option data of {length} bytes")]
    assert_refused(out(conn), 0x1234, Rep.ERR_TOO_BIG)
    left = length - 5
    junk = option(Opt.ABORT) * (left // 16 + 1)  # would abort if it were parsed
    junk = junk[:left]
    for i in range(0, left, piece):
        assert conn.receive_data(junk[i : i + piece]) == []
        assert out(conn) == b""
    assert not conn.closed
    conn.receive_data(option(Opt.LIST))
    assert parse_replies(out(conn))[-1] == (Opt.LIST, Rep.ACK, b"")


def test_oversize_option_and_next_option_in_one_chunk() -> None:
    conn = handshake()
    length = wire.MAX_OPTION_LENGTH + 1
    conn.receive_data(option(Opt.INFO, bytes(length)) + option(Opt.STRUCTURED_REPLY))
    replies = parse_replies(out(conn))
    assert [(o, r) for o, r, _ in replies] == [
        (Opt.INFO, Rep.ERR_TOO_BIG), (Opt.STRUCTURED_REPLY, Rep.ACK),
    ]


def test_option_of_exactly_max_length_is_parsed() -> None:
    conn = handshake()
    conn.receive_data(option(Opt.LIST, bytes(wire.MAX_OPTION_LENGTH)))
    assert_refused(out(conn), Opt.LIST, Rep.ERR_INVALID)  # LIST with data, not TOO_BIG


# ------------------------------------------------------------------------- transmission


def test_read_simple_reply_bytes_exact() -> None:
    conn = transmission("disk")
    ev = accepted(conn.receive_data(request(Cmd.READ, COOKIE, 4096, 512)))
    assert ev == Request(COOKIE, Cmd.READ, CmdFlag(0), 4096, 512, b"")
    conn.reply_read(ev, [b"a" * 100, memoryview(b"b" * 412)])
    assert out(conn) == (
        b"\x67\x44\x66\x98" + b"\x00\x00\x00\x00" + bytes.fromhex("deadbeefcafef00d")
        + b"a" * 100 + b"b" * 412
    )


def test_read_structured_reply_is_one_offset_data_chunk_with_done() -> None:
    conn = transmission("disk", structured_replies=True)
    ev = accepted(conn.receive_data(request(Cmd.READ, COOKIE, 4096, 512, CmdFlag.DF)))
    assert ev.flags == CmdFlag.DF
    conn.reply_read(ev, [b"x" * 512])
    assert out(conn) == (
        b"\x66\x8e\x33\xef" + b"\x00\x01" + b"\x00\x01" + bytes.fromhex("deadbeefcafef00d")
        + struct.pack(">I", 8 + 512) + struct.pack(">Q", 4096) + b"x" * 512
    )


def test_reply_ok_bytes_exact() -> None:
    conn = transmission("rw")
    ev = accepted(conn.receive_data(request(Cmd.FLUSH, 7)))
    conn.reply_ok(ev)
    assert out(conn) == SIMPLE_MAGIC + bytes(4) + struct.pack(">Q", 7)


def test_reply_error_for_read_structured_and_simple() -> None:
    conn = transmission("disk", structured_replies=True)
    ev = accepted(conn.receive_data(request(Cmd.READ, 9, 0, 512)))
    conn.reply_error(ev, Errno.EIO, "disk on fire")
    assert out(conn) == chunk(9, 0x8001, struct.pack(">IH", 5, 12) + b"disk on fire")
    conn = transmission("disk")
    ev = accepted(conn.receive_data(request(Cmd.READ, 9, 0, 512)))
    conn.reply_error(ev, Errno.EIO, "disk on fire")
    assert out(conn) == simple(9, 5), "no payload after a simple error reply"


def test_reply_error_for_write_is_simple() -> None:
    conn = transmission("rw", structured_replies=True)
    ev = accepted(conn.receive_data(request(Cmd.WRITE, 3, 0, 2, data=b"hi")))
    conn.reply_error(ev, Errno.ENOSPC)
    assert out(conn) == simple(3, 28)


@pytest.mark.parametrize(
    "offset,length",
    [(SIZE - 100, 200), (SIZE, 1), (SIZE + 4096, 512), (2**64 - 1, 2), (2**64 - 512, 1024)],
    ids=["straddles", "at-end", "past-end", "wraps-2^64", "wraps-2^64-b"],
)
@pytest.mark.parametrize("structured_replies", [False, True])
def test_read_past_the_end_is_einval(offset: int, length: int, structured_replies: bool) -> None:
    conn = transmission("disk", structured_replies=structured_replies)
    ev = rejected(conn.receive_data(request(Cmd.READ, 5, offset, length)))
    assert (ev.cookie, ev.command, ev.error) == (5, Cmd.READ, Errno.EINVAL)
    if structured_replies:
        assert assert_error_chunk(out(conn), 5, Errno.EINVAL)
    else:
        assert out(conn) == simple(5, 22)


def test_read_of_the_last_byte_is_accepted() -> None:
    conn = transmission("disk")
    ev = accepted(conn.receive_data(request(Cmd.READ, 1, SIZE - 1, 1)))
    assert (ev.offset, ev.length) == (SIZE - 1, 1)


@pytest.mark.parametrize(
    "cmd", [Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS]
)
def test_length_zero_is_einval(cmd: Cmd) -> None:
    conn = transmission("rw", meta=True)
    events = conn.receive_data(request(cmd, 2, 0, 0) + request(Cmd.FLUSH, 3))
    assert [type(e) for e in events] == [RequestRejected, Request]
    ev = events[0]
    assert isinstance(ev, RequestRejected) and (ev.cookie, ev.error) == (2, Errno.EINVAL)
    if cmd in (Cmd.READ, Cmd.BLOCK_STATUS):  # structured replies are on
        assert_error_chunk(out(conn), 2, Errno.EINVAL)
    else:
        assert out(conn) == simple(2, 22)


@pytest.mark.parametrize("cmd", [9, 100, 0x7FFF, 0xFFFF, Cmd.RESIZE])
@pytest.mark.parametrize("structured_replies", [False, True])
def test_unknown_command_is_einval(cmd: int, structured_replies: bool) -> None:
    conn = transmission("rw", structured_replies=structured_replies)
    events = conn.receive_data(request(cmd, 4, 0, 512) + request(Cmd.FLUSH, 5))
    assert [type(e) for e in events] == [RequestRejected, Request]
    assert events[0] == RequestRejected(4, cmd, Errno.EINVAL, f"unknown command {cmd}")
    assert out(conn) == simple(4, 22)


BAD_FLAGS = {
    # (export, structured, command, flags)
    "DF-without-structured": ("disk", False, Cmd.READ, CmdFlag.DF),
    "FUA-on-read-only": ("disk", False, Cmd.READ, CmdFlag.FUA),
    "FUA-without-SEND_FUA": ("bare", False, Cmd.WRITE, CmdFlag.FUA),
    "unknown-bit-15": ("rw", False, Cmd.READ, 1 << 15),
    "unknown-bit-6": ("rw", True, Cmd.READ, 1 << 6),
    "REQ_ONE-on-read": ("rw", True, Cmd.READ, CmdFlag.REQ_ONE),
    "NO_HOLE-on-write": ("rw", False, Cmd.WRITE, CmdFlag.NO_HOLE),
    "DF-on-write": ("rw", True, Cmd.WRITE, CmdFlag.DF),
    "FAST_ZERO-on-trim": ("rw", False, Cmd.TRIM, CmdFlag.FAST_ZERO),
    "PAYLOAD_LEN-not-negotiated": ("rw", False, Cmd.WRITE, CmdFlag.PAYLOAD_LEN),
}


@pytest.mark.parametrize(
    "export,structured_replies,cmd,flags", BAD_FLAGS.values(), ids=BAD_FLAGS.keys()
)
def test_bad_command_flags_are_einval(
    export: str, structured_replies: bool, cmd: Cmd, flags: int
) -> None:
    conn = transmission(export, structured_replies=structured_replies)
    data = b"w" * 512 if cmd is Cmd.WRITE else b""
    events = conn.receive_data(request(cmd, 6, 0, 512, flags, data) + request(Cmd.READ, 7, 0, 1))
    assert [type(e) for e in events] == [RequestRejected, Request], "payload was consumed"
    ev = events[0]
    assert isinstance(ev, RequestRejected) and (ev.cookie, ev.error) == (6, Errno.EINVAL)
    if structured_replies and cmd is Cmd.READ:
        assert_error_chunk(out(conn), 6, Errno.EINVAL)  # never a simple reply to a READ
    else:
        assert out(conn) == simple(6, 22)


GOOD_FLAGS = {
    "DF-on-read": ("rw", Cmd.READ, CmdFlag.DF),
    "FUA-on-write": ("rw", Cmd.WRITE, CmdFlag.FUA),
    "FUA-on-read": ("rw", Cmd.READ, CmdFlag.FUA),
    "FUA-on-flush": ("rw", Cmd.FLUSH, CmdFlag.FUA),
    "FUA-on-cache": ("rw", Cmd.CACHE, CmdFlag.FUA),
    "FUA-on-trim": ("rw", Cmd.TRIM, CmdFlag.FUA),
    "NO_HOLE-FAST_ZERO-FUA-on-write-zeroes": (
        "rw", Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO | CmdFlag.FUA
    ),
    "REQ_ONE-on-block-status": ("rw", Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE),
}


@pytest.mark.parametrize("export,cmd,flags", GOOD_FLAGS.values(), ids=GOOD_FLAGS.keys())
def test_documented_and_negotiated_flags_are_accepted(export: str, cmd: Cmd, flags: int) -> None:
    conn = transmission(export, meta=True)
    length = 0 if cmd is Cmd.FLUSH else 512
    data = b"w" * 512 if cmd is Cmd.WRITE else b""
    ev = accepted(conn.receive_data(request(cmd, 8, 0, length, flags, data)))
    assert (ev.command, ev.flags, ev.length) == (cmd, CmdFlag(flags), length)
    assert bytes(ev.data) == data
    assert out(conn) == b""


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_writes_to_a_read_only_export_are_eperm_and_the_payload_consumed(cmd: Cmd) -> None:
    conn = transmission("disk")
    # The payload holds what looks like a DISC request: it must be skipped as data.
    data = request(Cmd.DISC) * 4 if cmd is Cmd.WRITE else b""
    length = len(data) if cmd is Cmd.WRITE else 112
    events = conn.receive_data(request(cmd, 10, 0, length, 0, data) + request(Cmd.READ, 11, 0, 4))
    assert [type(e) for e in events] == [RequestRejected, Request]
    assert events[0] == RequestRejected(10, cmd, Errno.EPERM, "export is read-only")
    assert isinstance(events[1], Request) and events[1].cookie == 11
    assert out(conn) == simple(10, 1)
    assert not conn.closed


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.WRITE_ZEROES])
def test_write_past_the_end_of_a_writable_export_is_enospc(cmd: Cmd) -> None:
    conn = transmission("rw")
    data = b"z" * 512 if cmd is Cmd.WRITE else b""
    events = conn.receive_data(request(cmd, 12, SIZE - 256, 512, 0, data) + request(Cmd.FLUSH, 13))
    assert [type(e) for e in events] == [RequestRejected, Request]
    assert isinstance(events[0], RequestRejected) and events[0].error is Errno.ENOSPC
    assert out(conn) == simple(12, 28)


def test_trim_past_the_end_is_einval() -> None:
    conn = transmission("rw")
    rejected(conn.receive_data(request(Cmd.TRIM, 14, SIZE, 512)))
    assert out(conn) == simple(14, 22)


@pytest.mark.parametrize("cmd", [Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE])
def test_commands_not_advertised_are_einval(cmd: Cmd) -> None:
    conn = transmission("bare")
    length = 0 if cmd is Cmd.FLUSH else 512
    ev = rejected(conn.receive_data(request(cmd, 15, 0, length)))
    assert ev.error is Errno.EINVAL and "not negotiated" in ev.reason
    assert out(conn) == simple(15, 22)


def test_read_over_the_maximum_payload_is_einval() -> None:
    conn = transmission("rw", max_payload=4096)
    ev = accepted(conn.receive_data(request(Cmd.READ, 16, 0, 4096)))
    assert ev.length == 4096
    rejected(conn.receive_data(request(Cmd.READ, 17, 0, 4097)))
    assert out(conn) == simple(17, 22)


def test_write_over_the_maximum_payload_is_einval_and_drained() -> None:
    conn = transmission("rw", max_payload=4096)
    data = b"\x25\x60\x95\x13" * 1025  # 4100 bytes that start like a request
    events = conn.receive_data(request(Cmd.WRITE, 18, 0, len(data), 0, data) + request(Cmd.FLUSH))
    assert [type(e) for e in events] == [RequestRejected, Request]
    assert out(conn) == simple(18, 22)


def test_write_with_a_payload_over_max_drain_drops_the_connection() -> None:
    conn = transmission("rw")
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(request(Cmd.WRITE, 19, 0, wire.MAX_DRAIN + 1))
    assert conn.closed
    assert conn.receive_data(b"\x00" * 100) == []


def test_write_of_exactly_max_drain_is_drained() -> None:
    conn = transmission("rw")
    # refused on its header, answered at once, then its payload is read and dropped
    ev = rejected(conn.receive_data(request(Cmd.WRITE, 20, 0, wire.MAX_DRAIN)))
    assert ev.error is Errno.ENOSPC  # past the 1 MiB export, but drained: the connection goes on
    assert out(conn) == simple(20, 28)
    step = 1 << 20
    for _ in range(wire.MAX_DRAIN // step):
        assert conn.receive_data(bytes(step)) == []
    assert not conn.closed
    accepted(conn.receive_data(request(Cmd.FLUSH, 21)))


@pytest.mark.parametrize("structured_replies", [False, True])
def test_block_status_without_meta_context_is_einval(structured_replies: bool) -> None:
    conn = transmission("rw", structured_replies=structured_replies)
    ev = rejected(conn.receive_data(request(Cmd.BLOCK_STATUS, 21, 0, 4096)))
    assert ev.error is Errno.EINVAL
    if structured_replies:
        assert "metadata context" in assert_error_chunk(out(conn), 21, Errno.EINVAL)
    else:
        assert out(conn) == simple(21, 22)


def test_block_status_reply_bytes_exact_with_the_announced_context_id() -> None:
    conn = handshake()
    structured(conn)
    ctx_id = set_meta_context_id(set_meta(conn, "rw", BASE_ALLOCATION))
    conn.receive_data(option(Opt.GO, info_request("rw")))
    out(conn)
    ev = accepted(conn.receive_data(request(Cmd.BLOCK_STATUS, COOKIE, 4096, 65536)))
    assert (ev.command, ev.offset, ev.length) == (Cmd.BLOCK_STATUS, 4096, 65536)
    conn.reply_block_status(ev, [(4096, 0), (8192, 3), (53248, 1)])
    assert out(conn) == (
        b"\x66\x8e\x33\xef" + b"\x00\x01" + b"\x00\x05" + bytes.fromhex("deadbeefcafef00d")
        + struct.pack(">I", 4 + 3 * 8) + struct.pack(">I", ctx_id)
        + struct.pack(">II", 4096, 0) + struct.pack(">II", 8192, 3)
        + struct.pack(">II", 53248, 1)
    )


def test_block_status_req_one_keeps_one_extent_within_the_request() -> None:
    conn = transmission("rw", meta=True)
    ev = accepted(conn.receive_data(request(Cmd.BLOCK_STATUS, 22, 0, 1024, CmdFlag.REQ_ONE)))
    conn.reply_block_status(ev, [(4096, 3), (4096, 0)])
    assert out(conn) == chunk(22, ReplyType.BLOCK_STATUS, struct.pack(">III", 1, 1024, 3))
    ev = accepted(conn.receive_data(request(Cmd.BLOCK_STATUS, 23, 0, 8192, CmdFlag.REQ_ONE)))
    conn.reply_block_status(ev, [(512, 1), (4096, 0)])
    assert out(conn) == chunk(23, ReplyType.BLOCK_STATUS, struct.pack(">III", 1, 512, 1))


def test_block_status_past_the_end_is_einval() -> None:
    conn = transmission("rw", meta=True)
    rejected(conn.receive_data(request(Cmd.BLOCK_STATUS, 24, SIZE - 512, 1024)))
    assert_error_chunk(out(conn), 24, Errno.EINVAL)


def test_disc_is_a_clean_disconnect_and_nothing_after_it_is_read() -> None:
    conn = transmission("rw")
    events = conn.receive_data(
        request(Cmd.READ, 25, 0, 8) + request(Cmd.DISC, 26) + request(Cmd.READ, 27, 0, 8)
    )
    assert [type(e) for e in events] == [Request, Disconnect]
    assert events[1] == Disconnect(clean=True)
    assert conn.closed
    assert conn.receive_data(request(Cmd.READ, 28, 0, 8)) == []
    assert conn.receive_data(b"") == []
    assert out(conn) == b"", "no reply to NBD_CMD_DISC"


def test_eof_in_transmission_is_an_unclean_disconnect() -> None:
    conn = transmission("rw")
    assert conn.receive_data(request(Cmd.READ, 29, 0, 8)[:10]) == []
    assert conn.receive_data(b"") == [Disconnect(clean=False)]
    assert conn.closed


@pytest.mark.parametrize("magic", [0, 0x12560953, 0x21E41C71, 0x67446698])
def test_bad_request_magic_drops_the_connection(magic: int) -> None:
    conn = transmission("rw")
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(struct.pack(">IHHQQI", magic, 0, Cmd.READ, 1, 0, 8))
    assert conn.closed


# ----------------------------------------------------------------- framing and splitting


def session_bytes() -> bytes:
    """A whole session: flags, options (one unknown, one oversize), GO, then requests."""
    return (
        struct.pack(">I", 3)
        + option(0x99, b"??")
        + option(0x1234, bytes(wire.MAX_OPTION_LENGTH + 3))
        + option(Opt.STRUCTURED_REPLY)
        + option(Opt.LIST_META_CONTEXT, meta_request("rw"))
        + option(Opt.SET_META_CONTEXT, meta_request("rw", BASE_ALLOCATION))
        + option(Opt.INFO, info_request("rw", Info.NAME))
        + option(Opt.GO, info_request("rw", Info.BLOCK_SIZE))
        + transmission_bytes()
    )


def transmission_bytes() -> bytes:
    return (
        request(Cmd.READ, 1, 0, 512)
        + request(Cmd.WRITE, 2, 4096, 100, CmdFlag.FUA, bytes(range(100)))
        + request(Cmd.FLUSH, 3)
        + request(Cmd.TRIM, 4, 0, 4096)
        + request(Cmd.WRITE_ZEROES, 5, 8192, 4096, CmdFlag.NO_HOLE)
        + request(Cmd.CACHE, 6, 0, 65536)
        + request(Cmd.BLOCK_STATUS, 7, 0, SIZE, CmdFlag.REQ_ONE)
        + request(42, 8, 0, 1)
        + request(Cmd.READ, 9, SIZE, 1)
        + request(Cmd.WRITE, 10, SIZE - 1, 3, 0, b"abc")
        + request(Cmd.READ, 11, 0, 1, CmdFlag.DF)
        + request(Cmd.DISC, 12)
    )


def feed(conn: ServerConnection, pieces: list[bytes]) -> tuple[list[Event], bytes]:
    events: list[Event] = []
    sent = b""
    for p in pieces:
        events += conn.receive_data(p)
        sent += out(conn)
    # Freeze memoryviews so the events can be compared after the buffers move on.
    frozen: list[Event] = [
        Request(e.cookie, e.command, e.flags, e.offset, e.length, bytes(e.data))
        if isinstance(e, Request) else e
        for e in events
    ]
    return frozen, sent


def test_session_in_one_chunk_parses_every_option_and_request() -> None:
    conn = ServerConnection(CATALOG)
    events, sent = feed(conn, [session_bytes()])
    assert sent.startswith(GREETING)
    kinds = [type(e).__name__ for e in events]
    assert kinds == (
        ["OptionHaggled"] * 6 + ["TransmissionStarted"]
        + ["Request"] * 7 + ["RequestRejected"] * 3 + ["Request", "Disconnect"]
    )
    reqs = [e for e in events if isinstance(e, Request)]
    assert [r.cookie for r in reqs] == [1, 2, 3, 4, 5, 6, 7, 11]
    assert reqs[1].data == bytes(range(100))
    assert [e.error for e in events if isinstance(e, RequestRejected)] == [
        Errno.EINVAL, Errno.EINVAL, Errno.ENOSPC,
    ]


def test_session_fed_one_byte_at_a_time_gives_the_same_events_and_bytes() -> None:
    data = session_bytes()
    whole = feed(ServerConnection(CATALOG), [data])
    bytewise = feed(ServerConnection(CATALOG), [data[i : i + 1] for i in range(len(data))])
    assert bytewise == whole


def test_requests_split_at_every_boundary_give_the_same_events() -> None:
    data = transmission_bytes()
    expected = feed(transmission("rw", meta=True), [data])
    assert len(expected[0]) == 12
    for cut in range(1, len(data)):
        got = feed(transmission("rw", meta=True), [data[:cut], data[cut:]])
        assert got == expected, f"split at {cut}"


def test_many_requests_in_one_chunk_are_all_parsed() -> None:
    conn = transmission("disk")
    n = 5000
    data = b"".join(request(Cmd.READ, i, (i * 512) % SIZE, 512) for i in range(n))
    events = conn.receive_data(data)
    assert len(events) == n
    assert all(isinstance(e, Request) for e in events)
    assert [e.cookie for e in events if isinstance(e, Request)] == list(range(n))
    assert out(conn) == b""


def test_write_payload_reassembled_from_small_pieces() -> None:
    import random

    rng = random.Random(7)
    payload = rng.randbytes(65536 + 17)
    conn = transmission("rw")
    stream = request(Cmd.WRITE, 30, 4096, len(payload), 0, payload) + request(Cmd.FLUSH, 31)
    events: list[Event] = []
    pos = 0
    while pos < len(stream):
        n = rng.randint(1, 97)
        got = conn.receive_data(stream[pos : pos + n])
        pos += n
        if pos < wire.REQUEST.size + len(payload):
            assert got == [], "no event before the whole payload is in"
        events += got
    write, flush = events
    assert isinstance(write, Request) and isinstance(flush, Request)
    assert (write.command, write.offset, write.length) == (Cmd.WRITE, 4096, len(payload))
    assert bytes(write.data) == payload
    assert flush.command is Cmd.FLUSH


def test_reply_buffers_are_queued_without_copying() -> None:
    conn = transmission("disk")
    ev = accepted(conn.receive_data(request(Cmd.READ, 32, 0, 4)))
    buf = bytearray(b"abcd")
    conn.reply_read(ev, [memoryview(buf)])
    header, payload = conn.data_to_send()
    assert bytes(header) == simple(32)
    assert isinstance(payload, memoryview) and payload.obj is buf
