"""The Linux kernel's nbd driver against ``icbd-cache serve --idle-timeout`` (issue 14): the
server closes a connection nobody used for a while, and a client that reconnects does not
notice.

One boot of the tiny test guest (tests/guest; about 30 s under TCG) runs two steps: Debian's
``nbd-client -persist`` (ioctl mode, which reconnects when its connection ends) and
icbd-cache's ``icbd-nbd-client`` (the workstation client of ``--pxe``). Each attaches the
export, reads its first MiB, leaves it unused for 8 s while the server's idle timeout (3 s)
closes the connection, then reads the whole device: right bytes, no I/O error, and the server
saw the connection closed for idleness and a new one made.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, make_image, require, stop_process, wait_port
from guest import GuestImage, GuestUnavailable, build_guest, run_guest_steps

pytestmark = pytest.mark.guest

ICBD = str(BIN / "icbd-cache")
IDLE_TIMEOUT = 3


@pytest.fixture(scope="module")
def guest_image() -> GuestImage:
    require("qemu-system-x86_64")
    try:
        image = build_guest()
    except GuestUnavailable as e:
        pytest.skip(f"test guest unavailable: {e}")
    if not image.client:
        pytest.skip("the test guest has no icbd-nbd-client (gcc and libc6-dev build it)")
    return image


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """(port, image, log) of ``icbd-cache serve --idle-timeout 3`` exporting ``disk``."""
    import socket

    image = make_image(tmp_path / "disk.img", 64 << 20)
    with socket.socket() as s:  # the guest reaches the host's loopback through QEMU
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, "serve", "--export", f"disk={image}", "--listen",
                                 f"127.0.0.1:{port}", "--idle-timeout", str(IDLE_TIMEOUT)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
        yield port, image, log
    finally:
        stop_process(proc)


def test_reconnecting_kernel_clients_ride_out_the_idle_timeout(
        guest_image: GuestImage, server: tuple[int, Path, Path], tmp_path: Path) -> None:
    port, image, log = server
    res = run_guest_steps(port, [("idle-persist", "disk"), ("idle-icbd", "disk")], 400,
                          connections=1, image=guest_image,
                          log_path=tmp_path / "guest.console")
    want = hashlib.sha256(image.read_bytes()).hexdigest()
    text = log.read_text(errors="replace")
    for test in ("idle-persist", "idle-icbd"):
        step = res.step(test)
        assert step.ok, (test, step, res.tail())
        assert step.sha256 == want, (test, res.tail())
        assert step.io_errors == 0, (test, res.tail())
    assert res.step("idle-icbd").reconnects == 1, res.tail()
    idle_closes = text.count(f'closed="idle {IDLE_TIMEOUT} s"')
    # each step: its first connection closed for idleness, then a new one that reads
    assert idle_closes >= 2, text
    assert text.count("export=disk ") >= 4, text
