"""Graceful shutdown of a running ``icbd-cache serve`` on SIGTERM and SIGINT.

What the server promises (icbdcache/server.py): on the signal it stops accepting at once,
lets replies already in flight finish within ``--grace`` seconds, closes every connection,
removes its Unix socket and exits 0.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Server, require, sha256_file
from nbdraw import RawClient, closed_by_server, connect, expected

from nbd.constants import Cmd

MiB = 1 << 20
GRACE = 3.0
#: Time the server may take beyond the grace period to exit (seconds).
SLACK = 4.0
SIGNALS = [signal.SIGTERM, signal.SIGINT]
ServerFactory = Callable[..., Server]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A 32 MiB image of random-looking, nonzero data (no holes for nbdcopy to skip)."""
    path = tmp_path / "disk.img"
    block = bytes(range(256)) * 4096 + b"\x5a"  # 1 MiB + 1: every MiB is shifted by one
    with open(path, "wb") as f:
        for _ in range(32):
            f.write(block[: 1 * MiB])
            block = block[1:] + block[:1]
    return path


def refused_within(addr: tuple[str, int] | str, timeout: float = 1.0) -> bool:
    """True once a connection to ``addr`` (TCP, or a Unix socket path) is refused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect(addr)
            except (ConnectionRefusedError, FileNotFoundError):
                return True
        time.sleep(0.01)
    return False


def wait_exit(srv: Server, timeout: float) -> int | None:
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_inflight_reads_complete_after_signal(
        server_factory: ServerFactory, disk: Path, tmp_path: Path, sig: int) -> None:
    unix = tmp_path / "nbd.sock"
    srv = server_factory("--export", f"lab={disk}", "--grace", str(GRACE), "--unix", str(unix))
    assert unix.exists()
    idle = RawClient(srv.port)  # still in the handshake: closed at once on shutdown
    idle.greeting()
    with connect(srv.port, "lab", structured=sig == signal.SIGINT) as c:
        offsets = [i * 3 * MiB + 4096 * i for i in range(8)]
        cookies = c.burst([(Cmd.READ, off, 1 * MiB) for off in offsets])
        srv.proc.send_signal(sig)
        signalled = time.monotonic()
        # New connections are refused while our replies are still to be read.
        assert refused_within((srv.host, srv.port)), "still accepting after the signal"
        assert refused_within(str(unix))
        assert closed_by_server(idle.sock, 2.0)
        got = {}
        for _ in offsets:
            cookie, err, data = c.next_reply()
            assert err == 0
            got[cookie] = data
        for cookie, off in zip(cookies, offsets, strict=True):
            assert got[cookie] == expected(disk, off, 1 * MiB), f"READ at {off}"
        # Then the server closes the connection and exits.
        assert closed_by_server(c.sock, GRACE + SLACK)
    code = wait_exit(srv, GRACE + SLACK - (time.monotonic() - signalled))
    assert code == 0, srv.log_text()[-2000:]
    assert not unix.exists(), "Unix socket left behind"
    log = srv.log_text()
    assert "shutdown=begin" in log and "shutdown=done" in log
    assert "Traceback" not in log
    idle.close()


def wait_log(srv: Server, text: str, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while srv.log_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged: {srv.log_text()[-2000:]}"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_during_nbdcopy(server_factory: ServerFactory, tmp_path: Path,
                               sig: int) -> None:
    """nbdcopy of a 256 MiB image (small requests, about 2 s here) gets the signal after its
    two connections started: the server exits 0 within the grace time, every connection
    closed without aborting a reply, and nbdcopy sees its connections go."""
    require("nbdcopy")
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        for i in range(256):
            f.write(bytes([i % 255 + 1]) * MiB)
    unix = tmp_path / "nbd.sock"
    srv = server_factory("--export", f"big={image}", "--grace", str(GRACE),
                         "--unix", str(unix))
    out = tmp_path / "copy.img"
    copy = subprocess.Popen(
        ["nbdcopy", "--connections=2", "--request-size=16384", "--requests=32",
         srv.uri("big"), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_log(srv, "export=big", 2)
        time.sleep(0.2)
        assert copy.poll() is None, "nbdcopy finished before the signal: nothing was in flight"
        srv.proc.send_signal(sig)
        signalled = time.monotonic()
        assert refused_within((srv.host, srv.port)), "still accepting after the signal"
        code = wait_exit(srv, GRACE + SLACK)
        assert code == 0, f"exit status {code}: {srv.log_text()[-2000:]}"
        assert time.monotonic() - signalled < GRACE + SLACK
        _, err = copy.communicate(timeout=30)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    assert not unix.exists()
    log = srv.log_text()
    assert "shutdown=done unfinished=0" in log and "Traceback" not in log, log[-2000:]
    if copy.returncode == 0:  # finished before the signal landed: then the copy is whole
        assert sha256_file(out) == sha256_file(image)
    else:
        assert b"nbdcopy" in err or b"nbd://" in err, err


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_client_not_reading_is_cut_after_grace(server_factory: ServerFactory, disk: Path,
                                               sig: int) -> None:
    """A client that never reads its replies holds the shutdown up for ``--grace`` at
    most; then its connection is aborted and the server still exits 0."""
    grace = 1.0
    srv = server_factory("--export", f"lab={disk}", "--grace", str(grace))
    with connect(srv.port, "lab") as c:
        c.burst([(Cmd.READ, 0, 32 * MiB)] * 8)  # 256 MiB of replies, never read
        time.sleep(0.2)
        start = time.monotonic()
        srv.proc.send_signal(sig)
        assert wait_exit(srv, grace + SLACK) == 0, srv.log_text()[-2000:]
        assert grace - 0.1 <= time.monotonic() - start < grace + SLACK
        # What the kernel still held for us arrives, then the end of the stream.
        assert closed_by_server(c.sock, 10.0)
    assert "shutdown=done unfinished=1" in srv.log_text()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_idle_server_exits_at_once(server_factory: ServerFactory, disk: Path,
                                   tmp_path: Path, sig: int) -> None:
    unix = tmp_path / "nbd.sock"
    srv = server_factory("--export", f"lab={disk}", "--grace", "30", "--unix", str(unix))
    # A client in transmission with nothing in flight does not hold the server up.
    with connect(srv.port, "lab") as c:
        err, data = c.read(0, 4096)
        assert err == 0 and data == expected(disk, 0, 4096)
        start = time.monotonic()
        srv.proc.send_signal(sig)
        assert wait_exit(srv, SLACK) == 0, srv.log_text()[-2000:]
        assert time.monotonic() - start < SLACK
        assert closed_by_server(c.sock, 1.0)
    assert not unix.exists()
