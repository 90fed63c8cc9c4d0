"""A restart of the cache server costs a diskless workstation a pause, never its root disk.

Real workstations: the Debian test iMI of ``scripts/build-test-imi`` booted under TCG through
``icbd-cache serve --store --pxe`` (iPXE over our HTTP, QEMU user networking: the host's
127.0.0.1 is 10.0.2.2). The boot configs load icbd-cache's second initrd after the iMI's
(docs/pxe.md, "A restart of the server"), the way every iMI gets it: the test iMI has nothing
of its own for it. Its ``icbd-nbd-client`` attaches the root with a dead-connection timeout
and reconnects it; its ``icbd-boot-ok`` unit prints the boot marker and, with
``icbd.halt=none``, leaves the machine up for a root shell on the serial console.

* SIGKILL of the server after boot, restart 2 s later: after ``drop_caches`` the guest reads
  ``/usr/bin/bash`` with the right sha256, its kernel log has no I/O error, our client logged
  the reconnection and the new server logged the guest's connection.
* The same kill in the middle of the boot: the guest reaches its boot marker.
* A planned restart (``serve --handover``): the new server takes the guest's connection over
  while the guest reads; its kernel log has no ``Receive control failed`` (no drop at all).
* A writable root (``--store-cow``, ``--pxe-overlay none``): a file written and synced before
  the kill reads back after the restart and ``drop_caches``, and ``e2fsck -fn`` of the
  client's view after its shutdown is clean. This needs overlays that survive a restart of
  the server (issue 12); without them the test skips, saying so.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import BIN, free_port, kill_server, require, start_server, stop_process, wait_port

from bench.vm import GUEST_APPEND, MARKER_RX, Unavailable, Vm, boot_vm, build_test_imi

pytestmark = pytest.mark.guest

ICBD = str(BIN / "icbd-cache")
BOOT_TIMEOUT = 300.0
#: Seconds between the kill and the restart (the issue's scenario).
DOWN = 2.0
#: Seconds a restarted server may take to serve (its own ``startup_s``), under TCG load.
SERVE_BOUND = 10.0
#: What the guest reads back after the restart, and where the expected bytes come from.
PROBE_FILE = "/usr/bin/bash"
#: The kernel arguments of these guests: a root shell instead of the power-off.
APPEND = f"{GUEST_APPEND} icbd.halt=none"
GUEST_MAC = "52:54:00:1c:bd:31"


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
class Site:
    """``serve --store --pxe`` started (and restarted) with the same arguments."""

    tmp: Path
    store: Path
    args: list[str]
    port: int
    http: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)

    def start(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"serve-{len(self.procs)}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen([ICBD, "serve", *self.args], stdout=out,
                                 stderr=subprocess.STDOUT)
        self.procs.append(p)
        self.logs.append(log)
        return p

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait until the newest server serves; its ``startup_s`` (seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"serving=yes startup_s=([0-9.]+)", self.log(-1))
            if m:
                wait_port("127.0.0.1", self.port)
                return float(m.group(1))
            if self.procs[-1].poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the server did not start:\n{self.log(-1)[-3000:]}")

    def log(self, n: int) -> str:
        return self.logs[n].read_text(errors="replace")

    def kill(self) -> None:
        kill_server(self.procs[-1], self.log(-1))

    def boot(self, name: str) -> Vm:
        vm = boot_vm(name, f"http://10.0.2.2:{self.http}/boot.ipxe", GUEST_MAC,
                     self.tmp / f"{name}.console", interactive=True)
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        for vm in self.vms:
            vm.stop()
        for p in self.procs:
            stop_process(p)


@pytest.fixture(scope="module")
def test_imi() -> Path:
    require("qemu-system-x86_64", "debootstrap", "debugfs", "gcc")
    try:
        return build_test_imi()
    except Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def probe_sha256(test_imi: Path) -> str:
    """sha256 of PROBE_FILE inside the iMI, read with debugfs (nothing mounted)."""
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    out = subprocess.run([debugfs, "-R", f"cat {PROBE_FILE}", str(test_imi / "imi.ext4")],
                         capture_output=True, check=True, timeout=60).stdout
    assert len(out) > 100_000, f"{PROBE_FILE} not found in the iMI"
    return hashlib.sha256(out).hexdigest()


@pytest.fixture(scope="module")
def store(test_imi: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reconnect") / "store"
    p = subprocess.run([ICBD, "import", str(test_imi / "imi.ext4"), "--imi", "lab", "--store",
                        str(path)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "imported lab@1" in p.stdout, p.stdout + p.stderr
    return path


def make_site(tmp: Path, store: Path, *extra: str) -> Site:
    port, http = stable_port(), stable_port()
    args = ["--store", str(store), "--listen", f"127.0.0.1:{port}", "--pxe",
            "--pxe-nbd-host", "10.0.2.2", "--pxe-tftp-port", "off",
            "--pxe-http-port", str(http), "--pxe-menu-timeout", "0", "--pxe-append", APPEND,
            *extra]
    return Site(tmp, store, args, port, http)


@pytest.fixture
def site(store: Path, tmp_path: Path) -> Iterator[Site]:
    s = make_site(tmp_path, store)
    yield s
    s.close()


def up(site: Site, name: str) -> tuple[Vm, float]:
    """Start the server and a guest; wait for the marker and a root shell. The guest and the
    kill time base (host monotonic s of the marker)."""
    site.start()
    site.wait_ready()
    vm = site.boot(name)
    t, m = vm.wait_for(MARKER_RX, BOOT_TIMEOUT)
    assert m.group(2) == f"10.0.2.2:{site.port}/lab@1"
    vm.login()
    return vm, t


def check_reconnected_root(vm: Vm, expect: str) -> list[str]:
    """Drop the guest's caches, read PROBE_FILE back: the right bytes, no I/O error; the
    guest's kernel log."""
    rc, out = vm.run(f"echo 3 > /proc/sys/vm/drop_caches; sha256sum {PROBE_FILE}", 300)
    assert rc == 0 and out and out[0].split()[0] == expect, (rc, out, vm.tail())
    rc, dmesg = vm.run("dmesg")
    assert rc == 0 and dmesg, vm.tail()
    errors = [ln for ln in dmesg if "I/O error" in ln or "EXT4-fs error" in ln]
    assert not errors, errors
    return dmesg


def test_readonly_root_survives_a_server_kill_after_boot(site: Site, probe_sha256: str) -> None:
    vm, _ = up(site, "ro-after")
    rc, out = vm.run("cat /proc/cmdline; "
                     "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done")
    assert rc == 0
    assert any("icbd.reconnect=600" in ln for ln in out), out
    assert any(ln.startswith("@usr/sbin/icbd-nbd-client 10.0.2.2 -N lab@1") for ln in out), out
    site.kill()
    time.sleep(DOWN)
    site.start()
    startup = site.wait_ready()
    dmesg = check_reconnected_root(vm, probe_sha256)
    assert any(re.search(rf"reconnected to 10.0.2.2:{site.port}/lab@1 after", ln)
               for ln in dmesg), dmesg[-30:]
    assert re.search(r"conn=\d+ peer=127\.0\.0\.1:\d+ export=lab@1 .*mode=ro", site.log(1)), \
        site.log(1)[-2000:]
    assert startup < SERVE_BOUND, startup
    print(f"restarted server serving after {startup:.2f} s")


def test_readonly_root_survives_a_server_kill_mid_boot(site: Site) -> None:
    site.start()
    site.wait_ready()
    vm = site.boot("ro-mid")
    # the initramfs attached the root: let systemd start reading it, then kill
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not re.search(r"export=lab@1 ", site.log(0)):
        assert time.monotonic() < deadline and not vm.finished(), vm.tail()
        time.sleep(0.2)
    time.sleep(4.0)
    assert vm.find(MARKER_RX) is None, "booted before the kill: nothing was tested"
    killed = time.monotonic()
    site.kill()
    time.sleep(DOWN)
    site.start()
    site.wait_ready()
    t, m = vm.wait_for(MARKER_RX, BOOT_TIMEOUT)
    assert t > killed and m.group(3) == "icbd-test-imi"
    assert re.search(r"conn=\d+ peer=127\.0\.0\.1:\d+ export=lab@1 ", site.log(1))
    print(f"marker {t - killed:.1f} s after the kill")


def test_planned_restart_hands_the_root_over(store: Path, tmp_path: Path,
                                             probe_sha256: str) -> None:
    site = make_site(tmp_path, store, "--handover", str(tmp_path / "handover.sock"))
    try:
        vm, _ = up(site, "handover")
        # a reader busy on the root device while the server changes
        vm.send("dd if=/dev/nbd0 of=/dev/null bs=64k count=3000 iflag=direct 2>/dev/null &\n")
        time.sleep(1.0)
        old = site.procs[0]
        site.start()
        assert old.wait(120) == 0, site.log(0)[-3000:]
        site.wait_ready()
        assert re.search(r"handover=done .*connections=1 closed=0", site.log(0)), site.log(0)
        assert re.search(r"peer=127\.0\.0\.1:\d+ export=lab@1 handed_over_from=", site.log(1))
        rc, _ = vm.run("wait", 300)
        assert rc == 0
        dmesg = check_reconnected_root(vm, probe_sha256)
        drops = [ln for ln in dmesg if "Receive control failed" in ln or "timed out" in ln
                 or "reconnected to" in ln or "reconnecting" in ln]
        assert not drops, drops
    finally:
        site.close()


def check_durable_overlays(tmp: Path) -> None:
    """A flushed write of a copy-on-write client survives SIGKILL of the server (issue 12):
    write, flush, kill, restart, read back as the same client; AssertionError (with the
    server's log) otherwise. The guest below relies on it, and a failure here says why more
    plainly than a guest that finds its file gone."""
    require("nbdsh")
    base = tmp / "probe.img"
    base.write_bytes(bytes(1 << 20))
    cow = tmp / "probe-cow"
    cow.mkdir()
    port = stable_port()
    args = ["--export", f"p={base},cow", "--cow-dir", str(cow)]
    script = ("import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
              "if sys.argv[2] == 'w':\n    h.pwrite(b'\\x5a' * 4096, 0)\n    h.flush()\n"
              "else:\n    print(h.pread(4096, 0) == b'\\x5a' * 4096)\n")
    for step in ("w", "r"):
        srv = start_server(tmp, *args, port=port)  # waits until every worker serves
        try:
            p = subprocess.run(["/usr/bin/python3", "-I", "-c", script,
                                f"nbd://127.0.0.1:{port}/p", step], capture_output=True,
                               text=True, timeout=60, cwd=tmp)
            assert p.returncode == 0, (p.stderr, srv.log_text()[-3000:])
            if step == "r":
                assert p.stdout.strip() == "True", ("the flushed write is gone after SIGKILL",
                                                    srv.log_text()[-3000:])
        finally:
            srv.stop(signal.SIGKILL if step == "w" else signal.SIGTERM)


def test_writable_root_reconnects_into_its_overlay(store: Path, tmp_path: Path) -> None:
    check_durable_overlays(tmp_path)
    cow = tmp_path / "cow"
    cow.mkdir()
    site = make_site(tmp_path, store, "--store-cow", "--cow-dir", str(cow),
                     "--pxe-overlay", "none")
    try:
        vm, _ = up(site, "rw")
        rc, out = vm.run("head -c 1048576 /dev/urandom > /root/icbd-blob && sync && "
                         "sha256sum /root/icbd-blob")
        assert rc == 0 and out, out
        written = out[0].split()[0]
        site.kill()
        time.sleep(DOWN)
        site.start()
        site.wait_ready()
        rc, out = vm.run("echo 3 > /proc/sys/vm/drop_caches; sha256sum /root/icbd-blob", 300)
        assert rc == 0 and out and out[0].split()[0] == written, (rc, out)
        rc, dmesg = vm.run("dmesg")
        assert not [ln for ln in dmesg if "I/O error" in ln or "EXT4-fs error" in ln]
        vm.send("systemctl poweroff\n")
        vm.proc.wait(180)
        # the client's view, read as the same client (127.0.0.1) within its linger
        view = tmp_path / "view.img"
        require("nbdcopy", "e2fsck")
        subprocess.run(["nbdcopy", f"nbd://127.0.0.1:{site.port}/lab@1", str(view)],
                       check=True, timeout=600)
        e2fsck = shutil.which("e2fsck") or "/usr/sbin/e2fsck"
        p = subprocess.run([e2fsck, "-fn", str(view)], capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stdout + p.stderr
    finally:
        site.close()
