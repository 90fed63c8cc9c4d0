"""No silent traps at the edges (issue 15, item 8), the log formats, and boot menus from
templates an admin overrides."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import BIN, REPO, free_port, make_image, stop_process, wait_port

from icbdcache.log import EventFormatter, kv
from pxe.render import BootEntry, BootSettings, ConfigError, Pin, load_pins, render_configs

ICBD = str(BIN / "icbd-cache")
MiB = 1 << 20


def wait_text(path: Path, pattern: str, timeout: float = 20.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        m = re.search(pattern, path.read_text(errors="replace"))
        if m is not None:
            return m
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {pattern!r} in {path}: {path.read_text()[-1500:]}")
        time.sleep(0.05)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    img = make_image(tmp_path / "lab.img", 2 * MiB)
    st = tmp_path / "store"
    subprocess.run([ICBD, "import", str(img), "--imi", "lab", "--store", str(st)], check=True,
                   capture_output=True, timeout=60)
    return st


# ------------------------------------------------------------------------- the traps


def test_second_pxe_serve_on_a_tftp_port_in_use_is_refused(store: Path, tmp_path: Path) -> None:
    """Two TFTP servers never share a UDP port: the second says which port and protocol."""
    port = free_port()
    args = ["pxe", "serve", "--store", str(store), "--nbd-host", "127.0.0.1", "--listen",
            "127.0.0.1", "--tftp-port", str(port), "--http-port", "off", "--reconnect", "0"]
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen([ICBD, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_text(log, "event=pxe_ready")
        second = subprocess.run([ICBD, *args], capture_output=True, text=True, timeout=60,
                                check=False)
        assert second.returncode == 2
        assert f"TFTP port {port}/udp on 127.0.0.1 is in use" in second.stderr, second.stderr
        assert first.poll() is None
    finally:
        stop_process(first)


def test_serve_on_an_address_in_use_exits_cleanly(store: Path, tmp_path: Path) -> None:
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    try:
        p = subprocess.run([ICBD, "serve", "--store", str(store), "--listen",
                            f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
                           check=False)
    finally:
        holder.close()
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last == (f"icbd-cache serve: [Errno 98] --listen 127.0.0.1:{port}: address already "
                    "in use (another icbd-cache serve, nbd-server, or a systemd socket unit "
                    "holding it?)"), p.stderr
    assert "Task was destroyed" not in p.stderr and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("command", ["serve", "pxe serve"])
def test_sighup_is_logged_not_fatal(command: str, store: Path, tmp_path: Path) -> None:
    """SIGHUP reloads (serve: settings; pxe serve: pins and templates) and serves on."""
    pins = tmp_path / "pins.toml"
    pins.write_text('[[pin]]\nmac = "aa:bb:cc:dd:ee:01"\nboot = "lab@1"\n')
    port = free_port()
    if command == "serve":
        args = ["serve", "--store", str(store), "--listen", f"127.0.0.1:{port}"]
        ready = "event=serving"
    else:
        args = ["pxe", "serve", "--store", str(store), "--nbd-host", "127.0.0.1", "--listen",
                "127.0.0.1", "--tftp-port", "off", "--http-port", str(port), "--reconnect",
                "0", "--pins", str(pins)]
        ready = "event=pxe_ready"
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_text(log, ready)
        if command == "pxe serve":
            # a pin to a version that does not exist is said, not dropped silently
            pins.write_text('[[pin]]\nmac = "aa:bb:cc:dd:ee:01"\nboot = "lab@9"\n')
        proc.send_signal(signal.SIGHUP)
        wait_text(log, "event=reload")
        if command == "pxe serve":
            m = wait_text(log, r"event=pin_unresolved mac=aa:bb:cc:dd:ee:01 boot=lab@9")
            assert m
        time.sleep(0.3)
        assert proc.poll() is None
        wait_port("127.0.0.1", port)
    finally:
        assert stop_process(proc) == 0


def _catches_sighup(pid: int) -> bool:
    """Whether process ``pid`` has a handler for SIGHUP (``SigCgt`` of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


@pytest.mark.parametrize("command", ["serve --workers 1", "serve --workers 2", "master"])
def test_sighup_while_a_service_starts_is_applied_not_fatal(store: Path, tmp_path: Path,
                                                            command: str) -> None:
    """SIGHUPs sent every few ms from the moment the service catches them (early in its
    imports, not once it runs) until it is up: it starts, runs and reloads (serve: its
    settings; master: its token files)."""
    port = free_port()
    log = tmp_path / "log"
    name, *extra = command.split()
    where = ["--store", str(store)] if name == "serve" else ["--store", str(tmp_path / "m")]
    up = "event=serving" if name == "serve" else "event=listening"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, name, *where, "--listen", f"127.0.0.1:{port}", *extra],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        sent = 0
        deadline = time.monotonic() + 30
        while not _catches_sighup(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        while up not in log.read_text() or not sent:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.005)
        wait_text(log, "event=reload")
        time.sleep(0.3)
        assert proc.poll() is None, log.read_text()
        wait_port("127.0.0.1", port)
    finally:
        assert stop_process(proc) == 0


def test_only_serve_catches_sighup_during_its_imports(tmp_path: Path) -> None:
    """The early SIGHUP handler is for the services that reload on SIGHUP (serve, master)
    alone: other commands (a terminal that closes) keep SIGHUP's default action."""
    code = ("import os, signal, sys\n"
            "sys.argv = ['icbd-cache', sys.argv[1]]\n"
            "import icbdcache.cli\n"
            "from icbdcache import earlyhup\n"
            "os.kill(os.getpid(), signal.SIGHUP)\n"
            "print('alive', earlyhup.seen())\n")
    # SIGHUP's default action in the children, whatever this run inherited (under nohup
    # it is ignored, and the commands would inherit that)
    def default_hup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    for command in ("serve", "master"):
        p = subprocess.run([sys.executable, "-c", code, command], capture_output=True,
                           text=True, timeout=60, check=False, preexec_fn=default_hup)
        assert p.stdout.split() == ["alive", "True"], (command, p.stderr)
    other = subprocess.run([sys.executable, "-c", code, "publish"], capture_output=True,
                           text=True, timeout=60, check=False, preexec_fn=default_hup)
    assert other.returncode == -signal.SIGHUP and other.stdout == ""


def test_bad_pins_name_their_file_and_number(tmp_path: Path) -> None:
    pins = tmp_path / "pins.toml"
    pins.write_text('[[pin]]\nmac = "aa:bb:cc:dd:ee:01"\nboot = "lab"\n'
                    '[[pin]]\nmac = "aa:bb"\nboot = "lab"\n')
    with pytest.raises(ConfigError) as e:
        load_pins(pins)
    assert str(e.value) == f"{pins}: pin 2: bad MAC address 'aa:bb'"
    pins.write_text('[[pin]]\nmac = "aa:bb:cc:dd:ee:01"\nboot = "lab 7"\n')
    with pytest.raises(ConfigError) as e:
        load_pins(pins)
    assert str(e.value).startswith(f"{pins}: pin 1: bad boot 'lab 7'")


def test_a_pin_to_a_missing_version_is_logged(store: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    from icbdcache.store import Store
    from pxe.tree import BootTree

    settings = BootSettings(nbd_host="127.0.0.1", reconnect=0,
                            pins=[Pin("aa:bb:cc:dd:ee:01", "gone@3")])
    s = Store(str(store))
    try:
        with caplog.at_level(logging.WARNING, logger="pxe.tree"):
            BootTree(s, settings).refresh(force=True)
    finally:
        s.close()
    lines = [r.getMessage() for r in caplog.records if "pin_unresolved" in r.getMessage()]
    assert lines and "mac=aa:bb:cc:dd:ee:01 boot=gone@3" in lines[0]


@pytest.mark.parametrize("command", [["admin", "status"], ["replica", "--store", "S",
                                                           "--site", "a"]])
def test_a_master_url_without_its_scheme_is_refused_saying_so(command: list[str]) -> None:
    p = subprocess.run([ICBD, *command[:1], "--master", "127.0.0.1:10810", *command[1:]],
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2
    assert "the scheme is missing: http://127.0.0.1:10810" in p.stderr, p.stderr


def test_an_image_not_a_multiple_of_512_is_said(tmp_path: Path) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(b"\1" * 1_000_000)
    p = subprocess.run([ICBD, "import", str(img), "--imi", "odd", "--store",
                        str(tmp_path / "st")], capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 0
    assert ("1000000 bytes is not a multiple of 512: a kernel's NBD device ends at 999936 "
            "bytes and cannot read the last 64") in p.stderr, p.stderr
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([ICBD, "serve", "--export", f"odd={img}", "--listen",
                                 f"127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_text(log, r"event=image_size export=odd .*not a multiple of 512")
    finally:
        stop_process(proc)


def test_readme_commands_paste_as_commands() -> None:
    """No line of a README code block chains icbd-cache commands with '|' as a list (pasted,
    it is a shell pipeline)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        for line in block.splitlines():
            words = line.split("#")[0].split("|")
            assert not (len(words) > 1 and all(w.split()[:1] and w.split()[0] in (
                "icbd-cache", "ls", "stats", "verify", "warm", "pin") for w in words)), line


# ------------------------------------------------------------------------- log formats


def _record(msg: object, exc: bool = False) -> logging.LogRecord:
    rec = logging.LogRecord("icbdcache.test", logging.INFO, __file__, 1, msg, None, None)
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            rec.exc_info = sys.exc_info()
    return rec


def test_event_formatter_text_and_json() -> None:
    msg = kv(event="connect", conn=3, peer="10.0.0.1:5", export='lab "x"\nforged=1')
    text = EventFormatter("text").format(_record(msg))
    stamp, level, logger, rest = text.split(" ", 3)
    assert datetime.fromisoformat(stamp).utcoffset() is not None
    assert (level, logger) == ("INFO", "icbdcache.test")
    assert rest.startswith("event=connect conn=3 peer=10.0.0.1:5 export=")
    line = EventFormatter("json").format(_record(msg))
    obj = json.loads(line)
    assert "\n" not in line
    assert obj["event"] == "connect" and obj["conn"] == 3
    assert obj["export"] == 'lab "x"\nforged=1'
    assert datetime.fromisoformat(obj["ts"]).utcoffset() is not None
    assert list(obj)[:4] == ["ts", "level", "logger", "event"]
    # no event named: the first field's name; plain text: "message"
    assert json.loads(EventFormatter("json").format(_record(kv(listening="a:1"))))[
        "event"] == "listening"
    plain = json.loads(EventFormatter("json").format(_record("worker failed", exc=True)))
    assert plain["event"] == "message" and plain["msg"] == "worker failed"
    assert "ValueError: boom" in plain["exc"]
    journal = EventFormatter("text", journal=True).format(_record(msg))
    assert journal.startswith("<6>INFO icbdcache.test event=connect")
    with pytest.raises(ValueError):
        EventFormatter("xml")


# ------------------------------------------------------------------------- templates

ENTRIES = [BootEntry("lab", "7", "boot/lab@7/vmlinuz", "boot/lab@7/initrd.img", True, 7.0)]


def test_an_admin_template_extends_the_default_menu(tmp_path: Path) -> None:
    """A local-boot entry added by extending the default PXELINUX menu; the iPXE menu is
    replaced whole; the defaults are unchanged without --templates."""
    (tmp_path / "pxelinux-default.j2").write_text(
        '{% extends "default/pxelinux-default.j2" %}\n{% block extra %}\n'
        "LABEL local\n  MENU LABEL Boot from the local disk\n  LOCALBOOT 0\n"
        "{% endblock %}\n")
    (tmp_path / "ipxe-menu.j2").write_text(
        "#!ipxe\n# {{ settings.title }}\n{% for e in menu %}echo {{ e.key }}\n{% endfor %}")
    plain = render_configs(ENTRIES, BootSettings(nbd_host="10.0.0.5", title="Lab 3"))
    custom = render_configs(ENTRIES, BootSettings(nbd_host="10.0.0.5", title="Lab 3",
                                                  templates=str(tmp_path)))
    assert custom["pxelinux.cfg/default"] == (
        plain["pxelinux.cfg/default"]
        + "LABEL local\n  MENU LABEL Boot from the local disk\n  LOCALBOOT 0\n")
    assert "MENU TITLE Lab 3" in custom["pxelinux.cfg/default"]
    assert custom["boot.ipxe"] == "#!ipxe\n# Lab 3\necho lab@7\n"


def test_a_broken_template_names_itself(tmp_path: Path) -> None:
    (tmp_path / "ipxe-menu.j2").write_text("#!ipxe\n{% for e in menu %}\n")
    with pytest.raises(ConfigError, match=r"template .*ipxe-menu.j2:\d+"):
        render_configs(ENTRIES, BootSettings(nbd_host="10.0.0.5", templates=str(tmp_path)))
    (tmp_path / "ipxe-menu.j2").write_text("#!ipxe\n{{ no_such_variable }}\n")
    with pytest.raises(ConfigError, match="no_such_variable"):
        render_configs(ENTRIES, BootSettings(nbd_host="10.0.0.5", templates=str(tmp_path)))
    with pytest.raises(ConfigError, match="not a directory"):
        BootSettings(nbd_host="10.0.0.5", templates=str(tmp_path / "none")).check()
