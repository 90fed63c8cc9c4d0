"""icbd-cache's reconnecting NBD client (pxe/initramfs/icbd-nbd-client.c) with the Linux
kernel's nbd driver, against a server killed while requests are in flight.

The tiny test guest (tests/guest: the host's kernel, a busybox initramfs; about 30 s per boot
under TCG) attaches an export with two connections, tells the host it is about to read the
whole device, and reads it; the host kills the server 0.3 s later and starts it again 2 s
after that. Requests on the wire when the connections died are sent again after the client's
4 s I/O timeout, new ones wait for the reconnection: the device reads whole and right, the
kernel logs no I/O error, and the client logged one reconnection per connection. The same
mechanism carries a workstation's root through a restart (tests/pxeboot/test_reconnect.py).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN, make_image, require, stop_process, wait_port
from guest import GuestImage, GuestUnavailable, build_guest, run_guest_steps

pytestmark = pytest.mark.guest

ICBD = str(BIN / "icbd-cache")
CONNECTIONS = 2


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


def _port_outside_ephemeral() -> int:
    import random
    import socket

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [p for p in range(10000, 32768) if not low <= p <= high]
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    pytest.skip("no free port outside the ephemeral range")


def test_kernel_client_reconnects_with_requests_in_flight(guest_image: GuestImage,
                                                         tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 64 << 20)
    port = _port_outside_ephemeral()
    args = [ICBD, "serve", "--export", f"disk={image}", "--listen", f"127.0.0.1:{port}"]
    logs = [tmp_path / "serve-0.log", tmp_path / "serve-1.log"]
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        with open(logs[len(procs)], "wb") as out:
            procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT))

    events: dict[str, float] = {}

    def restart() -> None:
        time.sleep(0.3)  # the guest is reading by now
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        events["killed"] = time.monotonic()
        time.sleep(2.0)
        start()

    restarter = threading.Thread(target=restart)

    def on_line(line: str) -> None:
        if "ICBD-RECONNECT-READY" in line and not restarter.is_alive() and not events:
            events["ready"] = time.monotonic()
            restarter.start()

    start()
    wait_port("127.0.0.1", port)
    try:
        res = run_guest_steps(port, [("reconnect", "disk")], 300, connections=CONNECTIONS,
                              cpus=2, image=guest_image, on_line=on_line,
                              log_path=tmp_path / "guest.console")
    finally:
        if restarter.is_alive():
            restarter.join(10)
        for p in procs:
            stop_process(p)
    step = res.step("reconnect")
    assert "killed" in events, f"the server was never killed\n{res.tail()}"
    assert step.ok, (step, res.tail())
    assert step.sha256 == hashlib.sha256(image.read_bytes()).hexdigest(), res.tail()
    assert step.io_errors == 0, res.tail()
    assert step.reconnects == CONNECTIONS, res.tail()
    new_log = logs[1].read_text()
    assert new_log.count("export=disk ") == CONNECTIONS, new_log
    print(f"device read whole in {res.done_s} s of guest time; reconnected "
          f"{step.reconnects} connections")
