"""Requests as large as the reference servers take (64 MiB), against a running server with
Debian's nbdsh module (libnbd), and what a large WRITE costs the server in memory.

The server's peak RSS is reset (``/proc/PID/clear_refs``, 5) just before the WRITE and read
(``VmHWM``) just after it: the peak during the write, whatever the Python allocator keeps.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from conftest import Server, make_image
from nbdraw import connect, expected

from nbd import wire
from nbd.constants import Cmd, Errno

MiB = 1 << 20
ServerFactory = Callable[..., Server]

#: The client side, run by Debian's python3 with libnbd's ``nbd`` module: connect, say the
#: advertised maximum, write N random bytes at OFFSET when told, read them back when told.
CLIENT = r"""
import hashlib, os, sys
import nbd
uri, n, offset = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(uri)
data = os.urandom(n)
print(h.get_block_size(nbd.SIZE_MAXIMUM), flush=True)
sys.stdin.readline()
h.pwrite(data, offset)
print("written", flush=True)
sys.stdin.readline()
back = h.pread(n, offset)
print("same" if hashlib.sha256(back).digest() == hashlib.sha256(data).digest() else "DIFFER",
      flush=True)
h.shutdown()
"""


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.fixture
def libnbd_python(tmp_path: Path) -> list[str]:
    """Debian's python3 with libnbd's module, isolated from this project's ``nbd`` package."""
    py = "/usr/bin/python3"
    probe = subprocess.run([py, "-I", "-c", "import nbd; nbd.NBD"], capture_output=True,
                           cwd=tmp_path, check=False)
    if probe.returncode != 0:
        pytest.skip("Debian's python3-libnbd (nbdsh's module) is not installed")
    return [py, "-I", "-c", CLIENT]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_48_mib_write_then_read_round_trips_and_stays_within_the_budget(
        server_factory: ServerFactory, tmp_path: Path, libnbd_python: list[str],
        tls: bool) -> None:
    disk = make_image(tmp_path / "disk.img", 128 * MiB)
    budget = 16 * MiB
    args = ["--export", f"lab={disk},cow", "--connection-reply-budget", str(budget)]
    if tls:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        certs = tmp_path / "certs"
        certs.mkdir()
        ca.cert_pem.write_to_path(str(certs / "ca-cert.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "srv.pem"))
        leaf.private_key_pem.write_to_path(str(tmp_path / "srv.key"))
        args += ["--tls-cert", str(tmp_path / "srv.pem"), "--tls-key", str(tmp_path / "srv.key"),
                 "--tls-required"]
    srv = server_factory(*args)
    uri = (f"nbds://{srv.host}:{srv.port}/lab?tls-certificates={certs}" if tls
           else srv.uri("lab"))
    pid = srv.proc.pid
    n, offset = 48 * MiB, 3 * 4096 + 512  # not on a piece or block boundary
    client = subprocess.Popen([*libnbd_python, uri, str(n), str(offset)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert client.stdout is not None and client.stdin is not None
        advertised = client.stdout.readline()
        assert advertised, client.communicate(timeout=30)[1]
        assert int(advertised) == wire.MAX_PAYLOAD == 64 * MiB
        before = status_kib(pid, "VmRSS")
        if not reset_peak(pid):
            pytest.skip("cannot reset the server's peak RSS (/proc/PID/clear_refs)")
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "written", client.communicate(timeout=30)[1]
        peak = status_kib(pid, "VmHWM")
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "same"
        assert client.wait(60) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    grew = (peak - before) * 1024
    sys.stderr.write(f"48 MiB WRITE ({'TLS' if tls else 'plain'}): server RSS {before} KiB "
                     f"before, peak {peak} KiB (+{grew / MiB:.1f} MiB)\n")
    # held whole, the payload alone would be 48 MiB (96 with the copy that joins it)
    assert grew < budget, f"a 48 MiB write raised the server's RSS by {grew / MiB:.1f} MiB"
    assert "WRITE" not in srv.log_text()  # no request error was logged


def test_write_over_the_maximum_is_einval_and_the_connection_goes_on(
        server_factory: ServerFactory, tmp_path: Path) -> None:
    disk = make_image(tmp_path / "disk.img", 256 * MiB)
    srv = server_factory("--export", f"lab={disk},cow")
    with connect(srv.port, "lab", timeout=60) as c:
        n = wire.MAX_PAYLOAD + 4096
        assert c.simple(Cmd.WRITE, 0, n, data=b"\x5a" * n) == Errno.EINVAL
        err, data = c.read(0, 4096)  # the payload was drained, not taken for requests
        assert err == 0 and data == expected(disk, 0, 4096)


def test_64_mib_write_and_read(server_factory: ServerFactory, tmp_path: Path) -> None:
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    srv = server_factory("--export", f"lab={disk},cow")
    with connect(srv.port, "lab", timeout=60) as c:
        payload = bytes(range(256)) * (64 * MiB // 256)
        assert c.simple(Cmd.WRITE, 0, len(payload), data=payload) == 0
        err, data = c.read(0, 64 * MiB)
        assert err == 0 and data == payload


def test_streamed_write_failing_part_way_is_drained_then_answered(
        server_factory: ServerFactory, tmp_path: Path) -> None:
    """--cow-max 4M: an 8 MiB WRITE fails with ENOSPC after its first pieces; the rest of its
    payload is read (not taken for requests), the error is the reply, the connection goes on,
    and a FUA write that fits is answered 0 (pieces of 1 MiB over a FLUSH)."""
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    srv = server_factory("--export", f"lab={disk},cow", "--cow-max", "4M")
    with connect(srv.port, "lab", timeout=60) as c:
        fake = wire.REQUEST.pack(0x25609513, 0, Cmd.READ, 999, 0, 512) * (8 * MiB // 28)
        payload = fake + bytes(8 * MiB - len(fake))
        assert c.simple(Cmd.WRITE, 0, len(payload), data=payload) == Errno.ENOSPC
        # the blocks it wrote before the error hold the overlay's 4 MiB: rewriting them fits
        assert c.simple(Cmd.WRITE, MiB, 2 * MiB, flags=1, data=b"\x77" * (2 * MiB)) == 0
        err, data = c.read(MiB, 2 * MiB)
        assert err == 0 and data == b"\x77" * (2 * MiB)
        err, data = c.read(60 * MiB, 4096)
        assert err == 0 and data == expected(disk, 60 * MiB, 4096)
    assert "ENOSPC" in srv.log_text()


def test_pipelined_streamed_writes_wait_for_the_budget_in_order(
        server_factory: ServerFactory, tmp_path: Path) -> None:
    """Six 8 MiB WRITEs sent back to back with a 4 MiB connection budget (each streamed WRITE
    counts 2 MiB): they wait for room with their pieces, in order, and all land."""
    disk = make_image(tmp_path / "disk.img", 64 * MiB)
    srv = server_factory("--export", f"lab={disk},cow", "--connection-reply-budget", "4M")
    with connect(srv.port, "lab", timeout=60) as c:
        payloads = [bytes([i + 1]) * (8 * MiB) for i in range(6)]
        cookies = [c.request(Cmd.WRITE, i * 8 * MiB + 4096, len(p), data=p)
                   for i, p in enumerate(payloads)]
        got = {}
        for _ in cookies:
            cookie, err, _ = c.next_reply()
            got[cookie] = err
        assert got == dict.fromkeys(cookies, 0)
        for i, p in enumerate(payloads):
            err, data = c.read(i * 8 * MiB + 4096, len(p))
            assert err == 0 and data == p, i
