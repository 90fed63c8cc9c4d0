"""A restart of ``icbd-cache serve`` costs its clients a pause, never their connection's data.

* ``--handover PATH`` (icbdcache/handover.py): a new server started with the same arguments,
  or spawned by the running one on SIGUSR2, takes the listening sockets and every idle
  connection over; the client keeps its TCP connection and its negotiated state (structured
  replies, meta contexts) and sees no error. What cannot cross safely is refused (clients of
  copy-on-write overlays) or closed (TLS), and a successor that fails leaves the old server
  serving (rollback).
* Socket activation (icbdcache/activation.py): with the listening socket held by another
  process (systemd, here the test), a client that connects while the server is down waits in
  the accept queue and is served when the server is back, within a bound measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, free_port, make_image, stop_process, wait_port
from nbdraw import RawClient, ServerClosed, closed_by_server, connect, expected

from icbdcache import activation
from icbdcache.handover import Channel, HandoverError
from icbdcache.server import flags_fit
from nbd import aio
from nbd.constants import Cmd, TransmissionFlag

ICBD = str(BIN / "icbd-cache")
MiB = 1 << 20
#: Seconds a restarted server may take from its start to serving a client waiting in the
#: accept queue (Python start, store and exports opened; generous for a loaded test host).
SERVE_BOUND = 10.0


def stable_port() -> int:
    """A free TCP port outside the kernel's ephemeral range: a port a restarted server binds
    again after seconds down must not be taken meanwhile by some process's outgoing
    connection (free_port's ports are ephemeral ones)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    candidates = [p for p in range(10000, 32768) if not low <= p <= high]
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return free_port()


@dataclass
class Proc:
    """One ``icbd-cache serve`` process of a test (started here, stopped by PID)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the log:\n{self.text()[-3000:]}")


@dataclass
class Servers:
    """Servers started by a test with shared arguments; all stopped at teardown."""

    tmp: Path
    args: list[str]
    started: list[Proc] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # processes started by our servers

    def start(self, *extra: str, prefix: tuple[str, ...] = (),
              pass_fds: tuple[int, ...] = ()) -> Proc:
        log = self.tmp / f"serve-{len(self.started)}.log"
        env = {**os.environ, "TMPDIR": str(self.tmp)}  # the default --cow-dir goes here
        with open(log, "wb") as out:
            p = subprocess.Popen([*prefix, ICBD, "serve", *self.args, *extra], stdout=out,
                                 stderr=subprocess.STDOUT, pass_fds=pass_fds, env=env)
        proc = Proc(p, log)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.started:
            stop_process(p.proc)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path, [])
    yield s
    s.stop_all()


def handover_args(tmp: Path, image: Path, port: int, *more: str) -> list[str]:
    return ["--export", f"disk={image}", "--listen", f"127.0.0.1:{port}",
            "--handover", str(tmp / "handover.sock"), "--grace", "5", *more]


async def _reads(c: aio.AsyncClient, data: bytes, stop: asyncio.Event,
                 counts: list[int]) -> None:
    """Random 64 KiB reads checked against ``data`` until ``stop``; counts[0] += 1 each."""
    rng = random.Random(os.getpid())
    while not stop.is_set():
        off = rng.randrange(0, len(data) - 65536) & ~511
        got = await asyncio.wait_for(c.pread(off, 65536), 30)
        assert got == data[off: off + 65536], f"wrong bytes at {off}"
        counts[0] += 1


def test_handover_keeps_clients_and_their_state(servers: Servers, image: Path,
                                                tmp_path: Path) -> None:
    """Four readers on one structured connection with base:allocation keep reading while a
    new server takes over: no error, same TCP connection (same client port in both logs),
    block status still answered, the old server exits 0 after handing over one connection."""
    data = image.read_bytes()
    port = free_port()
    servers.args = handover_args(tmp_path, image, port)
    old = servers.start()
    wait_port("127.0.0.1", port)

    async def main() -> tuple[int, int, list[tuple[int, int]], str]:
        c = await aio.connect("127.0.0.1", port, "disk", structured=True,
                              meta_contexts=("base:allocation",), timeout=10)
        local = c.get_extra_info("sockname")
        stop, counts = asyncio.Event(), [0]
        tasks = [asyncio.create_task(_reads(c, data, stop, counts)) for _ in range(4)]
        await asyncio.sleep(0.5)
        before = counts[0]
        new = servers.start()
        rc = await asyncio.to_thread(old.proc.wait, 60)
        assert rc == 0, old.text()
        await asyncio.sleep(1.0)  # reads go on against the new server
        stop.set()
        await asyncio.gather(*tasks)
        extents = await c.block_status(0, 4 * MiB)
        await c.close()
        new.wait_log(r"shutdown|conn=\d+")  # it runs
        assert counts[0] > before + 10, (before, counts[0])
        return before, counts[0], list(extents), f"127.0.0.1:{local[1]}"

    before, after, extents, peer = asyncio.run(main())
    assert extents and sum(n for n, _ in extents) >= 3 * MiB, extents
    new = servers.started[1]
    assert re.search(r"handover=done .*connections=1 closed=0", old.text()), old.text()
    assert f"peer={peer} export=disk handed_over_from=" in new.text(), new.text()
    assert re.search(rf"peer={re.escape(peer)} .*structured=yes meta=base:allocation",
                     new.text())
    assert f"listening=127.0.0.1:{port} passed=yes" in new.text()
    print(f"reads: {before} before the hand-over, {after} in all")


def test_handover_carries_a_request_cut_in_two(servers: Servers, image: Path,
                                               tmp_path: Path) -> None:
    """The first 10 bytes of a READ header reach the old server, the rest the new one: the
    new server answers it whole (the unparsed bytes crossed with the socket)."""
    port = free_port()
    servers.args = handover_args(tmp_path, image, port)
    old = servers.start()
    wait_port("127.0.0.1", port)
    c = connect(port, "disk")
    try:
        assert c.read(0, 4096) == (0, expected(image, 0, 4096))
        c.cookie += 1
        header = struct.pack(">IHHQQI", 0x25609513, 0, int(Cmd.READ), c.cookie, 8 * MiB, 4096)
        c.send(header[:10])
        time.sleep(0.5)  # the old server has read the 10 bytes
        new = servers.start()
        assert old.proc.wait(60) == 0, old.text()
        c.send(header[10:])
        magic, err, cookie = struct.unpack(">IIQ", c.recv_exact(16))
        assert (magic, err, cookie) == (0x67446698, 0, c.cookie)
        assert c.recv_exact(4096) == expected(image, 8 * MiB, 4096)
        assert c.read(MiB, 512) == (0, expected(image, MiB, 512))
    finally:
        c.close()
    assert re.search(r"handed_over_from=\d+ pending=10 ", new.text()), new.text()


def test_handover_refused_while_overlays_live_here(servers: Servers, image: Path,
                                                  tmp_path: Path) -> None:
    """A copy-on-write client's overlay lives in the old process: the successor is refused
    (exit 1, the reason on stderr) and the old server goes on serving that client."""
    port = free_port()
    servers.args = ["--export", f"disk={image},cow", "--listen", f"127.0.0.1:{port}",
                    "--handover", str(tmp_path / "handover.sock")]
    old = servers.start()
    wait_port("127.0.0.1", port)
    c = connect(port, "disk")
    try:
        assert c.simple(Cmd.WRITE, 0, 4096, data=b"\x42" * 4096) == 0
        new = servers.start()
        assert new.proc.wait(60) == 1
        assert "refuses: 1 connection(s) used copy-on-write overlays" in new.text(), new.text()
        assert old.proc.poll() is None
        assert c.read(0, 4096) == (0, b"\x42" * 4096)
    finally:
        c.close()


def test_handover_rolls_back_when_the_successor_fails(servers: Servers, tmp_path: Path,
                                                      image: Path) -> None:
    """The successor cannot start its PXE service (its HTTP port is taken): the old server
    takes its listening socket, its PXE service and its connection back, and serves on."""
    store = tmp_path / "store"
    subprocess.run([ICBD, "import", str(image), "--imi", "lab", "--store", str(store)],
                   check=True, capture_output=True)
    port, http = stable_port(), stable_port()
    common = ["--store", str(store), "--listen", f"127.0.0.1:{port}", "--handover",
              str(tmp_path / "handover.sock"), "--pxe", "--pxe-tftp-port", "off"]
    old = servers.start(*common, "--pxe-http-port", str(http))
    wait_port("127.0.0.1", port)
    wait_port("127.0.0.1", http)
    c = connect(port, "lab@1")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        assert c.read(0, 4096) == (0, expected(image, 0, 4096))
        new = servers.start(*common, "--pxe-http-port", str(blocker.getsockname()[1]))
        assert new.proc.wait(60) != 0
        old.wait_log(r"handover=\"rolled back\"")
        assert old.proc.poll() is None
        assert c.read(2 * MiB, 4096) == (0, expected(image, 2 * MiB, 4096))
        wait_port("127.0.0.1", http)
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/boot.ipxe", timeout=10) as r:
            assert r.read().startswith(b"#!ipxe")
        with RawClient(port) as c2:  # accepting again
            c2.handshake()
    finally:
        blocker.close()
        c.close()


def sigusr2_handover(servers: Servers, old: Proc) -> int:
    """SIGUSR2 to ``old``: the successor it starts (noted for teardown) takes over, and
    ``old`` exits 0. Returns the successor's PID."""
    old.proc.send_signal(signal.SIGUSR2)
    succ = int(old.wait_log(r"signal=SIGUSR2 successor=(\d+)").group(1))
    servers.pids.append(succ)
    assert old.proc.wait(60) == 0, old.text()
    return succ


def test_sigusr2_starts_a_successor_that_takes_over(servers: Servers, image: Path,
                                                    tmp_path: Path) -> None:
    """kill -USR2: the running server starts its own successor (same command line) which
    takes the connection over; the old one exits 0, the client reads on."""
    port = free_port()
    servers.args = handover_args(tmp_path, image, port)
    old = servers.start()
    wait_port("127.0.0.1", port)
    c = connect(port, "disk", structured=True)
    try:
        assert c.read(0, 4096) == (0, expected(image, 0, 4096))
        pid = sigusr2_handover(servers, old)
        assert re.search(r"handover=done .*connections=1 ", old.text())
        assert c.read(4 * MiB, 8192) == (0, expected(image, 4 * MiB, 8192))
        os.kill(pid, 0)  # the successor serves
    finally:
        c.close()
    # its log lines went to the old server's stdout (inherited)
    assert re.search(r"handover=taken connections=1 refused=0", old.text()), old.text()


def test_handover_closes_what_cannot_cross(servers: Servers, image: Path,
                                           tmp_path: Path) -> None:
    """A connection still negotiating is closed at the hand-over (its client retries); the
    one in transmission crosses."""
    port = free_port()
    servers.args = handover_args(tmp_path, image, port)
    old = servers.start()
    wait_port("127.0.0.1", port)
    c = connect(port, "disk")
    half = RawClient(port)
    try:
        half.greeting()
        servers.start()
        assert old.proc.wait(60) == 0
        assert closed_by_server(half.sock)
        assert c.read(MiB, 4096) == (0, expected(image, MiB, 4096))
    finally:
        half.close()
        c.close()
    # with workers, each hands over its own: the two connections may be in two of them
    done = re.findall(r"handover=done .*connections=(\d+) closed=(\d+)", old.text())
    assert done and (sum(int(a) for a, _ in done), sum(int(b) for _, b in done)) == (1, 1), \
        old.text()


# ------------------------------------------------------------------- socket activation

SHIM = """\
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_socket_activation_keeps_clients_waiting_through_a_crash(
        servers: Servers, image: Path, tmp_path: Path) -> None:
    """The listening socket is held here (as systemd's .socket unit holds it) and passed as
    descriptor 3 with LISTEN_FDS/LISTEN_PID. After SIGKILL a client connecting meanwhile is
    not refused: it waits in the accept queue and gets its greeting from the restarted
    server within SERVE_BOUND seconds of the restart; then it reads the right bytes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    shim = (sys.executable, "-c", SHIM, str(fd))
    servers.args = ["--export", f"disk={image}", "--listen", "127.0.0.1:1"]  # not bound
    try:
        first = servers.start(prefix=shim, pass_fds=(fd,))
        first.wait_log(rf"listening=127.0.0.1:{port} passed=yes")
        c = connect(port, "disk")
        assert c.read(0, 4096) == (0, expected(image, 0, 4096))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        assert closed_by_server(c.sock)
        c.close()
        waiting = RawClient(port, timeout=SERVE_BOUND + 30)  # connects: the socket lives
        time.sleep(2.0)
        t0 = time.monotonic()
        second = servers.start(prefix=shim, pass_fds=(fd,))
        with waiting:
            waiting.handshake()  # the greeting comes once the new server accepts
            served = time.monotonic() - t0
            assert waiting.go("disk") == 0x1
            assert waiting.read(3 * MiB, 4096) == (0, expected(image, 3 * MiB, 4096))
        assert served < SERVE_BOUND, f"served {served:.1f} s after the restart"
        m = second.wait_log(r"serving=yes startup_s=([0-9.]+)")
        print(f"restart to greeting: {served:.2f} s; server's own startup "
              f"{m.group(1)} s")
    finally:
        listener.close()


# ------------------------------------------------------------------------------- units


def test_listen_sockets_follow_the_protocol() -> None:
    """Descriptors meant for another process (LISTEN_PID) are not taken; the variables are
    removed either way, so children do not take them for theirs."""
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert activation.listen_sockets(env) == []
    assert env == {}
    assert activation.listen_sockets({}) == []
    with pytest.raises(ValueError, match="not a number"):
        activation.listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})


def test_notify_sends_to_the_notify_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        assert activation.notify("READY=1", {"NOTIFY_SOCKET": path})
        assert s.recv(100) == b"READY=1"
    assert not activation.notify("READY=1", {})
    assert not activation.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "none")})


def test_watchdog_pings_to_a_manager_that_reads_nothing_are_dropped(tmp_path: Path) -> None:
    """A manager whose queue is full (net.unix.max_dgram_qlen messages unread): a blocking
    send held the server's event loop until it read (a scrape of /metrics timed out beside
    two workers' pings). Pings are now dropped, and every message gets through again once
    it reads."""
    path = str(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": path}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        sent: list[bool] = []
        t = threading.Thread(target=lambda: sent.extend(
            activation.notify("WATCHDOG=1", env, wait=0) for _ in range(200)))
        t.start()
        t.join(30)
        assert not t.is_alive() and len(sent) == 200
        queued = sent.count(True)
        assert 0 < queued < 200 and sent[queued:] == [False] * (200 - queued), queued
        got = 0
        s.settimeout(0.5)
        with contextlib.suppress(TimeoutError):
            while s.recv(100) == b"WATCHDOG=1":
                got += 1
        assert got == queued
        assert activation.notify("STOPPING=1", env)
        assert s.recv(100) == b"STOPPING=1"


def test_flags_fit() -> None:
    ro, flush, trim = (int(f) for f in (TransmissionFlag.READ_ONLY,
                                        TransmissionFlag.SEND_FLUSH,
                                        TransmissionFlag.SEND_TRIM))
    assert flags_fit(ro | flush, ro | flush)
    assert flags_fit(ro, flush)  # told read-only, may now write: it never will
    assert not flags_fit(flush, ro | flush)  # told writable, now read-only
    assert not flags_fit(flush | trim, flush)  # told TRIM works, not any more
    assert flags_fit(flush, flush | trim | int(TransmissionFlag.CAN_MULTI_CONN))


def test_channel_frames_with_descriptors() -> None:
    """A frame carries its JSON, its blob and its descriptors; frames do not merge."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    tx, rx = Channel(a, 5), Channel(b, 5)
    def sender() -> None:
        tx.send({"op": "conn", "n": 1}, [r], b"x" * 1_000_000)
        tx.send({"op": "done"})

    th = threading.Thread(target=sender)
    th.start()
    try:
        msg, fds, blob = rx.recv()
        th.join(10)
        assert msg == {"op": "conn", "n": 1} and blob == b"x" * 1_000_000 and len(fds) == 1
        os.write(w, b"ping")
        assert os.read(fds[0], 4) == b"ping"
        os.close(fds[0])
        assert rx.recv() == ({"op": "done"}, [], b"")
        tx.close()
        with pytest.raises(HandoverError, match="closed"):
            rx.recv()
    finally:
        os.close(r)
        os.close(w)
        rx.close()


def test_handover_keeps_the_idle_clock_and_the_address_counts(servers: Servers, image: Path,
                                                              tmp_path: Path) -> None:
    """Limits cross with the connections (issue 14): the successor counts the connections it
    carries on against their address (a third from it is refused under
    --address-connections 2), and a connection idle for 2 s before the hand-over is closed
    --idle-timeout (6 s) after its last request, not 6 s after the hand-over."""
    port = free_port()
    servers.args = handover_args(tmp_path, image, port, "--idle-timeout", "6",
                                 "--address-connections", "2")
    old = servers.start()
    wait_port("127.0.0.1", port)
    time.sleep(0.3)  # wait_port's probe connection is gone
    c1, c2 = connect(port, "disk"), connect(port, "disk")
    try:
        assert c1.read(0, 4096) == (0, expected(image, 0, 4096))
        t0 = time.monotonic()
        time.sleep(2.0)
        assert c2.read(0, 512) == (0, expected(image, 0, 512))  # c2 stays busy
        new = servers.start()
        assert old.proc.wait(60) == 0, old.text()
        handed = time.monotonic()
        assert handed - t0 < 5.0, "the hand-over took too long for this test to tell"
        with RawClient(port) as c3, pytest.raises(ServerClosed):  # refused
            c3.greeting()
        assert closed_by_server(c1.sock, t0 + 6.0 + 2.0 - time.monotonic())
        closed_at = time.monotonic()
        assert closed_at < handed + 6.0, (closed_at - t0, handed - t0)
        assert c2.read(MiB, 512) == (0, expected(image, MiB, 512))
    finally:
        c1.close()
        c2.close()
    assert re.search(r'event=refused .*reason="address connection limit"', new.text()), \
        new.text()
    assert 'closed="idle 6 s"' in new.text(), new.text()


def test_workers_each_hand_over_to_the_successors_worker(servers: Servers, image: Path,
                                                         tmp_path: Path) -> None:
    """``--workers 2 --handover``: SIGUSR2 to the parent starts a successor; each old worker
    hands its connections to the successor's worker of the same index, the old parent exits
    0, and all 8 clients (on both workers) read on over the same TCP connections."""
    port = free_port()
    servers.args = handover_args(tmp_path, image, port, "--workers", "2")
    old = servers.start()
    wait_port("127.0.0.1", port)
    old.wait_log(r"handover_socket=\S*-w0")
    old.wait_log(r"handover_socket=\S*-w1")
    clients = [connect(port, "disk", structured=True) for _ in range(8)]
    try:
        for c in clients:
            assert c.read(0, 4096) == (0, expected(image, 0, 4096))
        pids = {int(p) for p in re.findall(r"pid=(\d+) event=connect ", old.text())}
        assert len(pids) == 2, old.text()  # both workers hold clients
        succ = sigusr2_handover(servers, old)
        for i, c in enumerate(clients):
            off = (i + 1) * MiB
            assert c.read(off, 8192) == (0, expected(image, off, 8192)), i
        os.kill(succ, 0)  # the successor serves
    finally:
        for c in clients:
            c.close()
    text = old.text()  # the successor's log lines went to the old one's stdout
    done = re.findall(r"pid=(\d+) event=handover handover=done to_pid=(\d+) connections=(\d+)",
                      text)
    assert {int(p) for p, _, _ in done} == pids, text
    assert sum(int(n) for _, _, n in done) == 8, text
    taken = re.findall(r"pid=(\d+) event=handover handover=taken connections=(\d+) refused=0",
                       text)
    assert {int(p) for p, _ in taken} == {int(t) for _, t, _ in done}, text
    assert sum(int(n) for _, n in taken) == 8, text


def test_a_successor_with_another_number_of_workers_is_refused(
        servers: Servers, image: Path, tmp_path: Path) -> None:
    """A successor started with ``--workers 1`` against a running ``--workers 2`` (or 3)
    exits 1 naming both numbers before it takes anything; the running server serves on."""
    port = free_port()
    servers.args = handover_args(tmp_path, image, port)
    old = servers.start("--workers", "2")
    wait_port("127.0.0.1", port)
    old.wait_log(r"handover_socket=.*-w1")
    c = connect(port, "disk", structured=True)
    try:
        for n in ("1", "3"):
            new = servers.start("--workers", n)
            assert new.proc.wait(60) == 1, new.text()
            assert (f"has 2 worker(s), this one {n}: a hand-over needs the same --workers"
                    in new.text()), new.text()
        assert c.read(2 * MiB, 4096) == (0, expected(image, 2 * MiB, 4096))
        assert old.proc.poll() is None
        assert "handover=begin" not in old.text()
    finally:
        c.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_handover_with_metrics_listen(servers: Servers, image: Path, tmp_path: Path,
                                      workers: str) -> None:
    """The shipped serve.toml's pair, ``--metrics-listen`` beside ``--handover``: the
    successor bound the metrics address before taking over, found it in use and failed, so a
    planned restart never happened (and with workers, the successor stopped all of them). Now
    it listens there once the predecessor has let go; the client reads on and the successor
    answers the scrape."""
    port, mport = free_port(), free_port()
    servers.args = handover_args(tmp_path, image, port, "--workers", workers,
                                 "--metrics-listen", f"127.0.0.1:{mport}")
    old = servers.start()
    wait_port("127.0.0.1", port)
    wait_port("127.0.0.1", mport)
    c = connect(port, "disk", structured=True)
    try:
        assert c.read(0, 4096) == (0, expected(image, 0, 4096))
        succ = sigusr2_handover(servers, old)
        assert c.read(3 * MiB, 8192) == (0, expected(image, 3 * MiB, 8192))
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics",
                                            timeout=5) as r:
                    text = r.read().decode()
                if f"icbd_workers_scraped {float(workers)}" in text or workers == "1":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, old.text()
            time.sleep(0.1)
        os.kill(succ, 0)
        assert "icbd_nbd_connections" in text
    finally:
        c.close()
    assert re.search(r"handover=taken connections=1 refused=0", old.text()), old.text()
    assert "address already in use" not in old.text()


def test_a_workers_handover_cut_off_keeps_what_crossed(servers: Servers, image: Path,
                                                       tmp_path: Path) -> None:
    """``--workers 2``: old worker 1 is killed in the middle of the hand-over. The
    successor's worker 0 waits for its worker 1 before it takes any client; worker 1 takes
    nothing and serves on a socket of its own; then worker 0's clients cross and read on
    (the successor stopped every worker, dropping them). The old parent does not start
    worker 1 again (it served on beside the successor) and exits."""
    port = free_port()
    servers.args = handover_args(tmp_path, image, port, "--workers", "2")
    old = servers.start()
    wait_port("127.0.0.1", port)
    old.wait_log(r"handover_socket=\S*-w1")
    m = re.search(r"workers=2 pids=(\d+),(\d+)", old.text())
    assert m, old.text()
    w0, w1 = int(m.group(1)), int(m.group(2))
    clients = [connect(port, "disk", structured=True) for _ in range(12)]
    try:
        for c in clients:
            assert c.read(0, 4096) == (0, expected(image, 0, 4096))
        on_w0 = [c for c in clients
                 if f"pid={w0} event=connect conn=" in old.text()
                 and re.search(rf"pid={w0} event=connect conn=\d+ peer=127\.0\.0\.1:"
                               rf"{c.sock.getsockname()[1]} ", old.text())]
        assert on_w0, old.text()
        os.kill(w1, signal.SIGSTOP)
        old.proc.send_signal(signal.SIGUSR2)
        succ = int(old.wait_log(r"signal=SIGUSR2 successor=(\d+)").group(1))
        servers.pids.append(succ)
        # the successor's worker 0 has its predecessor's sockets and waits for worker 1
        old.wait_log(rf"pid={w0} event=handover handover=begin")
        time.sleep(0.5)
        assert f"pid={w0} event=handover handover=done" not in old.text()
        os.kill(w1, signal.SIGKILL)
        old.wait_log(r'handover="not taken" worker=1')
        old.wait_log(rf"pid={w0} event=handover handover=done")
        # the old parent starts no worker beside the successor's, and goes
        old.wait_log(r"worker=1 pid=\d+ status=-9 action=\"not started again: a successor")
        assert old.proc.wait(30) == 0, old.text()
        for i, c in enumerate(on_w0):
            off = (i + 1) * MiB
            assert c.read(off, 8192) == (0, expected(image, off, 8192)), i
        os.kill(succ, 0)  # the successor serves on
        fresh = connect(port, "disk", structured=True)
        try:
            assert fresh.read(5 * MiB, 4096) == (0, expected(image, 5 * MiB, 4096))
        finally:
            fresh.close()
    finally:
        for c in clients:
            with contextlib.suppress(OSError):
                c.close()
    assert "stopping the server" not in old.text(), old.text()


def test_a_successor_whose_worker_fails_takes_over_nothing(servers: Servers, tmp_path: Path,
                                                            image: Path) -> None:
    """``--workers 2 --pxe``: the successor's worker 0 cannot start its PXE service (its
    HTTP port is taken). Its worker 1 had taken its predecessor's client over and was
    stopped with it, so that client was lost. Now no worker takes a client before all have
    started: both predecessors roll back, and every client reads on from the old server."""
    store = tmp_path / "store"
    subprocess.run([ICBD, "import", str(image), "--imi", "lab", "--store", str(store)],
                   check=True, capture_output=True)
    port, http = stable_port(), stable_port()
    common = ["--store", str(store), "--listen", f"127.0.0.1:{port}", "--handover",
              str(tmp_path / "handover.sock"), "--pxe", "--pxe-tftp-port", "off",
              "--workers", "2"]
    old = servers.start(*common, "--pxe-http-port", str(http))
    wait_port("127.0.0.1", port)
    old.wait_log(r"handover_socket=\S*-w0")
    old.wait_log(r"handover_socket=\S*-w1")
    # the kernel hands each connection to a worker by a hash of its ports: clients are added
    # until both workers hold some (8 reach one worker only once in 128 tries)
    clients: list[RawClient] = []
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        pids: set[int] = set()
        while len(clients) < 8 or (len(pids) < 2 and len(clients) < 32):
            c = connect(port, "lab@1")
            clients.append(c)
            assert c.read(0, 4096) == (0, expected(image, 0, 4096))
            pids = {int(p) for p in re.findall(r"pid=(\d+) event=connect ", old.text())}
        assert len(pids) == 2, old.text()
        new = servers.start(*common, "--pxe-http-port", str(blocker.getsockname()[1]))
        assert new.proc.wait(60) != 0
        # each predecessor's worker logs its roll-back as it sees the successor gone: maybe
        # after the successor has exited
        deadline = time.monotonic() + 30
        while (len(re.findall(r'handover="rolled back"', old.text())) < 2
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert len(re.findall(r'handover="rolled back"', old.text())) == 2, old.text()
        assert "handover=done" not in old.text()
        for i, c in enumerate(clients):
            off = (i + 1) * MiB
            assert c.read(off, 4096) == (0, expected(image, off, 4096)), i
        assert old.proc.poll() is None
    finally:
        blocker.close()
        for c in clients:
            c.close()


def test_handover_refuses_a_connection_to_a_version_replaced_since(
        servers: Servers, tmp_path: Path) -> None:
    """A version replaced with ``import --force --force-in-use`` while a client reads it: the
    old server serves that client the old bytes, but the successor has only the new ones. It
    took the connection over by the export's name, size and flags and served the new bytes on
    it (a fresh helper's probe: wrong bytes from byte 0). Now the successor refuses it (the
    client reconnects, as after a restart, and gets the new version), and a connection to a
    version not replaced crosses."""
    a = make_image(tmp_path / "a.img", 4 * MiB, seed=71)
    b = make_image(tmp_path / "b.img", 4 * MiB, seed=72)
    store = tmp_path / "S"
    for imi in ("lab", "other"):
        subprocess.run([ICBD, "import", str(a), "--imi", imi, "--version", "1", "--store",
                        str(store), "-q"], check=True, timeout=60)
    port = free_port()
    servers.args = ["--store", str(store), "--listen", f"127.0.0.1:{port}", "--workers", "1",
                    "--handover", str(tmp_path / "handover.sock"), "--grace", "5"]
    old = servers.start()
    wait_port("127.0.0.1", port)
    replaced, kept = connect(port, "lab@1"), connect(port, "other@1")
    try:
        assert replaced.read(0, 4096) == (0, expected(a, 0, 4096))
        subprocess.run([ICBD, "import", str(b), "--imi", "lab", "--version", "1", "--store",
                        str(store), "--force", "--force-in-use", "-q"], check=True, timeout=60)
        assert replaced.read(MiB, 4096) == (0, expected(a, MiB, 4096))  # the old bytes still
        new = servers.start()
        assert old.proc.wait(60) == 0, old.text()
        assert closed_by_server(replaced.sock)
        assert kept.read(2 * MiB, 4096) == (0, expected(a, 2 * MiB, 4096))
        fresh = connect(port, "lab@1")
        try:
            assert fresh.read(0, 4096) == (0, expected(b, 0, 4096))
        finally:
            fresh.close()
    finally:
        replaced.close()
        kept.close()
    assert re.search(r"handover_refused=\d+ export=lab@1 reason=.*its bytes changed", new.text()
                     + old.text()), new.text()
    assert re.search(r"handover=done .*connections=2", old.text()), old.text()
