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
from nbdraw import CLOSE_WAIT, RawClient, closed_by_server, connect, expected, still_open

from nbd import wire
from nbd.constants import (
    ClientFlag,
    Cmd,
    Errno,
    Opt,
    Rep,
)

MiB = 1 << 20
#: Size of the test export: big enough for a 64 MiB READ and a 40 MiB WRITE inside it.
EXPORT_SIZE = 80 * MiB
#: Bytes of random data at the start of the image (the rest is a sparse hole).
DATA_SIZE = 4 * MiB

ServerFactory = Callable[..., Server]


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
            ("READ over the 64 MiB maximum", lambda: c.read(0, wire.MAX_PAYLOAD + 4096)[0],
             Errno.EINVAL),
        ]
        for what, do, want in cases:
            got = do()
            assert got == want, f"{what}: {got} instead of {want.name}"
            alive(c)

    with connect(srv.port, "rw", structured=structured) as c:
        err = c.simple(Cmd.WRITE, size - 4096, 8192, data=bytes(8192))
        assert err == Errno.ENOSPC
        alive(c)
        # Over the 64 MiB payload limit but under the drain limit: refused, drained.
        big = b"\xab" * (wire.MAX_PAYLOAD + 8 * MiB)
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


def _open_idle(port: int, n: int, stack: ExitStack,
               source: str = "127.0.0.1") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        stack.callback(s.close)
        socks.append(s)
    return socks


def test_idle_clients_do_not_block_a_real_one(srv: Server, disk: Path) -> None:
    """200 idle connections from one address: the first 16 (--address-handshakes) are held,
    the others closed at once; a client from another address is served."""
    require("nbdinfo")
    with ExitStack() as stack:
        idle = _open_idle(srv.port, 200, stack, source="127.0.0.2")
        out = subprocess.run(["nbdinfo", "--size", srv.uri("ro")], capture_output=True,
                             text=True, timeout=30, check=True)
        assert int(out.stdout) == EXPORT_SIZE
        check_serves(srv.port, "ro", disk)
        # The idle ones within the address's bound are still there (default handshake
        # timeout: 10 s); the rest were refused.
        time.sleep(0.3)
        held = [s for s in idle if still_open(s, 0.01)]
        assert len(held) == 16


def test_handshake_timeout_closes_idle_clients(
        server_factory: ServerFactory, disk: Path) -> None:
    srv = server_factory("--export", f"ro={disk}", "--handshake-timeout", "2",
                         "--address-handshakes", "300", "--address-connections", "300")
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
                         "--handshake-timeout", "60", "--address-connections", "100",
                         "--address-handshakes", "100", "--reserved-connections", "0")
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
