"""Tests of :class:`nbd.client.ClientConnection`.

Two ways: against :class:`nbd.server.ServerConnection` in memory (a pump moves bytes between the
two state machines and a bytearray answers the requests), and against hand-written server bytes
for what our own server never sends: a server without NBD_OPT_GO, structured replies split into
holes and data chunks in any order, error replies of every kind, and protocol violations.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence

import pytest

from nbd.client import ClientConnection, ClientEvent, ClientPhase
from nbd.constants import BASE_ALLOCATION, Cmd, CmdFlag, Errno, Opt, Rep, TransmissionFlag
from nbd.errors import LocalProtocolError, RemoteProtocolError
from nbd.events import (
    Disconnect,
    ExportInfo,
    ExportListed,
    Negotiated,
    OptionRefused,
    Reply,
    Request,
    StartTLS,
)
from nbd.server import Event, ServerConnection

TF = TransmissionFlag
SIZE = 256 * 1024
OPT_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")


class Catalog:
    def __init__(self, exports: Sequence[ExportInfo]) -> None:
        self._exports = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportInfo | None:
        return self._exports.get(name or "disk")

    def exports(self) -> Sequence[tuple[str, str]]:
        return [(e.name, e.description) for e in self._exports.values()]


DISK = ExportInfo("disk", SIZE, TF.READ_ONLY | TF.SEND_FLUSH, "read-only disk")
RW = ExportInfo(
    "rw", SIZE, TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_CACHE,
    "scratch",
)
CATALOG = Catalog([DISK, RW])


class Backend:
    """Answers server Requests from a bytearray (the export's contents)."""

    def __init__(self, size: int, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.data = bytearray(rng.randbytes(size))
        self.data[size // 2 : size // 2 + 65536] = bytes(65536)  # a zero run for BLOCK_STATUS

    def handle(self, server: ServerConnection, events: list[Event]) -> list[Event]:
        for ev in events:
            if not isinstance(ev, Request):
                continue
            a, b = ev.offset, ev.offset + ev.length
            if ev.command is Cmd.READ:
                server.reply_read(ev, [bytes(self.data[a:b])])
            elif ev.command is Cmd.WRITE:
                self.data[a:b] = ev.data
                server.reply_ok(ev)
            elif ev.command in (Cmd.TRIM, Cmd.WRITE_ZEROES):
                self.data[a:b] = bytes(ev.length)
                server.reply_ok(ev)
            elif ev.command is Cmd.BLOCK_STATUS:
                server.reply_block_status(ev, self.extents(a, b))
            else:
                server.reply_ok(ev)
        return events

    def extents(self, a: int, b: int) -> list[tuple[int, int]]:
        """Runs of 4 KiB blocks that are zero (flags HOLE|ZERO = 3) or data (0)."""
        runs: list[tuple[int, int]] = []
        pos = a
        while pos < b:
            end = min(b, (pos // 4096 + 1) * 4096)
            flags = 3 if not any(self.data[pos:end]) else 0
            if runs and runs[-1][1] == flags:
                runs[-1] = (runs[-1][0] + end - pos, flags)
            else:
                runs.append((end - pos, flags))
            pos = end
        return runs


def joined(buffers: Sequence[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(b) for b in buffers)


class Pair:
    """A client and a server state machine wired together in memory."""

    def __init__(
        self, client: ClientConnection, *, tls: bool = False, tls_required: bool = False,
        catalog: Catalog = CATALOG,
    ) -> None:
        self.client = client
        self.server = ServerConnection(catalog, tls=tls, tls_required=tls_required)
        self.backend = Backend(SIZE)
        self.server_events: list[Event] = []

    def pump(self) -> list[ClientEvent]:
        """Move bytes both ways until both sides are quiet; return the client's events."""
        events: list[ClientEvent] = []
        while True:
            c2s = joined(self.client.data_to_send())
            if c2s and not self.server.closed:
                got = self.backend.handle(self.server, self.server.receive_data(c2s))
                self.server_events += got
                if any(isinstance(e, StartTLS) for e in got):
                    self.server.tls_started()  # an adapter would run the TLS handshake here
            s2c = joined(self.server.data_to_send())
            if s2c:
                new = self.client.receive_data(s2c)
                events += new
                if any(isinstance(e, StartTLS) for e in new):
                    self.client.tls_started()
            if not c2s and not s2c:
                return events


def negotiated(events: list[ClientEvent]) -> Negotiated:
    (ev,) = [e for e in events if isinstance(e, Negotiated)]
    return ev


def replies(events: list[ClientEvent]) -> dict[int, Reply]:
    return {e.cookie: e for e in events if isinstance(e, Reply)}


# ------------------------------------------------------------------- client vs our server


@pytest.mark.parametrize("structured", [False, True])
def test_negotiation_with_our_server(structured: bool) -> None:
    pair = Pair(ClientConnection("rw", structured=structured))
    ev = negotiated(pair.pump())
    assert ev.structured_replies is structured
    assert ev.export.name == "rw" and ev.export.size == SIZE
    assert ev.export.description == "scratch"
    assert (ev.export.min_block, ev.export.preferred_block) == (1, 4096)
    expected = RW.flags | TF.HAS_FLAGS | (TF.SEND_DF if structured else TF(0))
    assert ev.export.flags == expected
    assert pair.client.phase is ClientPhase.TRANSMISSION


def test_meta_context_negotiated_with_our_server() -> None:
    pair = Pair(ClientConnection("rw", meta_contexts=(BASE_ALLOCATION,)))
    ev = negotiated(pair.pump())
    assert ev.structured_replies
    assert list(ev.meta_contexts.values()) == [BASE_ALLOCATION]
    cookie = pair.client.request(Cmd.BLOCK_STATUS, SIZE // 2 - 8192, 8192 + 65536 + 4096)
    (rep,) = pair.pump()
    assert isinstance(rep, Reply) and rep.cookie == cookie and rep.error is Errno.OK
    assert rep.extents == ((8192, 0), (65536, 3), (4096, 0))


@pytest.mark.parametrize("structured", [False, True])
def test_reads_and_writes_round_trip_with_many_in_flight(structured: bool) -> None:
    pair = Pair(ClientConnection("rw", structured=structured))
    pair.pump()
    rng = random.Random(3)
    model = bytearray(pair.backend.data)
    writes = {}
    for _ in range(20):
        off, data = rng.randrange(SIZE - 5000), rng.randbytes(rng.randint(1, 5000))
        writes[pair.client.request(Cmd.WRITE, off, data=data)] = data
        model[off : off + len(data)] = data
    reads = {}
    for _ in range(30):
        off = rng.randrange(SIZE - 9000)
        n = rng.randint(1, 9000)
        reads[pair.client.request(Cmd.READ, off, n)] = (off, n)
    assert pair.client.in_flight == 50
    got = replies(pair.pump())
    assert pair.client.in_flight == 0
    assert set(got) == set(writes) | set(reads)
    for cookie in writes:
        assert got[cookie] == Reply(cookie, Errno.OK)
    for cookie, (off, n) in reads.items():
        assert got[cookie].data == bytes(model[off : off + n])


def test_trim_zero_flush_cache_against_our_server() -> None:
    pair = Pair(ClientConnection("rw"))
    pair.pump()
    c = pair.client
    cookies = [
        c.request(Cmd.TRIM, 0, 4096),
        c.request(Cmd.WRITE_ZEROES, 4096, 4096, CmdFlag.NO_HOLE | CmdFlag.FUA),
        c.request(Cmd.FLUSH),
        c.request(Cmd.CACHE, 0, 65536),
    ]
    read = c.request(Cmd.READ, 0, 8192)
    got = replies(pair.pump())
    assert [got[k].error for k in cookies] == [Errno.OK] * 4
    assert got[read].data == bytes(8192)


@pytest.mark.parametrize("structured", [False, True])
def test_errors_from_our_server(structured: bool) -> None:
    pair = Pair(ClientConnection("disk", structured=structured))
    pair.pump()
    past = pair.client.request(Cmd.READ, SIZE - 10, 20)
    write = pair.client.request(Cmd.WRITE, 0, data=b"nope")
    ok = pair.client.request(Cmd.READ, 0, 16)
    got = replies(pair.pump())
    assert got[past].error is Errno.EINVAL and got[past].data == b""
    if structured:
        assert "past the end" in got[past].message
    assert got[write].error is Errno.EPERM
    assert got[ok].data == bytes(pair.backend.data[:16])


def test_list_exports_then_abort() -> None:
    pair = Pair(ClientConnection(list_exports=True))
    events = pair.pump()
    assert events == [ExportListed((("disk", "read-only disk"), ("rw", "scratch")))]
    assert pair.client.phase is ClientPhase.CLOSED
    assert pair.server_events[-1] == Disconnect(clean=True)


def test_unknown_export_is_refused() -> None:
    pair = Pair(ClientConnection("nope"))
    (ev,) = pair.pump()
    assert isinstance(ev, OptionRefused)
    assert (ev.option, ev.reply) == (Opt.GO, Rep.ERR_UNKNOWN) and "nope" in ev.message
    assert pair.client.phase is ClientPhase.CLOSED


def test_starttls_then_structured_replies_and_meta_context_are_negotiated_under_tls() -> None:
    pair = Pair(
        ClientConnection("rw", tls=True, meta_contexts=(BASE_ALLOCATION,)),
        tls=True, tls_required=True,
    )
    events = pair.pump()
    assert isinstance(events[0], StartTLS)
    ev = negotiated(events)
    assert pair.server.tls_active
    assert ev.structured_replies and list(ev.meta_contexts.values()) == [BASE_ALLOCATION]


def test_client_without_tls_against_a_tls_only_server_is_refused() -> None:
    pair = Pair(ClientConnection("rw"), tls=True, tls_required=True)
    (ev,) = pair.pump()
    assert isinstance(ev, OptionRefused) and ev.reply == Rep.ERR_TLS_REQD


def test_request_before_transmission_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ClientConnection("rw").request(Cmd.READ, 0, 1)


def test_disc_ends_the_session_on_both_sides() -> None:
    pair = Pair(ClientConnection("rw"))
    pair.pump()
    pair.client.request(Cmd.DISC)
    assert pair.pump() == []
    assert pair.client.phase is ClientPhase.CLOSED
    assert pair.server_events[-1] == Disconnect(clean=True)


# --------------------------------------------------------------- hand-written server bytes


def greeting(hflags: int = 3) -> bytes:
    return b"NBDMAGICIHAVEOPT" + struct.pack(">H", hflags)


def opt_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPT_REPLY_MAGIC + struct.pack(">III", opt, rep, len(data)) + data


def client_option(opt: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data


def go_data(name: bytes) -> bytes:
    """What our client asks in GO: the name, then NAME, DESCRIPTION, BLOCK_SIZE."""
    return struct.pack(">I", len(name)) + name + struct.pack(">HHHH", 3, 1, 2, 3)


def sent(client: ClientConnection) -> bytes:
    return joined(client.data_to_send())


def chunk(cookie: int, rtype: int, payload: bytes, *, done: bool = False) -> bytes:
    return (
        bytes.fromhex("668e33ef") + struct.pack(">HHQI", int(done), rtype, cookie, len(payload))
        + payload
    )


def simple(cookie: int, error: int = 0) -> bytes:
    return bytes.fromhex("67446698") + struct.pack(">IQ", error, cookie)


def in_transmission(*, structured: bool = True, name: bytes = b"x") -> ClientConnection:
    """A client past GO with a hand-written server (export of 1 MiB, HAS_FLAGS only)."""
    client = ClientConnection(name.decode(), structured=structured)
    client.receive_data(greeting())
    sent(client)
    if structured:
        client.receive_data(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
        sent(client)
    events = client.receive_data(
        opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, 1 << 20, 1)) + opt_reply(Opt.GO, 1)
    )
    negotiated(events)
    return client


def test_client_handshake_bytes_exact() -> None:
    client = ClientConnection("lab", structured=True)
    assert sent(client) == b""  # the client speaks only after the greeting
    assert client.receive_data(greeting()) == []
    assert sent(client) == b"\x00\x00\x00\x03" + client_option(Opt.STRUCTURED_REPLY)
    client.receive_data(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert sent(client) == client_option(Opt.GO, go_data(b"lab"))


def test_go_unsupported_falls_back_to_export_name_without_zeroes() -> None:
    client = ClientConnection("lab", structured=True)
    client.receive_data(greeting(hflags=3))
    assert sent(client) == b"\x00\x00\x00\x03" + client_option(Opt.STRUCTURED_REPLY)
    # An old server: neither structured replies nor GO.
    assert client.receive_data(opt_reply(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP)) == []
    assert sent(client) == client_option(Opt.GO, go_data(b"lab"))
    assert client.receive_data(opt_reply(Opt.GO, Rep.ERR_UNSUP, b"what?")) == []
    assert sent(client) == client_option(Opt.EXPORT_NAME, b"lab")
    events = client.receive_data(struct.pack(">QH", 12345, 0x0003))
    assert events == [Negotiated(ExportInfo("lab", 12345, TF.HAS_FLAGS | TF.READ_ONLY), False)]
    cookie = client.request(Cmd.READ, 100, 5)
    assert sent(client) == struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, 100, 5)
    assert client.receive_data(simple(cookie) + b"hello") == [Reply(cookie, Errno.OK, b"hello")]


def test_export_name_fallback_reads_124_zeroes_when_no_zeroes_is_not_offered() -> None:
    client = ClientConnection("old", structured=False)
    client.receive_data(greeting(hflags=1))  # FIXED_NEWSTYLE only
    assert sent(client) == b"\x00\x00\x00\x01" + client_option(Opt.GO, go_data(b"old"))
    client.receive_data(opt_reply(Opt.GO, Rep.ERR_UNSUP))
    assert sent(client) == client_option(Opt.EXPORT_NAME, b"old")
    assert client.receive_data(struct.pack(">QH", 4096, 1)) == []
    assert client.receive_data(bytes(123)) == []
    (ev,) = client.receive_data(bytes(1))
    assert isinstance(ev, Negotiated) and ev.export.size == 4096
    cookie = client.request(Cmd.FLUSH)
    sent(client)
    assert client.receive_data(simple(cookie, 0)) == [Reply(cookie, Errno.OK)]


def test_info_replies_build_the_export_info() -> None:
    client = ClientConnection("lab", structured=False)
    client.receive_data(greeting())
    sent(client)
    events = client.receive_data(
        opt_reply(Opt.GO, Rep.INFO, b"\x00\x01" + b"lab@7")
        + opt_reply(Opt.GO, Rep.INFO, b"\x00\x02" + b"seventh")
        + opt_reply(Opt.GO, Rep.INFO, struct.pack(">HIII", 3, 512, 4096, 1 << 20))
        + opt_reply(Opt.GO, Rep.INFO, b"\x00\x99unknown info type, ignored")
        + opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, 1 << 30, 0x0003))
        + opt_reply(Opt.GO, Rep.ACK)
    )
    assert events == [
        Negotiated(
            ExportInfo("lab@7", 1 << 30, TF(3), "seventh", 512, 4096, 1 << 20), False, {}
        )
    ]


def test_go_ack_without_info_export_is_a_protocol_error() -> None:
    client = ClientConnection("x", structured=False)
    client.receive_data(greeting())
    with pytest.raises(RemoteProtocolError):
        client.receive_data(opt_reply(Opt.GO, Rep.ACK))


def test_set_meta_context_error_discards_contexts_already_announced() -> None:
    client = ClientConnection("x", meta_contexts=(BASE_ALLOCATION,))
    client.receive_data(greeting())
    client.receive_data(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    sent(client)
    client.receive_data(
        opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\x00\x00\x00\x07base:allocation")
        + opt_reply(Opt.SET_META_CONTEXT, Rep.ERR_TOO_BIG)
    )
    assert sent(client).startswith(client_option(Opt.GO)[:12])  # went on to GO
    events = client.receive_data(
        opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, 4096, 1)) + opt_reply(Opt.GO, 1)
    )
    assert negotiated(events).meta_contexts == {}


def test_structured_read_reassembled_from_holes_and_split_data_in_any_order() -> None:
    client = in_transmission()
    a = client.request(Cmd.READ, 1000, 100)
    b = client.request(Cmd.READ, 5000, 8)
    stream = (
        chunk(a, 1, struct.pack(">Q", 1050) + b"D" * 50)            # last half first
        + chunk(b, 2, struct.pack(">QI", 5000, 4))                  # other request, interleaved
        + chunk(a, 2, struct.pack(">QI", 1010, 40))                 # a hole in the middle
        + chunk(b, 1, struct.pack(">Q", 5004) + b"bbbb", done=True)
        + chunk(a, 1, struct.pack(">Q", 1000) + b"0123456789")      # the head
        + chunk(a, 0, b"", done=True)                               # NONE ends it
    )
    expected = [
        Reply(b, Errno.OK, bytes(4) + b"bbbb"),
        Reply(a, Errno.OK, b"0123456789" + bytes(40) + b"D" * 50),
    ]
    assert client.receive_data(stream) == expected
    # The same bytes one at a time give the same replies.
    client = in_transmission()
    a2, b2 = client.request(Cmd.READ, 1000, 100), client.request(Cmd.READ, 5000, 8)
    assert (a2, b2) == (a, b)
    events: list[ClientEvent] = []
    for i in range(len(stream)):
        events += client.receive_data(stream[i : i + 1])
    assert events == expected


def test_structured_read_hole_as_final_chunk() -> None:
    client = in_transmission()
    c = client.request(Cmd.READ, 0, 4096)
    assert client.receive_data(chunk(c, 2, struct.pack(">QI", 0, 4096), done=True)) == [
        Reply(c, Errno.OK, bytes(4096))
    ]


def test_simple_error_replies_carry_no_payload() -> None:
    client = in_transmission(structured=False)
    r1 = client.request(Cmd.READ, 0, 10)
    r2 = client.request(Cmd.READ, 0, 3)
    w = client.request(Cmd.WRITE, 0, data=b"x")
    events = client.receive_data(
        simple(r1, 5) + simple(w, 0x7777) + simple(r2) + b"abc"
    )
    assert events == [
        Reply(r1, Errno.EIO), Reply(w, Errno.EINVAL), Reply(r2, Errno.OK, b"abc"),
    ], "an unknown error value counts as EINVAL; a failed READ has no payload"


def test_structured_error_chunks() -> None:
    client = in_transmission()
    c1, c2, c3, c4 = (client.request(Cmd.READ, 0, 100) for _ in range(4))
    events = client.receive_data(
        chunk(c1, 0x8001, struct.pack(">IH", 28, 4) + b"full", done=True)
        + chunk(c2, 1, struct.pack(">Q", 0) + b"x" * 50)
        + chunk(c2, 0x8002, struct.pack(">IH", 5, 0) + struct.pack(">Q", 50))
        + chunk(c2, 1, struct.pack(">Q", 50) + b"y" * 50, done=True)
        + chunk(c3, 0x8123, struct.pack(">IH", 1, 2) + b"??" + b"extra", done=True)
        + chunk(c4, 0x8001, struct.pack(">IH", 0, 0), done=True)
    )
    assert events == [
        Reply(c1, Errno.ENOSPC, message="full"),
        Reply(c2, Errno.EIO),
        Reply(c3, Errno.EPERM, message="??"),  # unknown error type: the reply failed
        Reply(c4, Errno.EINVAL),  # an error chunk with error 0 still is an error
    ]
    assert client.in_flight == 0


def test_structured_error_for_a_write() -> None:
    client = in_transmission()
    w = client.request(Cmd.WRITE, 0, data=b"abc")
    assert client.receive_data(chunk(w, 0x8001, struct.pack(">IH", 1, 2) + b"ro", done=True)) == [
        Reply(w, Errno.EPERM, message="ro")
    ]


def test_block_status_extents_parsed() -> None:
    client = in_transmission()
    c = client.request(Cmd.BLOCK_STATUS, 0, 1 << 20)
    body = struct.pack(">IIIII", 1, 4096, 3, 1044480, 0)
    assert client.receive_data(chunk(c, 5, body, done=True)) == [
        Reply(c, Errno.OK, extents=((4096, 3), (1044480, 0)))
    ]


BAD_CHUNKS = {
    "hole-past-end": (Cmd.READ, lambda c: chunk(c, 2, struct.pack(">QI", 100, 11), done=True)),
    "hole-before-start": (Cmd.READ, lambda c: chunk(c, 2, struct.pack(">QI", 0, 10))),
    "hole-empty": (Cmd.READ, lambda c: chunk(c, 2, struct.pack(">QI", 10, 0))),
    "hole-wrong-size": (Cmd.READ, lambda c: chunk(c, 2, struct.pack(">QIB", 10, 1, 0))),
    "data-past-end": (Cmd.READ, lambda c: chunk(c, 1, struct.pack(">Q", 60) + bytes(60))),
    "data-empty": (Cmd.READ, lambda c: chunk(c, 1, struct.pack(">Q", 10))),
    "data-short": (Cmd.READ, lambda c: chunk(c, 1, b"\x00\x00")),
    "data-for-write": (Cmd.WRITE, lambda c: chunk(c, 1, struct.pack(">Q", 10) + b"x")),
    "unknown-type": (Cmd.READ, lambda c: chunk(c, 3, b"", done=True)),
    "none-not-final": (Cmd.READ, lambda c: chunk(c, 0, b"")),
    "none-with-data": (Cmd.READ, lambda c: chunk(c, 0, b"x", done=True)),
    "block-status-odd": (Cmd.BLOCK_STATUS, lambda c: chunk(c, 5, bytes(4 + 7), done=True)),
    "block-status-empty": (Cmd.BLOCK_STATUS, lambda c: chunk(c, 5, bytes(4), done=True)),
    "error-short": (Cmd.READ, lambda c: chunk(c, 0x8001, b"\x00\x00\x00\x05", done=True)),
    "error-message-too-long": (
        Cmd.READ, lambda c: chunk(c, 0x8001, struct.pack(">IH", 5, 10) + b"abc", done=True)
    ),
    "unknown-cookie": (Cmd.READ, lambda c: chunk(c + 1, 2, struct.pack(">QI", 10, 1))),
    # a header announcing 4 GiB: refused before any of it is buffered
    "huge-chunk": (Cmd.READ, lambda c: struct.pack(">IHHQI", 0x668E33EF, 0, 1, c, 0xFFFFFFFF)),
    "bad-magic": (Cmd.READ, lambda c: b"\x12\x34\x56\x78" + bytes(12)),
    "simple-unknown-cookie": (Cmd.READ, lambda c: simple(c + 99)),
}


@pytest.mark.parametrize("cmd,make", BAD_CHUNKS.values(), ids=BAD_CHUNKS.keys())
def test_replies_that_break_the_spec_are_protocol_errors(
    cmd: Cmd, make: Callable[[int], bytes]
) -> None:
    client = in_transmission()
    data = b"z" * 100 if cmd is Cmd.WRITE else b""
    c = client.request(cmd, 10, 0 if data else 100, data=data)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(make(c))
    assert client.phase is ClientPhase.CLOSED


BAD_HANDSHAKES = {
    "bad-nbdmagic": b"NBDMAGIX" + b"IHAVEOPT\x00\x03",
    "oldstyle": b"NBDMAGIC" + bytes.fromhex("00420281861253") + b"\x00\x00\x00",
    "not-fixed-newstyle": b"NBDMAGICIHAVEOPT\x00\x02",
    "reply-to-other-option": greeting() + opt_reply(Opt.LIST, Rep.ACK),
    "bad-reply-magic": greeting() + b"\x00" * 8 + struct.pack(">III", Opt.GO, 1, 0),
    "short-info-export": greeting() + opt_reply(Opt.GO, Rep.INFO, b"\x00\x00\x00"),
    "short-info-type": greeting() + opt_reply(Opt.GO, Rep.INFO, b"\x00"),
    "name-not-utf8": greeting() + opt_reply(Opt.GO, Rep.INFO, b"\x00\x01\xc3\x28"),
}


@pytest.mark.parametrize("data", BAD_HANDSHAKES.values(), ids=BAD_HANDSHAKES.keys())
def test_handshakes_that_break_the_spec_are_protocol_errors(data: bytes) -> None:
    client = ClientConnection("x", structured=False)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(data)
    assert client.phase is ClientPhase.CLOSED


def test_list_with_a_short_server_reply_is_a_protocol_error() -> None:
    client = ClientConnection(list_exports=True)
    client.receive_data(greeting())
    with pytest.raises(RemoteProtocolError):
        client.receive_data(opt_reply(Opt.LIST, Rep.SERVER, b"\x00\x00"))


def test_eof_with_requests_in_flight_is_a_protocol_error() -> None:
    client = in_transmission()
    client.request(Cmd.READ, 0, 1)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b"")
    quiet = in_transmission()
    assert quiet.receive_data(b"") == []
    assert quiet.phase is ClientPhase.CLOSED


def test_block_status_keeps_the_first_contexts_extents_only() -> None:
    client = ClientConnection("x", meta_contexts=(BASE_ALLOCATION, "qemu:dirty-bitmap:b"))
    client.receive_data(greeting())
    client.receive_data(opt_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    client.receive_data(
        opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\x00\x00\x00\x05base:allocation")
        + opt_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\x00\x00\x00\x09qemu:dirty-bitmap:b")
        + opt_reply(Opt.SET_META_CONTEXT, Rep.ACK)
    )
    ev = negotiated(client.receive_data(
        opt_reply(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, 1 << 20, 1)) + opt_reply(Opt.GO, 1)
    ))
    assert ev.meta_contexts == {5: BASE_ALLOCATION, 9: "qemu:dirty-bitmap:b"}
    c = client.request(Cmd.BLOCK_STATUS, 0, 8192)
    events = client.receive_data(
        chunk(c, 5, struct.pack(">IIIII", 9, 4096, 1, 4096, 0))  # the bitmap's chunk first
        + chunk(c, 5, struct.pack(">III", 5, 8192, 3), done=True)
    )
    assert events == [Reply(c, Errno.OK, extents=((8192, 3),))]


STRUCTURED_READ_GAPS = {
    "gap-then-none": [(1, struct.pack(">Q", 1000) + b"abcd", False), (0, b"", True)],
    "only-a-tail": [(1, struct.pack(">Q", 1004) + b"efgh", True)],
    "overlap": [
        (1, struct.pack(">Q", 1000) + b"abcd", False),
        (2, struct.pack(">QI", 1002, 6), True),
    ],
    "same-bytes-twice": [
        (1, struct.pack(">Q", 1000) + b"abcd", False),
        (1, struct.pack(">Q", 1000) + b"wxyz", True),
    ],
    "no-content-at-all": [(0, b"", True)],
    "whole-length-at-the-wrong-offset": [(1, struct.pack(">Q", 996) + b"abcdefgh", True)],
    "whole-length-after-a-part": [
        (1, struct.pack(">Q", 1000) + b"abcd", False),
        (1, struct.pack(">Q", 1000) + b"abcdefgh", True),
    ],
}


@pytest.mark.parametrize(
    "chunks", STRUCTURED_READ_GAPS.values(), ids=STRUCTURED_READ_GAPS.keys()
)
def test_structured_read_must_cover_the_request_exactly_once(
    chunks: list[tuple[int, bytes, bool]],
) -> None:
    client = in_transmission()
    c = client.request(Cmd.READ, 1000, 8)
    stream = b"".join(chunk(c, t, p, done=d) for t, p, d in chunks)
    with pytest.raises(RemoteProtocolError):
        client.receive_data(stream)


def test_structured_read_with_an_error_need_not_cover_the_request() -> None:
    client = in_transmission()
    c = client.request(Cmd.READ, 1000, 8)
    events = client.receive_data(
        chunk(c, 1, struct.pack(">Q", 1000) + b"abcd")
        + chunk(c, 0x8002, struct.pack(">IH", 5, 0) + struct.pack(">Q", 1004), done=True)
    )
    assert events == [Reply(c, Errno.EIO)]
