"""``serve --busy-poll``: the event loop polls on after client requests, and sleeps once they
stop (docs/serve.md, "Busy polling")."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import BIN, free_port, libnbd_script, require, start_server, wait_port
from nbdraw import RawClient
from scrape import promtool_check, samples, scrape

from icbdcache.busypoll import BusyPoll
from icbdcache.loop import new_event_loop
from nbd.constants import Opt, Rep

ICBD = str(BIN / "icbd-cache")
READS = 2000


def test_the_poll_outlasts_its_window_and_ends() -> None:
    """Kicks every 1 ms for 30 ms with a 50 ms window keep one poll going; it ends once they
    stop, and its time is counted: at least the kicks' span plus the window. (The window is
    long beside the kicks' gaps: a process descheduled for longer than the window between
    two kicks, as on a busy machine, ends one poll and starts another, and the time between
    is not polled.)"""
    loop = new_event_loop()
    try:
        busy = BusyPoll(loop, 0.05)

        kicked: list[float] = []

        async def clients() -> None:
            for _ in range(30):
                busy.kick()
                kicked.append(time.monotonic())
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.2)

        t0 = time.monotonic()
        loop.run_until_complete(clients())
        span = time.monotonic() - t0
    finally:
        loop.close()
    assert busy.kicks == 30
    assert not busy.spinning
    assert busy.spins > 30  # it turned while the kicks came, not once per kick
    assert kicked[-1] - kicked[0] + 0.05 <= busy.seconds < span


def test_a_poll_under_way_is_counted_as_it_goes() -> None:
    """Kicks every 1 ms with a 50 ms window keep one poll going; asked in its middle (a
    scrape during a boot storm that never lets the loop sleep), :meth:`BusyPoll.polled`
    already counts the 30 ms (1 ms timers: 20 at least) it has lasted, and never goes back."""
    loop = new_event_loop()
    try:
        busy = BusyPoll(loop, 0.05)
        seen: list[float] = []

        async def clients() -> None:
            for i in range(40):
                busy.kick()
                if i >= 30:
                    seen.append(busy.polled())
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.2)

        loop.run_until_complete(clients())
    finally:
        loop.close()
    assert busy.seconds > 0 and not busy.spinning
    assert seen[0] >= 0.02, seen
    assert seen == sorted(seen) and seen[-1] <= busy.polled() == busy.seconds


def _read_all(uri: str, img: Path, cwd: Path) -> None:
    """READS 4 KiB reads one after another (iodepth 1) through libnbd's nbdsh, checked
    against the image's bytes. (``/usr/bin/python3 -I -m nbd`` from a directory of the
    test's: our own ``nbd`` package must not shadow libnbd's, STYLE.md 'The nbd name'.)"""
    script = (
        f"want = open({str(img)!r}, 'rb').read({READS} * 4096)\n"
        f"got = b''.join(h.pread(4096, i * 4096) for i in range({READS}))\n"
        "print('SAME' if got == want else 'DIFFERENT', len(got))\n")
    out = libnbd_script(uri, script, cwd)
    assert out.split() == ["SAME", str(READS * 4096)], out


@pytest.mark.parametrize("window", [None, "0"])
def test_a_reading_client_is_polled_for_and_an_idle_server_sleeps(
        tmp_path: Path, image: Path, window: str | None) -> None:
    """With the default window, a client's 2000 reads at iodepth 1 make the server poll
    (``icbd_busy_poll_seconds_total`` > 0), and once it stops the server uses almost no CPU;
    ``--busy-poll 0`` never polls."""
    require("nbdsh", "promtool")
    mport = free_port()
    args = ["--export", f"img={image}", "--workers", "1",
            "--metrics-listen", f"127.0.0.1:{mport}"]
    if window is not None:
        args += ["--busy-poll", window]
    srv = start_server(tmp_path, *args)
    try:
        wait_port("127.0.0.1", mport)
        _read_all(srv.uri("img"), image, tmp_path)
        time.sleep(0.2)  # the last window ends
        text = scrape(mport)
        promtool_check(text)
        polled = samples(text)["icbd_busy_poll_seconds_total"]
        reqs = samples(text)['icbd_nbd_requests_total{export="img"}']
        assert reqs == READS
        if window is None:
            assert polled > 0
        else:
            assert polled == 0
        proc = psutil.Process(srv.proc.pid)
        c0 = sum(proc.cpu_times()[:2])
        time.sleep(1.0)
        idle_cpu = sum(proc.cpu_times()[:2]) - c0
        assert idle_cpu < 0.2, f"{idle_cpu:.2f} s of CPU in 1 s with no client"
        assert samples(scrape(mport))["icbd_busy_poll_seconds_total"] == polled
    finally:
        srv.stop()


def test_a_client_still_negotiating_does_not_make_the_server_poll(
        tmp_path: Path, image: Path) -> None:
    """200 options of a client that never picks an export (bytes from a peer not yet past
    TLS or the export's allow list) start no poll: ``icbd_busy_poll_seconds_total`` stays 0;
    then its first requests do."""
    mport = free_port()
    srv = start_server(tmp_path, "--export", f"img={image}", "--workers", "1",
                       "--metrics-listen", f"127.0.0.1:{mport}")
    try:
        wait_port("127.0.0.1", mport)
        with RawClient(srv.port) as c:
            c.handshake()
            for _ in range(200):
                c.option(Opt.INFO + 100)
                assert c.option_reply()[1] == Rep.ERR_UNSUP
            assert samples(scrape(mport))["icbd_busy_poll_seconds_total"] == 0
            assert c.go("img") == Rep.ACK
            for i in range(50):
                assert c.read(i * 4096, 4096)[0] == 0
        time.sleep(0.2)
        assert samples(scrape(mport))["icbd_busy_poll_seconds_total"] > 0
    finally:
        srv.stop()


def test_a_changed_window_is_reported_as_needing_a_restart(tmp_path: Path,
                                                           image: Path) -> None:
    """SIGHUP after ``busy_poll`` changed in the config file names it as the user knows it
    (``restart_needed=busy-poll``, as ``revoked-key``), not as the field ``busy_poll_us``."""
    conf = tmp_path / "serve.toml"
    conf.write_text("busy_poll = 50\n")
    srv = start_server(tmp_path, "--export", f"img={image}", "--workers", "1",
                       "--config", str(conf))
    try:
        conf.write_text("busy_poll = 0\n")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "event=reload" not in srv.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        reload = [ln for ln in srv.log_text().splitlines() if "event=reload" in ln]
        assert len(reload) == 1 and reload[0].endswith("restart_needed=busy-poll"), reload
    finally:
        srv.stop()


@pytest.mark.parametrize("value", ["-1", "1000001", "fast"])
def test_a_bad_window_is_refused(tmp_path: Path, image: Path, value: str) -> None:
    """A negative, huge or non-numeric ``--busy-poll`` is refused with the option named."""
    p = subprocess.run([ICBD, "serve", "--export", f"img={image}", "--listen",
                        f"127.0.0.1:{free_port()}", "--busy-poll", value],
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 2, p.stderr
    assert "--busy-poll" in p.stderr
