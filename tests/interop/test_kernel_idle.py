"""The Linux kernel's nbd driver against ``icbd-cache serve`` with and without
``--idle-timeout`` (issue 14).

Each test boots the tiny test guest (tests/guest; about 30 s under TCG) for one step: the
client attaches the export, reads its first MiB, leaves the device unused for 8 s, then reads
the whole device (right bytes, no I/O error).

* ``icbd-nbd-client`` (the workstation client of ``--pxe``) against ``--idle-timeout 3``: the
  server closes its idle connection, it connects again, and the device does not notice.
* Debian's ``nbd-client -persist`` (ioctl mode) against the defaults: its connection stays.
  It does not ride out an idle close (the kernel ends NBD_DO_IT with 0 when the server closes,
  so nbd-client exits and the device reads as empty: seen in this guest), which is why
  ``--idle-timeout`` is off by default (docs/serve.md, LIMITS).
"""

from __future__ import annotations

import hashlib
import subprocess
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


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], int, Path, Path]:
    """``icbd-cache serve ARGS`` exporting ``disk`` (64 MiB) on a free port of 127.0.0.1:
    (process, port, image, log)."""
    import socket

    image = make_image(tmp_path / "disk.img", 64 << 20)
    with socket.socket() as s:  # the guest reaches the host's loopback through QEMU
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, "serve", "--export", f"disk={image}", "--listen",
                                 f"127.0.0.1:{port}", *args],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
    except BaseException:
        stop_process(proc)
        raise
    return proc, port, image, log


def _idle_step(guest_image: GuestImage, tmp_path: Path, test: str,
               *serve_args: str) -> tuple[str, str]:
    """Run the guest's ``test`` step against a server started with ``serve_args``: checks
    the bytes and the I/O errors, returns (the step's RECONNECTS count as text, the server's
    log)."""
    proc, port, image, log = _serve(tmp_path, *serve_args)
    try:
        res = run_guest_steps(port, [(test, "disk")], 400, connections=1, image=guest_image,
                              log_path=tmp_path / "guest.console")
    finally:
        stop_process(proc)
    want = hashlib.sha256(image.read_bytes()).hexdigest()
    step = res.step(test)
    assert step.ok, (test, step, res.tail())
    assert step.sha256 == want, (test, res.tail())
    assert step.io_errors == 0, (test, res.tail())
    return str(step.reconnects), log.read_text(errors="replace")


def test_icbd_nbd_client_rides_out_the_idle_timeout(guest_image: GuestImage,
                                                    tmp_path: Path) -> None:
    reconnects, text = _idle_step(guest_image, tmp_path, "idle-icbd",
                                  "--idle-timeout", str(IDLE_TIMEOUT))
    # it reconnects at once after each close (twice or more if the read starts late)
    assert int(reconnects) >= 1, text
    assert text.count(f'closed="idle {IDLE_TIMEOUT} s"') >= 1, text
    assert text.count("export=disk ") == int(reconnects) + 1, text


def test_nbd_client_persist_keeps_its_connection_by_default(guest_image: GuestImage,
                                                             tmp_path: Path) -> None:
    _, text = _idle_step(guest_image, tmp_path, "idle-persist")
    assert 'closed="idle' not in text, text  # what --idle-timeout writes
    assert text.count("export=disk ") == 1, text
