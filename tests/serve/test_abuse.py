"""Hostile clients (``icbd-bench abuse``, bench/adversary.py) against a real ``icbd-cache
serve`` while a real client (nbdcopy, nbdinfo) is served correctly (issue 14).

Each adversary runs as its own process from addresses of 127.0.0.0/8 other than the real
client's (127.0.0.1), as hostile machines of a lab would. Memory is read from
/proc/PID/status: ``RssAnon``, the process's own memory (``VmRSS`` adds the pages of the
store's LMDB map, which are the page cache: shared, reclaimable, and as big as what was read).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from adversaries import Adversary, adversaries, throttled_counts
from conftest import BIN, Server, make_image, require, sha256_file
from nbdraw import RawClient, ServerClosed, still_open

from nbd.constants import Rep

MiB = 1 << 20
ServerFactory = Callable[..., Server]
ICBD = str(BIN / "icbd-cache")
#: Seconds the log throttle needs to write what it held back (one interval, and a margin).
THROTTLE_FLUSH = 1.5
__all__ = ["adversaries"]  # the fixture


def status(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class Sampler:
    """The highest ``RssAnon`` of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = status(pid, "RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, status(self.pid, "RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def nbdcopy_sha(uri: str, out: Path, timeout: float = 120) -> str:
    require("nbdcopy")
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=timeout,
                   capture_output=True)
    sha = sha256_file(out)
    out.unlink()
    return sha


@pytest.fixture
def store_version(tmp_path: Path) -> tuple[Path, Path]:
    """(store, image): a 256 MiB image imported as lab@1, its bytes copied into the store."""
    img = make_image(tmp_path / "img.raw", 256 * MiB)
    store = tmp_path / "store"
    subprocess.run([ICBD, "import", str(img), "--imi", "lab", "--store", str(store), "--copy"],
                   check=True, capture_output=True, timeout=120)
    return store, img


# ------------------------------------------------------------------------------ memory


def test_pipelined_reads_are_bounded_by_the_reply_budget(
        server_factory: ServerFactory, adversaries: Callable[..., Adversary],
        store_version: tuple[Path, Path], tmp_path: Path) -> None:
    """Four connections from two addresses each pipeline 40 READs of 32 MiB on a store version
    and never read a reply (5 GiB asked for; on main one such connection took the heap from
    32 MB to 1.2 GB, and eight 7.5 GB). Each address may hold 32 MiB of replies: the heap
    grows by about that, nbdcopy reads the version right meanwhile, the adversary's
    connections are still held (its requests wait), and the memory goes back to the system
    once it leaves."""
    store, img = store_version
    want = sha256_file(img)
    srv = server_factory("--store", str(store), "--hot-size", "16M", "--reply-budget", "128M",
                         "--address-reply-budget", "32M", "--connection-reply-budget", "16M")
    pid = srv.proc.pid
    assert nbdcopy_sha(srv.uri("lab@1"), tmp_path / "warm.img") == want  # hot set, caches
    base = status(pid, "RssAnon")
    sampler = Sampler(pid)
    adv = adversaries("pipeline", "--port", str(srv.port), "--export", "lab@1",
                      "--connections", "4", "--depth", "40", "--size", "32M",
                      "--sources", "127.0.0.2+2")
    try:
        held = adv.holding()
        assert held["reached"] == 4, held
        time.sleep(1.0)  # what the server does with 160 requests, done by now
        during = status(pid, "RssAnon") - base
        assert nbdcopy_sha(srv.uri("lab@1"), tmp_path / "copy.img") == want
    finally:
        peak = sampler.stop() - base
    done = adv.stop()
    assert done["alive"] == 4, done  # waiting, not dropped
    # the adversary's two addresses hold 32 MiB each, nbdcopy at most its address's 32 MiB;
    # 32 MiB more for what Python and the transports keep around
    bound = 2 * 32 * MiB + 32 * MiB + 32 * MiB
    print(f"RssAnon: base {base / MiB:.0f} MiB, +{during / MiB:.0f} MiB while held, "
          f"peak +{peak / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB)")
    assert during <= bound and peak <= bound
    after = 0
    for _ in range(100):  # gone: the heap is trimmed a second after the budget empties
        after = status(pid, "RssAnon") - base
        if after <= 16 * MiB:
            break
        time.sleep(0.1)
    assert after <= 16 * MiB, f"+{after / MiB:.0f} MiB after the adversary left"


def settled(pid: int, base: int, bound: int, timeout: float = 30.0) -> int:
    """``RssAnon`` of ``pid`` above ``base`` once it stopped growing (by less than 1 MiB in
    1.5 s), or as soon as it passes ``bound``, or after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    samples = [status(pid, "RssAnon") - base]
    while time.monotonic() < end and samples[-1] <= bound:
        time.sleep(0.5)
        samples.append(status(pid, "RssAnon") - base)
        if len(samples) >= 4 and samples[-1] - samples[-4] < MiB:
            break
    return samples[-1]


def test_pipelined_reads_of_a_cold_version_are_bounded_too(
        server_factory: ServerFactory, adversaries: Callable[..., Adversary],
        upstream: Callable[..., Any], tmp_path: Path) -> None:
    """A cold version behind a slow upstream (nbdkit, 10 ms a read): READs wait for their
    faults, and on main every request in the socket was started (200 READs took the heap to
    860 MB). Four connections from two addresses pipeline 200 READs of 4 MiB each over a
    512 MiB image and never read: only what the budget holds is started and faulted, the
    heap settles there, and nbdcopy reads the version right through the same cold path while
    the adversary holds on. (Without the budget, 8G budgets here: the heap grows by 536 MiB,
    every chunk of the image, and nbdcopy fails.)"""
    img = make_image(tmp_path / "img.raw", 512 * MiB)
    want = sha256_file(img)
    up = upstream(img, filters=["delay"], params=["delay-read=10ms"])
    srv = server_factory("--store", str(tmp_path / "store"), "--create-store",
                         "--export", f"lab@1={up.uri}", "--hot-size", "16M",
                         "--reply-budget", "128M", "--address-reply-budget", "32M",
                         "--connection-reply-budget", "16M")
    pid = srv.proc.pid
    base = status(pid, "RssAnon")
    sampler = Sampler(pid)
    # the adversary's two addresses hold 32 MiB each, the hot set 16 MiB, and 48 MiB for
    # the chunks on their way to the store (a writer batch is 16 MiB) and Python's own
    bound = 2 * 32 * MiB + 16 * MiB + 48 * MiB
    adv = adversaries("pipeline", "--port", str(srv.port), "--export", "lab@1",
                      "--connections", "4", "--depth", "200", "--size", "4M",
                      "--sources", "127.0.0.2+2")
    try:
        assert adv.holding()["reached"] == 4
        held = settled(pid, base, bound)
        assert nbdcopy_sha(srv.uri("lab@1"), tmp_path / "copy.img", timeout=300) == want
    finally:
        peak = sampler.stop() - base
    done = adv.stop()
    assert done["alive"] == 4, done
    # the peak while nbdcopy fills the store is not asserted: the store's writer queues what
    # arrives faster than LMDB commits it (its own bound, not the reply budget's)
    print(f"RssAnon (cold): +{held / MiB:.0f} MiB held by the adversary (bound "
          f"{bound / MiB:.0f} MiB), peak +{peak / MiB:.0f} MiB with nbdcopy filling the store")
    assert held <= bound


def test_a_client_that_reads_nothing_is_closed_after_send_timeout(
        server_factory: ServerFactory, adversaries: Callable[..., Adversary],
        store_version: tuple[Path, Path], tmp_path: Path) -> None:
    """Connections that never read their replies hold their budget only --send-timeout
    seconds: then they are closed (counted by the adversary), and their memory is freed."""
    store, img = store_version
    srv = server_factory("--store", str(store), "--hot-size", "16M", "--send-timeout", "2",
                         "--connection-reply-budget", "16M")
    adv = adversaries("pipeline", "--port", str(srv.port), "--export", "lab@1",
                      "--connections", "3", "--depth", "20", "--size", "8M",
                      "--sources", "127.0.0.2", "--hold", "6")
    assert adv.holding()["reached"] == 3
    done = adv.done()
    assert done["closed"] == 3 and done["alive"] == 0, done
    time.sleep(THROTTLE_FLUSH)
    log = srv.log_text()
    assert throttled_counts(log, "closed") == {"replies not read for 2 s": 3}
    m = re.search(r"event=workers workers=(\d+)", log)
    workers = int(m.group(1)) if m else 1
    assert log.count("replies not read") <= 2 * workers  # one line a second, each worker
    assert nbdcopy_sha(srv.uri("lab@1"), tmp_path / "copy.img") == sha256_file(img)


# ------------------------------------------------------------------------ connections


@pytest.mark.parametrize("workers", ["1", "2"])
def test_connection_hogs_do_not_lock_out_a_workstation(
        server_factory: ServerFactory, adversaries: Callable[..., Adversary],
        image: Path, tmp_path: Path, workers: str) -> None:
    """One address opens 200 connections and finishes their handshakes, three others 100 each
    that stay in the handshake (on main: 512 of them refused everyone). Each address keeps at
    most its bound, the rest is refused at once, and a workstation (nbdcopy, nbdinfo) is
    served; then more addresses at their own bound meet the reserved connections. A burst of
    connect-and-drop from a full address is refused without flooding the log: one line a
    second per reason, whose counts add up to every refusal. With ``--workers 2`` every
    bound holds for the server, not for each worker (icbdcache/sharedlimits.py)."""
    require("nbdinfo")
    srv = server_factory("--export", f"disk={image}", "--workers", workers,
                         "--max-connections", "64",
                         "--address-connections", "16", "--address-handshakes", "4",
                         "--reserved-connections", "16", "--handshake-timeout", "60")
    port = str(srv.port)
    go = adversaries("stall", "--port", port, "--export", "disk", "--at", "go",
                     "--connections", "200", "--parallel", "2", "--sources", "127.0.0.2")
    hs = adversaries("stall", "--port", port, "--at", "connect", "--connections", "300",
                     "--sources", "127.0.0.3+3")
    g, h = go.holding(), hs.holding()
    assert g["reached"] == 16 and g["refused"] == 184, g
    assert h["reached"] == 12 and h["refused"] == 288, h
    want = sha256_file(image)
    assert nbdcopy_sha(srv.uri("disk"), tmp_path / "copy.img") == want
    out = subprocess.run(["nbdinfo", "--size", srv.uri("disk")], capture_output=True,
                         text=True, timeout=30, check=True)
    assert int(out.stdout) == image.stat().st_size
    # 28 held; two more addresses at their bound: 127.0.0.6 fills up to 64 - 16 = 48, the
    # next gets fewer than 4 of the 16 reserved; a workstation still gets in
    more = adversaries("stall", "--port", port, "--export", "disk", "--at", "go",
                       "--connections", "40", "--parallel", "2", "--sources", "127.0.0.6+2")
    m = more.holding()
    assert m["reached"] == 16 + 4 and m["refused"] == 20, m
    assert nbdcopy_sha(srv.uri("disk"), tmp_path / "copy.img") == want
    # a full address churns: every connection refused, the log holds one line a second
    churn = adversaries("churn", "--port", port, "--connections", "8", "--duration", "3",
                        "--wait-close", "--sources", "127.0.0.2")
    c = churn.done()
    assert c["opened"] > 100 and c["closed"] == c["opened"], c
    time.sleep(THROTTLE_FLUSH)
    for a in (go, hs, more):
        a.stop()
    log = srv.log_text()
    counts = throttled_counts(log, "reason")  # event=refused ... reason="..."
    assert counts.get("address connection limit") == 184 + c["opened"], counts
    assert counts.get("address handshake limit") == 288, counts
    assert counts.get("reserved for other addresses") == 20, counts
    lines = len(re.findall(r"event=refused ", log))
    print(f"{sum(counts.values())} refusals in {lines} log lines")
    # three reasons, one line a second each (the run takes ~5 s), from each worker
    assert lines <= 3 * 8 * int(workers)


def test_idle_connections_are_closed_but_not_an_overlay(
        server_factory: ServerFactory, adversaries: Callable[..., Adversary],
        image: Path, tmp_path: Path) -> None:
    """--idle-timeout: connections that negotiated and then sent nothing are closed, a
    connection to a copy-on-write export (its overlay lives here) is not, and a client that
    comes back is served."""
    srv = server_factory("--export", f"disk={image}", "--export", f"rw={image},cow",
                         "--idle-timeout", "2")
    adv = adversaries("stall", "--port", str(srv.port), "--export", "disk", "--at", "go",
                      "--connections", "10", "--sources", "127.0.0.2", "--hold", "5")
    assert adv.holding()["reached"] == 10
    with RawClient(srv.port) as cow:
        cow.handshake()
        assert cow.go("rw") == Rep.ACK
        done = adv.done()
        assert done["closed"] == 10 and done["alive"] == 0, done
        assert still_open(cow.sock, 0.05)
        err, _ = cow.read(0, 4096)
        assert err == 0
    assert 'closed="idle 2 s"' in srv.log_text()
    assert nbdcopy_sha(srv.uri("disk"), tmp_path / "copy.img") == sha256_file(image)


# -------------------------------------------------------------------------- handshake


def test_a_slow_lister_finishes_and_a_trickler_does_not(
        server_factory: ServerFactory, adversaries: Callable[..., Adversary],
        tmp_path: Path) -> None:
    """nbdinfo --list asks about each export in turn (libnbd: about 0.2 s each), so 40
    exports take longer than a 2 s handshake timeout: it lists them all, the timeout counting
    from the last option answered (on main it counted from the connection: none listed). A
    client sending an option every 0.5 s still meets --handshake-total."""
    require("nbdinfo")
    disk = tmp_path / "small.img"
    disk.write_bytes(bytes(1 << 20))
    names = [f"e{i:02d}" for i in range(40)]
    args = [a for n in names for a in ("--export", f"{n}={disk}")]
    srv = server_factory(*args, "--handshake-timeout", "2")
    other = server_factory("--export", f"disk={disk}", "--handshake-timeout", "2",
                           "--handshake-total", "3")
    adv = adversaries("stall", "--port", str(other.port), "--at", "trickle", "--interval",
                      "0.5", "--connections", "4", "--sources", "127.0.0.2", "--hold", "5")
    assert adv.holding()["reached"] == 4
    t0 = time.monotonic()
    out = subprocess.run(["nbdinfo", "--list", "--json", srv.uri()], capture_output=True,
                         text=True, timeout=120)
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    listed = sorted(e["export-name"] for e in json.loads(out.stdout)["exports"])
    assert listed == names
    print(f"nbdinfo --list of {len(names)} exports took {took:.1f} s")
    done = adv.done()
    assert done["closed"] == 4, done
    assert "handshake not done in 3 s" in other.log_text()


# ------------------------------------------------------------------------------- logs


def test_export_names_cannot_forge_log_lines(
        server_factory: ServerFactory, adversaries: Callable[..., Adversary],
        image: Path) -> None:
    """Export names with a newline, CR, escape sequences, NUL, C1 controls or a Unicode line
    separator after ``?`` (the options part, which the catalog accepts) were logged as is:
    a client could write a line of its choosing. Every line of the log is now one of the
    server's, and the names are there escaped."""
    srv = server_factory("--export", f"disk={image}", "-v", "--debug-requests")
    adv = adversaries("names", "--port", str(srv.port), "--export", "disk?boot=")
    done = adv.done()
    assert done["reached"] == 5 and len(done["accepted"]) == 5, done
    time.sleep(0.3)
    raw = srv.log.read_bytes()
    lines = raw.split(b"\n")
    stamp = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}(?:[+-]\d\d:\d\d)? [A-Z]+ \S+ ")
    bad = [x for x in lines if x and not stamp.match(x)]
    assert not bad, bad
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", raw)
    assert "\u2028".encode() not in raw and b"\xc2\x85" not in raw
    text = raw.decode()
    assert "export=\"disk?boot=x\\n2030-01-01T00:00:00.000 INFO icbdcache.server conn=1 " \
           "forged=yes\"" in text
    assert "boot=x\\x1b[2Jforged" in text and "boot=x\\u2028forged" in text
    assert text.count("forged=yes") == 5  # each name once, inside its own line


def test_raw_clients_still_handshake(server_factory: ServerFactory, image: Path) -> None:
    """A client within every bound goes through (the limits count it in and out)."""
    srv = server_factory("--export", f"disk={image}", "--address-handshakes", "1",
                         "--address-connections", "2")
    time.sleep(0.3)  # the fixture's probe connection has gone
    with ExitStack() as stack:
        for _ in range(2):  # one at a time through the handshake
            c = stack.enter_context(RawClient(srv.port))
            c.handshake()
            assert c.go("disk") == Rep.ACK
        extra = stack.enter_context(RawClient(srv.port))
        with pytest.raises(ServerClosed):  # the address holds its two
            extra.greeting()
