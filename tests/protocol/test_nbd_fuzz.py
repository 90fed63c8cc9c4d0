"""Hypothesis fuzzing of the NBD server state machine.

(a) Whatever bytes a client sends, in whatever pieces, :class:`nbd.server.ServerConnection`
raises nothing but :class:`nbd.errors.RemoteProtocolError`, and everything it queues is a
well-formed stream that a strict client-side parser (below, independent of
:mod:`nbd.client`) accepts: the greeting, option replies with the right magic, lengths and
bodies, the NBD_OPT_EXPORT_NAME reply, then one simple or structured reply per request, in
order, with consistent lengths.

(b) Read-your-writes: random valid request sequences from :class:`nbd.client.ClientConnection`
against an in-memory export (a bytearray) behind the server; every READ reply equals the model.

The budget keeps the whole file well under 30 s (``max_examples``, ``deadline=None``).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nbd import wire
from nbd.client import ClientConnection
from nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from nbd.errors import RemoteProtocolError
from nbd.events import (
    ExportInfo,
    Negotiated,
    Reply,
    Request,
    RequestRejected,
    StartTLS,
    TransmissionStarted,
)
from nbd.server import ServerConnection

TF = TransmissionFlag
SIZE = 64 * 1024
EXPORTS = [
    ExportInfo("ro", SIZE, TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_CACHE, "read-only"),
    ExportInfo(
        "rw", SIZE,
        TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO
        | TF.SEND_CACHE,
        "writable",
    ),
]
NAMES = ["", "ro", "rw", "nope", "r\u00e9"]

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)

GREETING = b"NBDMAGICIHAVEOPT\x00\x03"
OPT_REPLY_MAGIC = bytes.fromhex("0003e889045565a9")
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
KNOWN_REPS = {int(r) for r in Rep}
KNOWN_ERRNOS = {int(e) for e in Errno} - {0}


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return {e.name: e for e in EXPORTS}.get(name or "ro")

    def exports(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in EXPORTS]


# --------------------------------------------------------------------- strict output parser


@dataclass
class Expected:
    """One reply the server owes, in output order."""

    cookie: int | None  # None: any (after a fatal error the events are not known)
    command: int
    offset: int
    length: int
    rejected: bool
    data: bytes = b""  # what a READ reply must carry


class Harness:
    """Feeds a ServerConnection, answers its requests from a bytearray, and parses every byte
    it queues as a strict client would."""

    def __init__(self, *, tls: bool = False, tls_required: bool = False) -> None:
        self.conn = ServerConnection(Catalog(), tls=tls, tls_required=tls_required)
        self.disk = bytearray(bytes(range(256)) * (SIZE // 256))
        self.mode = "greeting"
        self.last_option_acked: int | None = None
        self.replies = 0
        self.option_replies = 0
        self._check([], [])

    def feed(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError:
            assert self.conn.closed
            self._check([], [], after_error=True)  # queued before the error: still well-formed
            raise
        expected = [
            Expected(e.cookie, e.command, 0, 0, True)
            for e in events if isinstance(e, RequestRejected)
        ]
        for ev in events:
            if isinstance(ev, StartTLS):
                self.conn.tls_started()
            elif isinstance(ev, Request):
                expected.append(self._answer(ev))
        self._check(events, expected)

    def _answer(self, ev: Request) -> Expected:
        a, b = ev.offset, ev.offset + ev.length
        if ev.command is not Cmd.FLUSH:  # FLUSH has no range
            assert ev.length > 0 and b <= SIZE, "the server checked bounds"
        if ev.command is Cmd.READ:
            data = bytes(self.disk[a:b])
            self.conn.reply_read(ev, [data])
            return Expected(ev.cookie, ev.command, ev.offset, ev.length, False, data)
        if ev.command is Cmd.WRITE:
            assert len(ev.data) == ev.length
            self.disk[a:b] = ev.data
            self.conn.reply_ok(ev)
        elif ev.command is Cmd.BLOCK_STATUS:
            self.conn.reply_block_status(ev, [(ev.length, 0)])
        elif ev.command is Cmd.CACHE:
            self.conn.reply_error(ev, Errno.EIO, "no cache today")
        else:
            self.conn.reply_ok(ev)
        return Expected(ev.cookie, ev.command, ev.offset, ev.length, False)

    # -------------------------------------------------------------------------- parsing

    def _check(
        self, events: Sequence[object], expected: list[Expected], *, after_error: bool = False
    ) -> None:
        buf = b"".join(bytes(b) for b in self.conn.data_to_send())
        pos = 0
        if self.mode == "greeting":
            assert buf[:18] == GREETING
            pos = 18
            self.mode = "options"
        started = [e for e in events if isinstance(e, TransmissionStarted)]
        while self.mode == "options" and pos < len(buf):
            if buf[pos : pos + 8] == OPT_REPLY_MAGIC:
                pos = self._option_reply(buf, pos)
            else:
                pos = self._export_name_reply(buf, pos, started, after_error)
        todo = deque(expected)
        while pos < len(buf):
            assert self.mode == "transmission", f"bytes after {self.mode}: {buf[pos:][:40]!r}"
            if after_error:  # only the server's own rejections can be queued
                (magic,) = struct.unpack_from(">I", buf, pos)
                cmd = Cmd.READ if magic == STRUCTURED_MAGIC else Cmd.WRITE
                want = Expected(None, cmd, 0, 0, True)
            else:
                assert todo, f"unexpected reply bytes {buf[pos:][:40]!r}"
                want = todo.popleft()
            pos = self._reply(buf, pos, want)
        assert pos == len(buf)
        assert not todo, f"requests left unanswered: {list(todo)}"

    def _option_reply(self, buf: bytes, pos: int) -> int:
        assert len(buf) - pos >= 20, "truncated option reply header"
        opt, rep, length = (int(x) for x in struct.unpack_from(">III", buf, pos + 8))
        body = buf[pos + 20 : pos + 20 + length]
        assert len(body) == length, "option reply length runs past the output"
        assert rep in KNOWN_REPS, f"unknown reply type {rep:#x}"
        self.option_replies += 1
        rep = Rep(rep)
        if rep.is_error:
            body.decode("utf-8")
            assert len(body) <= 4096
        elif rep is Rep.ACK:
            assert length == 0
            if opt == Opt.GO:
                self.mode = "transmission"
            elif opt == Opt.ABORT:
                self.mode = "closed"
        elif rep is Rep.SERVER:
            assert opt == Opt.LIST
            (nlen,) = struct.unpack_from(">I", body)
            assert nlen <= length - 4
            body[4:].decode("utf-8")
        elif rep is Rep.INFO:
            assert opt in (Opt.INFO, Opt.GO)
            (itype,) = struct.unpack_from(">H", body)
            if itype == Info.EXPORT:
                assert length == 12
                _, size, flags = struct.unpack(">HQH", body)
                assert size == SIZE and flags & TF.HAS_FLAGS
            elif itype == Info.BLOCK_SIZE:
                assert length == 14
                _, mn, pref, mx = struct.unpack(">HIII", body)
                assert mn <= pref <= mx
            else:
                assert itype in (Info.NAME, Info.DESCRIPTION)
                body[2:].decode("utf-8")
        elif rep is Rep.META_CONTEXT:
            assert opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT)
            assert body[4:] == BASE_ALLOCATION.encode()
        else:
            raise AssertionError(f"reply {rep!r} is never sent by this server")
        self.last_option_acked = opt
        return pos + 20 + length

    def _export_name_reply(
        self, buf: bytes, pos: int, started: Sequence[object], after_error: bool
    ) -> int:
        if not after_error:
            (ev,) = started
            assert isinstance(ev, TransmissionStarted) and ev.option == Opt.EXPORT_NAME
        export = self.conn.export
        assert export is not None, f"not an option reply: {buf[pos:][:40]!r}"
        size, flags = struct.unpack_from(">QH", buf, pos)
        assert size == export.size
        assert flags & ~int(TF.SEND_DF) == int(export.flags | TF.HAS_FLAGS)
        pos += 10
        if not self.conn.no_zeroes:
            assert buf[pos : pos + 124] == bytes(124)
            pos += 124
        self.mode = "transmission"
        return pos

    def _reply(self, buf: bytes, pos: int, want: Expected) -> int:
        (magic,) = struct.unpack_from(">I", buf, pos)
        self.replies += 1
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack_from(">IQ", buf, pos + 4)
            assert want.cookie in (None, cookie)
            pos += 16
            if want.command == Cmd.READ:
                assert not self.conn.structured, "a READ needs a structured reply"
            if want.rejected:
                assert error in KNOWN_ERRNOS
            elif want.command == Cmd.READ:
                assert error == 0
                assert buf[pos : pos + want.length] == want.data
                pos += want.length
            else:
                assert error == (Errno.EIO if want.command == Cmd.CACHE else 0)
            return pos
        assert magic == STRUCTURED_MAGIC, f"bad reply magic {magic:#x}"
        assert self.conn.structured, "structured reply without NBD_OPT_STRUCTURED_REPLY"
        flags, rtype, cookie, length = (int(x) for x in struct.unpack_from(">HHQI", buf, pos + 4))
        body = buf[pos + 20 : pos + 20 + length]
        assert len(body) == length and want.cookie in (None, cookie) and flags == 1
        if rtype == ReplyType.ERROR:
            err, mlen = struct.unpack_from(">IH", body)
            assert err in KNOWN_ERRNOS and mlen == length - 6
            body[6:].decode("utf-8")
            assert want.rejected or want.command == Cmd.CACHE
        elif rtype == ReplyType.OFFSET_DATA:
            assert not want.rejected and want.command == Cmd.READ
            assert length == 8 + want.length
            assert struct.unpack_from(">Q", body) == (want.offset,)
            assert body[8:] == want.data
        elif rtype == ReplyType.BLOCK_STATUS:
            assert not want.rejected and want.command == Cmd.BLOCK_STATUS
            assert length >= 12 and (length - 4) % 8 == 0
            assert sum(n for n, _ in struct.iter_unpack(">II", body[4:])) <= want.length
        else:
            raise AssertionError(f"unexpected chunk type {rtype:#x}")
        return pos + 20 + length


# ------------------------------------------------------------------------- input strategies


def option(opt: int, data: bytes) -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def info_data(name: str, infos: list[int]) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    body = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q.encode())) + q.encode()
    return body


names = st.sampled_from(NAMES) | st.text(max_size=8)
queries = st.lists(
    st.sampled_from([BASE_ALLOCATION, "base:", "x-a:b", "qemu:dirty-bitmap:x"])
    | st.text(max_size=6),
    max_size=3,
)
option_numbers = st.sampled_from(list(Opt)) | st.integers(0, 2**32 - 1)

info_lists = st.lists(st.sampled_from(list(Info)) | st.integers(0, 0xFFFF), max_size=4)
#: Options that keep the connection in option haggling (whatever the answer).
options = st.one_of(
    st.builds(
        option, option_numbers.filter(lambda o: o not in (Opt.EXPORT_NAME, Opt.GO, Opt.ABORT)),
        st.binary(max_size=40),
    ),
    st.builds(lambda n, i: option(Opt.INFO, info_data(n, i)), names, info_lists),
    st.builds(
        lambda o, n, q: option(o, meta_data(n, q)),
        st.sampled_from([Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]), names, queries,
    ),
    st.sampled_from([
        option(Opt.STRUCTURED_REPLY, b""), option(Opt.LIST, b""), option(Opt.STARTTLS, b""),
    ]),
)
#: Options that end haggling (or the connection) when they succeed.
final_options = st.one_of(
    st.builds(lambda n: option(Opt.EXPORT_NAME, n.encode()), names),
    st.builds(lambda n, i: option(Opt.GO, info_data(n, i)), names, info_lists),
    st.builds(lambda d: option(Opt.ABORT, d), st.binary(max_size=4)),
    st.builds(option, st.sampled_from([Opt.EXPORT_NAME, Opt.GO]), st.binary(max_size=40)),
)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    cmd = draw(st.sampled_from(list(Cmd)) | st.integers(0, 0xFFFF))
    flags = draw(
        st.sampled_from([0, 0, 0, CmdFlag.FUA, CmdFlag.DF, CmdFlag.REQ_ONE, CmdFlag.NO_HOLE,
                         CmdFlag.FAST_ZERO])
        | st.integers(0, 0xFFFF)
    )
    cookie = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.integers(0, SIZE + 512) | st.integers(0, 2**64 - 1))
    length = draw(st.integers(0, 4096) | st.integers(0, 2**32 - 1))
    head = wire.REQUEST.pack(0x25609513, flags, cmd, cookie, offset, length)
    if cmd == Cmd.WRITE and length <= 4096:
        # Usually the whole payload, sometimes a wrong amount (the framing then slips).
        n = draw(st.sampled_from([length, length, length, 0]) | st.integers(0, 4096))
        head += draw(st.binary(min_size=n, max_size=n))
    return head


def handshake_prefix(structured: bool, meta: bool, export: str, go: bool) -> bytes:
    data = struct.pack(">I", 3)
    if structured or meta:
        data += option(Opt.STRUCTURED_REPLY, b"")
    if meta:
        data += option(Opt.SET_META_CONTEXT, meta_data(export, [BASE_ALLOCATION]))
    if go:
        data += option(Opt.GO, info_data(export, [Info.BLOCK_SIZE]))
    else:
        data += option(Opt.EXPORT_NAME, export.encode())
    return data


prefixes = st.builds(
    handshake_prefix, st.booleans(), st.booleans(), st.sampled_from(["ro", "rw", ""]),
    st.booleans(),
)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut into pieces at random points (sometimes, when short, one byte at a
    time)."""
    if len(data) <= 2048 and draw(st.integers(0, 9)) == 0:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces = []
    last = 0
    for c in [*cuts, len(data)]:
        pieces.append(data[last:c])
        last = c
    return [p for p in pieces if p] or [data]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """A few byte flips, insertions, deletions or a truncation of ``data``."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not buf:
            break
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        i = draw(st.integers(0, len(buf) - 1))
        if kind == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[i] = draw(st.sampled_from([0, 0xFF, 0x80, 0x7F]))
        elif kind == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[i : i + draw(st.integers(1, 8))]
        else:
            del buf[i:]
    return bytes(buf)


def run(pieces: list[bytes], *, tls: bool = False, tls_required: bool = False) -> Harness:
    """Feed pieces; a RemoteProtocolError ends the run (already checked by the harness)."""
    h = Harness(tls=tls, tls_required=tls_required)
    for p in pieces:
        try:
            h.feed(p)
        except RemoteProtocolError:
            assert h.conn.receive_data(b"more") == [], "nothing is read after a fatal error"
            break
    h.feed(b"")  # EOF is always safe
    return h


def depth(h: Harness) -> None:
    """Record how deep an input got (pytest --hypothesis-show-statistics)."""
    event(f"reached {h.mode}")
    event(f"option replies: {'3+' if h.option_replies >= 3 else h.option_replies}")
    event(f"request replies: {'3+' if h.replies >= 3 else h.replies}")


tls_modes = st.sampled_from([(False, False), (True, False), (True, True)])


# ---------------------------------------------------------------------------- (a) no crash


@FUZZ
@given(st.data(), st.binary(max_size=600), tls_modes)
def test_arbitrary_bytes_from_the_start(
    data: st.DataObject, raw: bytes, tls: tuple[bool, bool]
) -> None:
    # Valid client flags first half of the time, so the junk reaches option parsing.
    if data.draw(st.booleans()):
        raw = struct.pack(">I", data.draw(st.sampled_from([0, 1, 2, 3]))) + b"IHAVEOPT" + raw
    depth(run(data.draw(splits(raw)), tls=tls[0], tls_required=tls[1]))


@FUZZ
@given(st.data(), prefixes, st.binary(max_size=600))
def test_arbitrary_bytes_after_a_valid_handshake(
    data: st.DataObject, prefix: bytes, raw: bytes
) -> None:
    # Often keep the request magic so the junk reaches request parsing.
    if data.draw(st.booleans()):
        raw = struct.pack(">I", 0x25609513) + raw
    h = run(data.draw(splits(prefix + raw)))
    assert h.mode in ("transmission", "closed") or h.conn.closed
    depth(h)


@settings(FUZZ, max_examples=200)
@given(
    st.data(), st.lists(options, max_size=8), prefixes, st.lists(requests(), max_size=12),
    tls_modes,
)
def test_mutated_option_and_request_sequences(
    data: st.DataObject, opts: list[bytes], prefix: bytes, reqs: list[bytes],
    tls: tuple[bool, bool],
) -> None:
    stream = prefix[:4] + b"".join(opts) + prefix[4:] + b"".join(reqs)
    stream = data.draw(mutated(stream))
    depth(run(data.draw(splits(stream)), tls=tls[0], tls_required=tls[1]))


@FUZZ
@given(st.data(), st.lists(options | final_options, max_size=10), tls_modes)
def test_option_sequences_in_any_order(
    data: st.DataObject, opts: list[bytes], tls: tuple[bool, bool]
) -> None:
    stream = struct.pack(">I", data.draw(st.sampled_from([1, 3]))) + b"".join(opts)
    depth(run(data.draw(splits(stream)), tls=tls[0], tls_required=tls[1]))


@settings(FUZZ, max_examples=200)
@given(st.data(), prefixes, st.lists(requests(), min_size=1, max_size=20))
def test_valid_framing_with_random_request_fields_reaches_every_check(
    data: st.DataObject, prefix: bytes, reqs: list[bytes]
) -> None:
    h = run(data.draw(splits(prefix + b"".join(reqs))))
    assert h.mode in ("transmission", "closed")
    depth(h)


def test_fuzz_harness_is_not_vacuous() -> None:
    """The parser sees real replies: a fixed session yields options, data and errors."""
    h = run([
        handshake_prefix(True, True, "rw", True)
        + wire.REQUEST.pack(0x25609513, 0, Cmd.READ, 1, 0, 100)
        + wire.REQUEST.pack(0x25609513, 0, Cmd.WRITE, 2, 0, 3) + b"abc"
        + wire.REQUEST.pack(0x25609513, 0, Cmd.BLOCK_STATUS, 3, 0, 100)
        + wire.REQUEST.pack(0x25609513, 0, Cmd.CACHE, 4, 0, 100)
        + wire.REQUEST.pack(0x25609513, 0, 77, 5, 0, 100)
        + wire.REQUEST.pack(0x25609513, 0, Cmd.READ, 6, SIZE, 100)
    ])
    assert h.mode == "transmission" and h.replies == 6 and h.option_replies == 6
    assert h.last_option_acked == Opt.GO
    assert h.disk[:3] == b"abc"


# ------------------------------------------------------------------- (b) read your writes


@st.composite
def extent(draw: st.DrawFn) -> tuple[int, int]:
    """(offset, length) inside the export, length 1..9000 bytes."""
    offset = draw(st.integers(0, SIZE - 1))
    return offset, draw(st.integers(1, min(SIZE - offset, 9000)))


class ReadYourWrites(RuleBasedStateMachine):
    """ClientConnection -> ServerConnection -> bytearray, against a model bytearray."""

    def __init__(self) -> None:
        super().__init__()
        self.model = bytearray(bytes(range(251)) * (SIZE // 251 + 1))[:SIZE]
        self.disk = bytearray(self.model)
        self.server = ServerConnection(Catalog())
        self.client: ClientConnection | None = None
        self.pending: dict[int, bytes | None] = {}  # cookie -> expected READ data
        self.checked_reads = 0

    @initialize(structured=st.booleans(), piece=st.integers(1, 64))
    def connect(self, structured: bool, piece: int) -> None:
        self.client = ClientConnection("rw", structured=structured)
        events = self.exchange(piece)
        assert [type(e) for e in events] == [Negotiated]

    def exchange(self, piece: int) -> list[object]:
        """Move all bytes both ways, ``piece`` bytes at a time; return the client's events."""
        assert self.client is not None
        events: list[object] = []
        while True:
            c2s = b"".join(bytes(b) for b in self.client.data_to_send())
            for i in range(0, len(c2s), piece):
                for ev in self.server.receive_data(c2s[i : i + piece]):
                    if isinstance(ev, Request):
                        self.serve(ev)
                    assert not isinstance(ev, RequestRejected), ev
            s2c = b"".join(bytes(b) for b in self.server.data_to_send())
            for i in range(0, len(s2c), piece):
                events += self.client.receive_data(s2c[i : i + piece])
            if not c2s and not s2c:
                return events

    def serve(self, ev: Request) -> None:
        a, b = ev.offset, ev.offset + ev.length
        if ev.command is Cmd.READ:
            self.server.reply_read(ev, [bytes(self.disk[a:b])])
            return
        if ev.command is Cmd.WRITE:
            self.disk[a:b] = ev.data
        elif ev.command in (Cmd.TRIM, Cmd.WRITE_ZEROES):
            self.disk[a:b] = bytes(ev.length)
        self.server.reply_ok(ev)

    @rule(where=extent(), seed=st.integers(0, 255), fua=st.booleans())
    def write(self, where: tuple[int, int], seed: int, fua: bool) -> None:
        assert self.client is not None
        off, n = where
        data = bytes((seed + i * 7) & 0xFF for i in range(n))
        cookie = self.client.request(Cmd.WRITE, off, flags=CmdFlag.FUA if fua else 0, data=data)
        self.model[off : off + n] = data
        self.pending[cookie] = None

    @rule(where=extent(), zero=st.booleans())
    def trim_or_zero(self, where: tuple[int, int], zero: bool) -> None:
        assert self.client is not None
        off, n = where
        cookie = self.client.request(Cmd.WRITE_ZEROES if zero else Cmd.TRIM, off, n)
        self.model[off : off + n] = bytes(n)  # our backend zeroes trimmed ranges too
        self.pending[cookie] = None

    @rule(where=extent())
    def read(self, where: tuple[int, int]) -> None:
        assert self.client is not None
        off, n = where
        cookie = self.client.request(Cmd.READ, off, n)
        self.pending[cookie] = bytes(self.model[off : off + n])

    @rule()
    def flush(self) -> None:
        assert self.client is not None
        self.pending[self.client.request(Cmd.FLUSH)] = None

    @rule(piece=st.sampled_from([1, 7, 512, 1 << 20]))
    def deliver(self, piece: int) -> None:
        for ev in self.exchange(piece):
            assert isinstance(ev, Reply)
            expected = self.pending.pop(ev.cookie)
            assert ev.error is Errno.OK, ev
            if expected is not None:
                assert ev.data == expected
                self.checked_reads += 1
        assert not self.pending

    @invariant()
    def disk_matches_model_once_delivered(self) -> None:
        if not self.pending:
            assert self.disk == self.model

    def teardown(self) -> None:
        if self.client is not None and not self.pending:
            self.client.request(Cmd.DISC)
            self.exchange(1 << 20)
            assert self.server.closed


ReadYourWrites.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestReadYourWrites = ReadYourWrites.TestCase
