"""icbd-cache run as a site service: under systemd's socket activation, ready and stopping on a
NOTIFY_SOCKET, its watchdog pinged, JSON logs, Prometheus metrics that promtool accepts and
that agree with ``stats --json``, and clients outside ``--allow`` refused.

``systemd-socket-activate`` (package systemd) plays systemd's part: it holds the listening
socket, starts the server on the first connection with ``LISTEN_FDS``, and the test's own
datagram socket plays ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
from conftest import (
    BIN,
    free_port,
    make_image,
    require,
    sha256_file,
    stop_process,
    trusted,
    wait_port,
)
from nbdraw import RawClient, closed_by_server
from scrape import promtool_check, samples, scrape

ICBD = str(BIN / "icbd-cache")
MiB = 1 << 20


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket whose messages a thread
    collects as they come, as systemd reads them (a queue left unread fills at
    ``net.unix.max_dgram_qlen`` messages, and senders then block or give up)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(self, line: str, timeout: float = 30.0) -> list[str]:
        """Wait until a message has ``line``; all read so far."""
        deadline = time.monotonic() + timeout
        while not any(line in m.split("\n") for m in list(self.messages)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {line} in {self.messages}")
            time.sleep(0.02)
        return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Path]:
    """A store holding ``lab@1`` (chunk map only; its snapshot file is the source)."""
    img = make_image(tmp_path / "lab.img", 24 * MiB, seed=15)
    st = tmp_path / "store"
    subprocess.run([ICBD, "import", str(img), "--imi", "lab", "--store", str(st)], check=True,
                   capture_output=True, timeout=120)
    return img, st


def test_socket_activated_site_serves_reports_and_counts(store: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """The issue's bar: serve --store --metrics-listen under systemd-socket-activate with a
    NOTIFY_SOCKET; nbdcopy reads the export; READY=1, WATCHDOG=1 and STOPPING=1 arrive;
    /metrics passes promtool and its counters equal stats --json after the stop; every log
    line is JSON with an event and a timestamp with its offset; a client from outside
    --allow is closed without a greeting."""
    require("systemd-socket-activate", "nbdcopy", "promtool")
    img, st = store
    port, mport = free_port(), free_port()
    notify = NotifySocket(tmp_path / "notify.sock")
    log = tmp_path / "serve.log"
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
           *(f"-E{k}={v}" for k, v in env.items()),
           ICBD, "serve", "--store", str(st), "--metrics-listen", f"127.0.0.1:{mport}",
           "--allow", "127.0.0.1/32", "--log-format", "json"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "Listening on" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)  # systemd-socket-activate holds the port
        # the first client starts the server (socket activation) and waits in the queue
        got = tmp_path / "got.img"
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{port}/lab", str(got)], check=True,
                       timeout=120)
        assert sha256_file(got) == sha256_file(img)
        ready = notify.wait_for("READY=1")
        assert any("READY=1" in m for m in ready)
        notify.wait_for("WATCHDOG=1", timeout=5)

        # a client from another address of the loopback network: closed, no greeting
        outsider = socket.socket()
        outsider.bind(("127.0.0.2", 0))
        outsider.settimeout(5)
        outsider.connect(("127.0.0.1", port))
        assert closed_by_server(outsider)
        outsider.close()
        with RawClient(port) as insider:  # 127.0.0.1 is in --allow: the greeting comes
            assert insider.greeting()

        wait_port("127.0.0.1", mport)
        # background faults (readahead) settle: two scrapes a second apart agree
        counted = re.compile(r"^icbd_(chunk|fault|prefetch|source)\S* .*$", re.M)
        text, before = scrape(mport), None
        deadline = time.monotonic() + 15
        while counted.findall(text) != before and time.monotonic() < deadline:
            before = counted.findall(text)
            time.sleep(1.0)
            text = scrape(mport)
        promtool_check(text)
        m = samples(text)
        assert m['icbd_nbd_refused_total{reason="not in --allow"}'] == 1
        assert m['icbd_nbd_bytes_total{direction="read",export="lab@1"}'] > 0
        source = f'icbd_source_bytes_total{{source="{img}"}}'
        assert m[source] > 0
    finally:
        code = stop_process(proc)
    notify.wait_for("STOPPING=1", timeout=5)
    notify.close()
    assert code == 0, log.read_text()[-3000:]

    # the counters of the last scrape are what the process persisted into the store
    stats = json.loads(subprocess.run([ICBD, "stats", "--store", str(st), "--json"],
                                      check=True, capture_output=True, text=True).stdout)
    assert stats["faults"] > 0
    for metric, key in (('icbd_chunk_hits_total{tier="hot"}', "hits_hot"),
                        ('icbd_chunk_hits_total{tier="queued"}', "hits_queued"),
                        ('icbd_chunk_hits_total{tier="lmdb"}', "hits_lmdb"),
                        ("icbd_chunk_misses_total", "misses"), ("icbd_faults_total", "faults"),
                        ("icbd_faults_coalesced_total", "coalesced"),
                        ("icbd_fault_errors_total", "fault_errors"),
                        ("icbd_prefetched_total", "prefetched"),
                        (source, f"bytes_from:{img}"),
                        ("icbd_store_held_bytes", "held_bytes")):
        assert m[metric] == stats.get(key, 0), (metric, m[metric], key, stats.get(key))
    assert m["icbd_fault_duration_seconds_count"] == stats["faults"]

    # every line is one JSON object with an event and a timezone-aware timestamp
    # (systemd-socket-activate's own lines come first, up to the one saying it execs us)
    lines = log.read_text().splitlines()
    execs = [n for n, line in enumerate(lines) if line.startswith("Execing ")]
    assert len(execs) == 1, lines[:5]
    lines = lines[execs[0] + 1:]
    assert lines
    events = []
    for line in lines:
        rec = json.loads(line)
        assert datetime.fromisoformat(rec["ts"]).utcoffset() is not None, line
        assert rec["event"] and rec["level"] in ("info", "warning", "error"), line
        events.append(rec)
    names = [r["event"] for r in events]
    for wanted in ("listening", "metrics_listening", "serving", "connect", "refused",
                   "shutdown"):
        assert wanted in names, names
    listening = next(r for r in events if r["event"] == "listening")
    assert listening["passed"] == "yes"  # the socket systemd-socket-activate held
    refused = next(r for r in events if r["event"] == "refused")
    assert refused["peer"].startswith("127.0.0.2:") and refused["reason"] == "not in --allow"


def test_watchdog_and_notify_follow_the_protocol(tmp_path: Path) -> None:
    from icbdcache import activation

    env = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "3000000"}
    assert activation.watchdog_interval(env) == 1.5
    assert activation.watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 1.5
    assert activation.watchdog_interval({**env, "WATCHDOG_PID": str(os.getppid())}) == 1.5
    assert activation.watchdog_interval({**env, "WATCHDOG_PID": "1"}) is None
    assert activation.watchdog_interval({**env, "WATCHDOG_PID": "7"}, pid=8) is None
    assert activation.watchdog_interval({"WATCHDOG_USEC": "3000000"}) is None  # no socket
    assert activation.watchdog_interval({**env, "WATCHDOG_USEC": "0"}) is None
    sock = NotifySocket(tmp_path / "n")
    try:
        assert activation.ready("serving", mainpid=42, environ=env)
        assert activation.stopping(environ=env)
        msgs = sock.wait_for("STOPPING=1", timeout=5)
        assert msgs[0] == "MAINPID=42\nREADY=1\nSTATUS=serving"
    finally:
        sock.close()


def test_sighup_reloads_allow_and_keeps_serving(tmp_path: Path) -> None:
    """SIGHUP re-reads --config: a network added to allow is let in at once, the server keeps
    its clients and logs what it did; a broken file changes nothing."""
    img = make_image(tmp_path / "x.img", 4 * MiB)
    port = free_port()
    conf = tmp_path / "serve.toml"
    conf.write_text(f'export = ["x={img}"]\nlisten = ["127.0.0.1:{port}"]\n'
                    'allow = ["127.0.0.1/32"]\n')
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, "serve", "--config", str(conf)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
        kept = RawClient(port)
        kept.greeting()

        def from_127_0_0_2_closed() -> bool:
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            try:
                return closed_by_server(s, 1.0)
            finally:
                s.close()

        assert from_127_0_0_2_closed()
        conf.write_text(conf.read_text().replace('"127.0.0.1/32"', '"127.0.0.0/8"'))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "event=reload" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 'allow=127.0.0.0/8 pins=- restart_needed=-' in log.read_text()
        assert not from_127_0_0_2_closed()
        conf.write_text("allow = [\n")  # broken TOML: refused, the server goes on
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "refused, settings unchanged" not in log.read_text() \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "not a valid TOML file" in log.read_text()
        assert proc.poll() is None and not from_127_0_0_2_closed()
        assert not closed_by_server(kept.sock, 0.2)
        kept.close()
    finally:
        assert stop_process(proc) == 0, log.read_text()[-2000:]


def test_export_allow_hides_an_export_from_other_networks(tmp_path: Path) -> None:
    """allow= on an --export: to a client outside it the export is unknown (GO refused,
    not listed); another export is served to it as usual."""
    from nbd.constants import Opt, Rep

    img = make_image(tmp_path / "x.img", 4 * MiB)
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [ICBD, "serve", "--listen", f"127.0.0.1:{port}", "--export",
             f"staff={img},allow=127.0.0.3/32", "--export", f"open={img}"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)

        def client(source: str) -> RawClient:
            s = socket.socket()
            s.bind((source, 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            c = RawClient(port, sock=s)
            c.handshake()
            return c

        with client("127.0.0.2") as c:
            assert c.go("staff") == Rep.ERR_UNKNOWN
            c.option(Opt.LIST)
            names = []
            while True:
                _opt, rep, data = c.option_reply()
                if rep != Rep.SERVER:
                    break
                names.append(data[4:4 + int.from_bytes(data[:4], "big")].decode())
            assert names == ["open"]
            assert c.go("open") == Rep.ACK
        with client("127.0.0.3") as c:
            assert c.go("staff") == Rep.ACK
        text = log.read_text()
        assert re.search(r"event=refused .*reason=\"export allow\".*export=staff", text), text
    finally:
        stop_process(proc)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed "
                    "(package prometheus; scripts/setup installs it)")
def test_pxe_and_master_metrics_pass_promtool(tmp_path: Path) -> None:
    """The PXE HTTP server's and the master's /metrics pass promtool; the master shows a
    registered site up, and its admin rule (loopback here) lets the scrape in."""
    st = tmp_path / "store"
    img = make_image(tmp_path / "x.img", 2 * MiB)
    subprocess.run([ICBD, "import", str(img), "--imi", "lab", "--store", str(st)], check=True,
                   capture_output=True, timeout=60)
    http = free_port()
    pxe_log = tmp_path / "pxe.log"
    with open(pxe_log, "wb") as out:
        pxe = subprocess.Popen([ICBD, "pxe", "serve", "--store", str(st), "--nbd-host",
                                "127.0.0.1", "--listen", "127.0.0.1", "--tftp-port", "off",
                                "--http-port", str(http), "--reconnect", "0"],
                               stdout=out, stderr=subprocess.STDOUT)
    mport = free_port()
    master_log = tmp_path / "master.log"
    with open(master_log, "wb") as out:
        master = subprocess.Popen([ICBD, "master", "--store", str(tmp_path / "m"), "--listen",
                                   f"127.0.0.1:{mport}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", http)
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/boot.ipxe", timeout=10) as r:
            assert r.status == 200
        text = scrape(http)
        promtool_check(text)
        m = samples(text)
        assert m['icbd_pxe_http_requests_total{status="200"}'] == 1
        assert m["icbd_pxe_http_bytes_total"] > 0

        wait_port("127.0.0.1", mport)
        subprocess.run([ICBD, *trusted(["replica", "--store", str(tmp_path / "site"), "--master",
                                        f"http://127.0.0.1:{mport}", "--site", "site-a",
                                        "--once", "-q"])],
                       check=True, capture_output=True, timeout=60)
        text = scrape(mport)
        promtool_check(text)
        m = samples(text)
        assert m['icbd_master_sites{state="up"}'] == 1
        assert m['icbd_master_site_up{site="site-a"}'] == 1
    finally:
        stop_process(pxe)
        stop_process(master)


def json_events(log: Path) -> list[dict[str, object]]:
    """Every line of ``log`` as a JSON object (each must parse, with an event and a level)."""
    out = []
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        assert rec["event"] and rec["level"], line
        out.append(rec)
    return out


def wait_event(log: Path, event: str, timeout: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in json_events(log) if r["event"] == event]
        if found:
            return found[0]
        assert time.monotonic() < deadline, (event, log.read_text()[-2000:])
        time.sleep(0.05)


def test_the_events_an_admin_looks_for_are_logged_at_info(store: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    """At the default level, without -v: a client asking for an unknown export (its name,
    with a newline in it, kept inside one line) and a TFTP file not found."""
    require("curl")
    _img, st = store
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, "serve", "--store", str(st), "--listen",
                                 f"127.0.0.1:{port}", "--log-format", "json"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
        with RawClient(port) as c:
            c.handshake()
            assert c.go("nope\nevent=forged") != 0
        rec = wait_event(log, "unknown_export")
        # the name as the server quotes it: its newline written as \n, inside one JSON line
        assert rec["level"] == "info" and str(rec["why"]) == "unknown export " \
            "'nope\\nevent=forged'", rec
    finally:
        assert stop_process(proc) == 0, log.read_text()[-2000:]
    assert "forged" not in [r["event"] for r in json_events(log)]

    tftp, http = free_port(), free_port()
    log = tmp_path / "pxe.log"
    with open(log, "wb") as out:
        pxe = subprocess.Popen([ICBD, "pxe", "serve", "--store", str(st), "--nbd-host",
                                "127.0.0.1", "--listen", "127.0.0.1", "--tftp-port", str(tftp),
                                "--http-port", str(http), "--log-format", "json"],
                               stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", http)
        got = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", os.devnull,
                              f"tftp://127.0.0.1:{tftp}/no-such-file"], capture_output=True,
                             text=True, timeout=30, check=False)
        assert got.returncode != 0  # curl's TFTP client got the server's "file not found"
        rec = wait_event(log, "tftp_not_found")
        assert rec["level"] == "info" and rec["file"] == "no-such-file", rec
        assert rec["peer"] and str(rec["peer"]).startswith("127.0.0.1")
    finally:
        assert stop_process(pxe) == 0, log.read_text()[-2000:]


@pytest.mark.parametrize("command", ["master", "replica", "pxe serve"])
def test_each_service_says_ready_pings_and_says_stopping(command: str, tmp_path: Path) -> None:
    """What Type=notify and WatchdogSec= in the units rely on, for the other services: READY=1
    once their port answers, WATCHDOG=1 every half WATCHDOG_USEC, STOPPING=1 on SIGTERM, and
    a clean exit."""
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"}
    port = free_port()
    master = None
    if command == "master":
        argv = ["master", "--store", str(tmp_path / "m"), "--listen", f"127.0.0.1:{port}"]
    elif command == "replica":
        mport = free_port()
        master = subprocess.Popen([ICBD, "master", "--store", str(tmp_path / "m"), "--listen",
                                   f"127.0.0.1:{mport}", "-q"])
        wait_port("127.0.0.1", mport)
        argv = trusted(["replica", "--store", str(tmp_path / "site"), "--master",
                        f"http://127.0.0.1:{mport}", "--site", "site-a",
                        "--metrics-listen", f"127.0.0.1:{port}"])
    else:
        st = tmp_path / "store"
        subprocess.run([ICBD, "import", str(make_image(tmp_path / "x.img", 2 * MiB)), "--imi",
                        "lab", "--store", str(st)], check=True, capture_output=True, timeout=60)
        argv = ["pxe", "serve", "--store", str(st), "--nbd-host", "127.0.0.1", "--listen",
                "127.0.0.1", "--tftp-port", "off", "--http-port", str(port)]
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, *argv], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_port("127.0.0.1", port)
        notify.wait_for("READY=1", timeout=10)
        pings = len([m for m in notify.wait_for("WATCHDOG=1", timeout=5) if m == "WATCHDOG=1"])
        time.sleep(1.0)  # one ping every 0.15 s: about six more; two at least
        notify.sock.settimeout(0.1)
        with contextlib.suppress(TimeoutError):
            while True:
                notify.messages.append(notify.sock.recv(4096).decode())
        assert len([m for m in notify.messages if m == "WATCHDOG=1"]) >= pings + 2, \
            notify.messages
        assert not any("STOPPING=1" in m for m in notify.messages)
    finally:
        code = stop_process(proc)
        if master is not None:
            stop_process(master)
    notify.wait_for("STOPPING=1", timeout=5)
    notify.close()
    assert code == 0, log.read_text()[-2000:]
    ready = next(m for m in notify.messages if "READY=1" in m.split("\n"))
    assert ready.startswith("READY=1\nSTATUS="), ready
