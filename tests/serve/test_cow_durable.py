"""Copy-on-write overlays keep their word, with real clients (qemu-io, libnbd's nbdsh):
FUA and FLUSH survive kill -9 of the server, a client whose overlay is gone is refused (never
handed the base's bytes), NO_HOLE provisions or fails up front, TRIM and WRITE_ZEROES give the
overlay's space back (df of a small tmpfs the test mounts), one client's bound, and
``--store-cow`` overlays expire.

Every client here connects from 127.0.0.1 (one identity) unless it says otherwise; a client
over the Unix socket is an identity of its own (its process id)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, Server, free_port, make_image, require, sha256_file, start_server

MiB = 1 << 20
SIZE = 64 * MiB
ENOSPC = "ENOSPC"  # libnbd's nbd.Error.errno
NBDSH = "/usr/bin/python3"  # Debian's libnbd module: python3 -I -m nbd, from a temp dir


def qemu_io(uri: str, *commands: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """qemu-io commands in one session; with ``ok`` every command must succeed (a failed
    ``read -P`` pattern check exits 1)."""
    require("qemu-io")
    cmd = ["qemu-io", "-f", "raw"]
    for c in commands:
        cmd += ["-c", c]
    p = subprocess.run([*cmd, uri], capture_output=True, text=True, timeout=60, check=False)
    if ok:
        assert p.returncode == 0 and "failed" not in p.stdout.lower(), (p.stdout, p.stderr)
    return p


def nbdsh(uri: str, script: str, cwd: Path, *, ok: bool = True) -> Any:
    """Run ``script`` in nbdsh on ``uri`` (``h`` is the handle); return the JSON of the
    variable ``result`` it sets, or the CompletedProcess when ``ok`` is False."""
    require("nbdsh")
    probe = subprocess.run([NBDSH, "-I", "-c", "import nbd; nbd.NBD"], capture_output=True,
                           cwd=cwd, check=False)
    if probe.returncode != 0:
        pytest.skip("libnbd's Python module (python3-libnbd) is not importable")
    cmd = [NBDSH, "-I", "-m", "nbd", "-u", uri, "-c",
           "import json, os\nresult = None\n" + script,
           "-c", "print('RESULT=' + json.dumps(result))"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)
    if not ok:
        return p
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT=")][-1]
    return json.loads(line.removeprefix("RESULT="))


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_image(tmp_path / "base.img", SIZE, seed=12)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``servers(*args, port=P)`` starts ``icbd-cache serve`` in one process (``--workers
    1`` unless ``args`` say otherwise: the overlays are then in the ``--cow-dir`` itself,
    not in its ``worker-I``; workers are tests/serve/test_workers_store.py's); all are
    stopped at the end."""
    started: list[Server] = []

    def start(*args: str, port: int | None = None) -> Server:
        if "--workers" not in args:
            args = (*args, "--workers", "1")
        srv = start_server(tmp_path, *args, port=port)
        started.append(srv)
        return srv

    yield start
    for s in started:
        s.stop()


def overlay_files(cow: Path, ext: str = "data") -> list[Path]:
    return sorted(p for p in cow.iterdir() if p.name.startswith("ov-") and p.suffix == f".{ext}")


# ------------------------------------------------------------------ FUA and FLUSH


def test_fua_and_flush_survive_kill_9_and_a_restart(
        tmp_path: Path, base: Path, servers: Callable[..., Server]) -> None:
    cow = tmp_path / "cow"
    cow.mkdir()
    args = ("--export", f"rw={base},cow", "--cow-dir", str(cow))
    srv = servers(*args)
    uri = srv.uri("rw")
    # qemu-io: a FUA write; plain writes and a zeroed range, then a FLUSH.
    qemu_io(uri, "write -f -P 0xa1 1M 64k", "write -P 0xa2 5M 4k", "write -z 7M 1M",
            "write -P 0xa3 8000 10000", "flush")
    # nbdsh: a FUA write and a FUA WRITE_ZEROES, each durable on its own (no FLUSH after).
    res = nbdsh(uri, "assert h.can_flush() and h.can_fua() and h.can_multi_conn()\n"
                     "h.pwrite(b'\\xb1' * 4096, 9 * 2**20, nbd.CMD_FLAG_FUA)\n"
                     "h.zero(2**20, 12 * 2**20, nbd.CMD_FLAG_FUA)\n"
                     "result = h.pread(4096, 9 * 2**20).hex()[:16]\n", tmp_path)
    assert res == "b1" * 8
    assert srv.stop(signal.SIGKILL) == -signal.SIGKILL

    again = servers(*args, port=srv.port)
    assert "recovered=1" in again.log_text()
    qemu_io(uri, "read -P 0xa1 1M 64k", "read -P 0xa2 5M 4k", "read -P 0 7M 1M",
            "read -P 0xa3 8000 10000", "read -P 0xb1 9M 4k", "read -P 0 12M 1M")
    # Bytes around the writes are the base's: nothing else changed.
    with open(base, "rb") as f:
        f.seek(5 * MiB + 4096)
        after = f.read(4096)
    got = nbdsh(uri, "result = h.pread(4096, 5 * 2**20 + 4096).hex()\n", tmp_path)
    assert bytes.fromhex(got) == after


def test_unflushed_writes_survive_a_clean_restart(
        tmp_path: Path, base: Path, servers: Callable[..., Server]) -> None:
    cow = tmp_path / "cow"
    cow.mkdir()
    args = ("--export", f"rw={base},cow", "--cow-dir", str(cow))
    srv = servers(*args)
    qemu_io(srv.uri("rw"), "write -P 0x5c 3M 128k")  # no FLUSH, no FUA
    assert srv.stop(signal.SIGTERM) == 0  # a clean stop syncs every overlay
    again = servers(*args, port=srv.port)
    qemu_io(again.uri("rw"), "read -P 0x5c 3M 128k")


# ------------------------------------------------------------------ lost overlays


def _written_flushed_killed(tmp_path: Path, base: Path, servers: Callable[..., Server],
                            *extra: str) -> tuple[Server, tuple[str, ...]]:
    cow = tmp_path / "cow"
    cow.mkdir(exist_ok=True)
    args = ("--export", f"rw={base},cow", "--cow-dir", str(cow), *extra)
    srv = servers(*args)
    qemu_io(srv.uri("rw"), "write -P 0xc3 0 1M", "flush")
    srv.stop(signal.SIGKILL)
    return srv, args


def _refused(srv: Server, tmp_path: Path, why: str) -> None:
    """qemu-io and nbdsh are refused at the handshake (NBD_REP_ERR_POLICY), qemu-io showing
    the server's message with ``why`` in it; neither reads a byte (never the base's)."""
    p = qemu_io(srv.uri("rw"), "read -P 0xc3 0 1M", ok=False)
    assert p.returncode != 0 and "read " not in p.stdout, (p.stdout, p.stderr)
    assert why in p.stderr, p.stderr
    q = nbdsh(srv.uri("rw"), "result = h.pread(16, 0).hex()\n", tmp_path, ok=False)
    assert q.returncode != 0 and "RESULT=" not in q.stdout, q.stdout
    assert "server policy prevents NBD_OPT_GO" in q.stderr, q.stderr  # libnbd's words


def test_a_client_whose_overlay_files_were_deleted_is_refused(
        tmp_path: Path, base: Path, servers: Callable[..., Server]) -> None:
    srv, args = _written_flushed_killed(tmp_path, base, servers, "--cow-linger", "3")
    (data,) = overlay_files(tmp_path / "cow")
    data.unlink()
    again = servers(*args, port=srv.port)
    _refused(again, tmp_path, "data file is missing")
    _refused(again, tmp_path, "boots anew")  # still: every attempt restarts the linger
    assert "state=lost" in again.log_text()
    # A restart does not forget it either.
    assert again.stop(signal.SIGKILL) == -signal.SIGKILL
    third = servers(*args, port=srv.port)
    _refused(third, tmp_path, "data file is missing")
    # No attempt for the linger: the client booted anew, and starts from the base.
    time.sleep(4.5)
    got = nbdsh(third.uri("rw"), "result = h.pread(1 << 20, 0).hex()\n", tmp_path)
    assert bytes.fromhex(got) == base.read_bytes()[:MiB]


def test_a_client_whose_base_changed_is_refused_until_it_boots_anew(
        tmp_path: Path, base: Path, servers: Callable[..., Server]) -> None:
    srv, args = _written_flushed_killed(tmp_path, base, servers)
    os.utime(base, ns=(1_000_000_000, 1_000_000_000))  # the image was touched
    again = servers(*args, port=srv.port)
    _refused(again, tmp_path, "base changed")
    assert overlay_files(tmp_path / "cow") == []  # its data is gone, its tombstone stays
    assert len(overlay_files(tmp_path / "cow", "meta")) == 1


def test_a_boot_that_lost_its_overlay_is_refused_and_a_new_boot_is_not(
        tmp_path: Path, base: Path, servers: Callable[..., Server]) -> None:
    cow = tmp_path / "cow"
    cow.mkdir()
    args = ("--export", f"rw={base},cow", "--cow-dir", str(cow))
    srv = servers(*args)
    boot_a = srv.uri("rw%3Fboot=A")
    qemu_io(boot_a, "write -P 0xd4 0 64k", "flush")
    srv.stop(signal.SIGKILL)
    for p in overlay_files(cow) + overlay_files(cow, "map"):
        p.unlink()  # both data and map deleted: the meta still names the client
    again = servers(*args, port=srv.port)
    p = qemu_io(boot_a, "read -P 0xd4 0 64k", ok=False)
    assert p.returncode != 0 and "file is missing" in p.stderr, p.stderr
    got = nbdsh(again.uri("rw%3Fboot=B"), "result = h.pread(65536, 0).hex()\n", tmp_path)
    assert bytes.fromhex(got) == base.read_bytes()[:65536]  # boot B starts clean


# ------------------------------------------------------------------ space


@pytest.fixture
def small_cow(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted for the test (root only), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the cow dir needs root")
    mnt = tmp_path / "cow"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


FILL = """\
written = 0
err = None
while written < 64 * 2**20:
    try:
        h.pwrite(b'\\x77' * 2**20, written)
    except nbd.Error as e:
        err = e.errno
        break
    written += 2**20
h.flush()
result = {'written': written, 'errno': err, 'free': FREE()}
"""

FREE = "FREE = lambda: os.statvfs({mnt!r}).f_bavail * os.statvfs({mnt!r}).f_frsize\n"


def test_trim_and_write_zeroes_free_the_overlay_space_for_every_client(
        tmp_path: Path, base: Path, small_cow: Path, servers: Callable[..., Server]) -> None:
    sock = tmp_path / "nbd.sock"
    srv = servers("--export", f"rw={base},cow", "--cow-dir", str(small_cow), "--cow-max", "0",
                  "--unix", str(sock))
    free0 = free_bytes(small_cow)
    free_fn = FREE.format(mnt=str(small_cow))
    filled = nbdsh(srv.uri("rw"), free_fn + FILL, tmp_path)
    assert filled["errno"] == ENOSPC and filled["written"] >= 4 * MiB, filled
    assert filled["free"] < MiB, filled  # df: the cow dir is full
    # Another client (over the Unix socket: another identity) cannot write now.
    other = f"nbd+unix:///rw?socket={sock}"
    p = nbdsh(other, "h.pwrite(b'\\x01' * 2**20, 0)\nh.flush()\n", tmp_path, ok=False)
    assert p.returncode != 0, p.stdout
    # The first client trims half of what it wrote and zeroes the rest: the space comes back.
    n = filled["written"]
    back = nbdsh(srv.uri("rw"), free_fn + f"h.trim({n // 2}, 0)\n"
                 f"h.zero({n - n // 2}, {n // 2})\nh.flush()\nresult = FREE()\n", tmp_path)
    assert back >= free0 - MiB, (back, free0)  # all but the overlays' maps and metas
    # Zeroed reads as zeros; the other client can write; the first can write again.
    got = nbdsh(srv.uri("rw"), f"result = h.pread(4096, {n - 4096}).hex()\n", tmp_path)
    assert got == "00" * 4096
    nbdsh(other, "h.pwrite(b'\\x02' * 2**20, 0)\nh.flush()\nresult = 1\n", tmp_path)
    nbdsh(srv.uri("rw"), "h.pwrite(b'\\x03' * 2**20, 0)\nh.flush()\n"
                         "result = h.pread(4, 0).hex()\n", tmp_path)


def test_no_hole_provisions_or_fails_up_front(
        tmp_path: Path, base: Path, small_cow: Path, servers: Callable[..., Server]) -> None:
    srv = servers("--export", f"rw={base},cow", "--cow-dir", str(small_cow), "--cow-max", "0")
    script = """\
def zero_no_hole(length, offset):
    try:
        h.zero(length, offset, nbd.CMD_FLAG_NO_HOLE)
        return None
    except nbd.Error as e:
        return e.errno
big = zero_no_hole(16 * 2**20, 0)         # more than the 8 MiB the cow dir has
small = zero_no_hole(4 * 2**20, 32 * 2**20)
# provisioned: writes into it succeed, however full the directory is otherwise
h.pwrite(b'\\x42' * (4 * 2**20), 32 * 2**20)
h.flush()
result = {'big': big, 'small': small, 'head': h.pread(4, 0).hex(),
          'mine': h.pread(4, 36 * 2**20 - 4).hex()}
"""
    res = nbdsh(srv.uri("rw"), script, tmp_path)
    assert res["big"] == ENOSPC and res["small"] is None, res
    assert res["head"] == base.read_bytes()[:4].hex()  # the failed NO_HOLE changed nothing
    assert res["mine"] == "42424242"


def test_one_client_cannot_hold_more_than_cow_max(
        tmp_path: Path, base: Path, servers: Callable[..., Server]) -> None:
    (tmp_path / "cow").mkdir()
    srv = servers("--export", f"rw={base},cow", "--cow-dir", str(tmp_path / "cow"),
                  "--cow-max", "1M")
    script = """\
h.pwrite(b'\\x11' * 2**20, 0)
try:
    h.pwrite(b'\\x12' * 4096, 2**20)
    over = None
except nbd.Error as e:
    over = e.errno
h.trim(65536, 0)
h.pwrite(b'\\x13' * 4096, 2**20)  # room again
result = {'over': over, 'tail': h.pread(4, 2**20).hex()}
"""
    res = nbdsh(srv.uri("rw"), script, tmp_path)
    assert res == {"over": ENOSPC, "tail": "13131313"}


# ------------------------------------------------------------------ lingers


def test_store_cow_overlays_expire(tmp_path: Path, base: Path,
                                   servers: Callable[..., Server]) -> None:
    store = tmp_path / "store"
    before = sha256_file(base)
    subprocess.run([str(BIN / "icbd-cache"), "import", str(base), "--imi", "lab",
                    "--version", "1", "--store", str(store)], check=True, capture_output=True)
    cow = tmp_path / "cow"
    cow.mkdir()
    srv = servers("--store", str(store), "--store-cow", "--cow-dir", str(cow),
                  "--cow-linger", "1")
    plain = srv.uri("lab@1")
    boot_a = srv.uri("lab@1%3Fboot=A")
    qemu_io(plain, "write -P 0xe5 0 64k", "flush")
    qemu_io(boot_a, "read -P 0xe5 0 64k", "write -P 0xe6 64k 4k",
            "flush")  # boot id A adopts the same client's overlay
    assert len(overlay_files(cow)) == 1
    deadline = time.monotonic() + 15
    while overlay_files(cow) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert overlay_files(cow) == []  # expired: its data is gone
    # Boot A's overlay expired: A is refused (a tombstone), another boot starts clean.
    p = qemu_io(boot_a, "read -P 0xe5 0 64k", ok=False)
    assert p.returncode != 0 and "expired" in p.stderr, p.stderr
    got = nbdsh(srv.uri("lab@1%3Fboot=B"), "result = h.pread(65536, 0).hex()\n", tmp_path)
    assert bytes.fromhex(got) == base.read_bytes()[:65536]
    assert sha256_file(base) == before  # the image file was only read


def test_workers_with_store_cow_on_a_unix_socket_are_refused(tmp_path: Path) -> None:
    """Clients of a Unix socket cannot be steered to a worker by address."""
    p = subprocess.run([str(BIN / "icbd-cache"), "serve", "--store", str(tmp_path / "s"),
                        "--store-cow", "--workers", "2", "--listen",
                        f"127.0.0.1:{free_port()}", "--unix", str(tmp_path / "sock")],
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 2
    assert "--unix" in p.stderr and "--store-cow" in p.stderr, p.stderr


# ------------------------------------------------------------------ hand-over


def test_a_handover_passes_the_cow_dir_to_the_successor(
        tmp_path: Path, base: Path, servers: Callable[..., Server]) -> None:
    """With no copy-on-write client yet, a planned restart (--handover) goes through: the old
    server lets go of --cow-dir (synced), the successor takes it, and overlays it keeps then
    survive the successor's own crash."""
    cow = tmp_path / "cow"
    cow.mkdir()
    sock = tmp_path / "handover.sock"
    args = ("--export", f"rw={base},cow", "--cow-dir", str(cow), "--handover", str(sock))
    old = servers(*args)
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    new = servers(*args, port=old.port)  # binds nothing: takes the old server's socket
    assert old.proc.wait(60) == 0, old.log_text()
    assert "handover=taken" in new.log_text(), new.log_text()
    assert (cow / "icbd-cow.lock").read_text().strip() == str(new.proc.pid)
    qemu_io(new.uri("rw"), "write -P 0x6b 2M 64k", "flush")
    assert new.stop(signal.SIGKILL) == -signal.SIGKILL
    again = servers("--export", f"rw={base},cow", "--cow-dir", str(cow), port=old.port)
    qemu_io(again.uri("rw"), "read -P 0x6b 2M 64k")
