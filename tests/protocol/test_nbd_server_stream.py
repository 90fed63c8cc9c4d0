"""Large WRITEs in the sans-IO server: streamed in pieces (WritePiece), refused ones answered on
their header and drained, and the advertised maximum. Byte-level, no sockets."""

from __future__ import annotations

import os
import struct

import pytest

from nbd import wire
from nbd.constants import Cmd, CmdFlag, Errno
from nbd.constants import TransmissionFlag as TF
from nbd.errors import LocalProtocolError, RemoteProtocolError
from nbd.events import ExportInfo, Request, RequestRejected, WritePiece
from nbd.server import Event, ServerConnection, TransmissionState

MiB = 1 << 20
SIZE = 256 * MiB
RW = ExportInfo("rw", SIZE, TF.SEND_FLUSH | TF.SEND_FUA)
RO = ExportInfo("ro", SIZE, TF.READ_ONLY)
PIECE = 64 * 1024


class Catalog:
    def lookup(self, name: str) -> ExportInfo | None:
        return None

    def exports(self) -> list[tuple[str, str]]:
        return []


def conn(info: ExportInfo = RW, piece: int = PIECE,
         max_payload: int = wire.MAX_PAYLOAD) -> ServerConnection:
    flags = int(info.flags | TF.HAS_FLAGS)
    return ServerConnection.resume(Catalog(), info, TransmissionState(SIZE, flags, False, (),
                                                                      True),
                                   max_payload=max_payload, write_piece=piece)


def request(cmd: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, offset, length)


def simple(cookie: int, error: int = 0) -> bytes:
    return bytes.fromhex("67446698") + struct.pack(">IQ", error, cookie)


def feed(c: ServerConnection, data: bytes, chunk: int) -> list[Event]:
    events: list[Event] = []
    for i in range(0, len(data), chunk):
        events += c.receive_data(data[i : i + chunk])
    return events


@pytest.mark.parametrize("chunk", [1000, 65536, 300_000, 10 * MiB])
@pytest.mark.parametrize("offset", [0, 4096 * 3 + 512])
def test_streamed_write_arrives_in_aligned_pieces_that_cover_it(chunk: int,
                                                                offset: int) -> None:
    payload = os.urandom(PIECE * 5 + 777)
    c = conn()
    events = feed(c, request(Cmd.WRITE, 7, offset, len(payload), CmdFlag.FUA) + payload
                  + request(Cmd.FLUSH, 8, 0, 0), chunk)
    head, *pieces, flush = events
    assert isinstance(head, Request) and head.streamed and head.data == b""
    assert (head.cookie, head.offset, head.length, head.flags) == (7, offset, len(payload),
                                                                   CmdFlag.FUA)
    assert all(isinstance(p, WritePiece) and p.request is head for p in pieces)
    got = b"".join(bytes(p.data) for p in pieces)  # type: ignore[union-attr]
    assert got == payload
    at = offset
    for p in pieces:
        assert isinstance(p, WritePiece)
        assert p.offset == at and len(p.data) <= PIECE
        at += len(p.data)
        if not p.last:  # every piece but the last ends on a piece boundary of the export
            assert at % PIECE == 0
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]  # type: ignore[union-attr]
    assert isinstance(flush, Request) and flush.command is Cmd.FLUSH and flush.cookie == 8
    assert c.data_to_send() == []  # the caller answers


def test_write_up_to_the_piece_size_is_whole() -> None:
    c = conn()
    data = os.urandom(PIECE)
    (ev,) = c.receive_data(request(Cmd.WRITE, 1, 0, PIECE) + data)
    assert isinstance(ev, Request) and not ev.streamed and bytes(ev.data) == data


def test_sixty_four_mib_is_advertised_and_accepted() -> None:
    assert 64 * MiB == wire.MAX_PAYLOAD
    c = conn(piece=wire.WRITE_PIECE)
    events = c.receive_data(request(Cmd.WRITE, 1, 0, 64 * MiB) + bytes(64 * MiB))
    assert isinstance(events[0], Request) and events[0].streamed
    assert len(events) == 1 + 64 * MiB // wire.WRITE_PIECE
    (read,) = c.receive_data(request(Cmd.READ, 2, 0, 64 * MiB))
    assert isinstance(read, Request) and read.length == 64 * MiB


def test_write_over_the_maximum_is_answered_on_its_header_then_drained() -> None:
    c = conn(max_payload=1 * MiB)
    (ev,) = c.receive_data(request(Cmd.WRITE, 3, 0, 2 * MiB) + bytes(1000))
    assert isinstance(ev, RequestRejected) and ev.error is Errno.EINVAL
    assert b"".join(bytes(b) for b in c.data_to_send()) == simple(3, 22)
    # the rest of the payload (which looks like a request) is dropped, not parsed
    fake = request(Cmd.READ, 99, 0, 512) * ((2 * MiB - 1000) // 28)
    fake += bytes(2 * MiB - 1000 - len(fake))
    assert feed(c, fake, 100_000) == []
    (nxt,) = c.receive_data(request(Cmd.READ, 4, 0, 512))
    assert isinstance(nxt, Request) and nxt.cookie == 4


def test_streamed_write_on_a_read_only_export_is_eperm_and_drained() -> None:
    c = conn(RO)
    events = feed(c, request(Cmd.WRITE, 5, 0, 3 * PIECE) + bytes(3 * PIECE)
                  + request(Cmd.READ, 6, 0, 512), 4096)
    assert [type(e) for e in events] == [RequestRejected, Request]
    assert isinstance(events[0], RequestRejected) and events[0].error is Errno.EPERM


def test_write_beyond_max_drain_ends_the_connection() -> None:
    c = conn()
    with pytest.raises(RemoteProtocolError):
        c.receive_data(request(Cmd.WRITE, 9, 0, wire.MAX_DRAIN + 1))
    assert c.closed


def test_no_hand_over_in_the_middle_of_a_streamed_write() -> None:
    c = conn()
    c.receive_data(request(Cmd.WRITE, 1, 0, 2 * PIECE) + bytes(PIECE + 5))
    with pytest.raises(LocalProtocolError):
        c.transmission_state()
    events = c.receive_data(bytes(PIECE - 5))
    assert isinstance(events[-1], WritePiece) and events[-1].last
    assert c.transmission_state().pending == b""


def test_piece_size_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError):
        ServerConnection(Catalog(), write_piece=1000)
