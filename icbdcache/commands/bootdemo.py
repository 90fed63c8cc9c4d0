"""``icbd-cache demo --boot``: boot a real diskless workstation from a site cache that faults
from its master, end to end.

1. builds (once; cached in ``~/.cache/icbd-cache/imi``) the Debian test iMI with
   ``scripts/build-test-imi`` (root, debootstrap, the host's apt mirror);
2. publishes it on a master as ``lab@1`` (``icbd-cache publish``, which keeps its kernel and
   initrd; ``icbd-cache master``), as ``icbd-cache demo`` does with its small image;
3. starts a site with an empty store, ``icbd-cache serve --master URL --site demo-site
   --subscribe lab --on-demand --pxe`` on 127.0.0.1 (free high ports): NBD, TFTP and HTTP in
   one process; it takes lab@1's manifest, kernel and initrd from the master, and faults each
   chunk of the image from the master when the workstation first reads it;
4. boots one QEMU workstation under TCG with QEMU's user network, where the host's 127.0.0.1 is
   10.0.2.2: the e1000 NIC's iPXE ROM fetches ``boot.ipxe``, the kernel and the initrd over
   HTTP; the initramfs attaches its root over NBD; systemd reaches multi-user and the image's
   ``icbd-boot-ok`` service prints ``ICBD-BOOT-OK`` on the serial console and powers off;
5. prints the export the workstation opened, from the site's log, then stops the site and
   prints what crossed from the master for the boot (``icbd-cache stats --json``).

Exit status 0 when the marker came, 1 when the boot failed, 2 when this machine cannot run it
(not root, debootstrap or QEMU missing, no clone of the repository).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from icbdcache.commands.demostack import (
    DemoError,
    PassCounts,
    Proc,
    free_port,
    mib,
    publish,
    read_stats,
    say,
    shown,
    site_args,
    start_master,
)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-test-imi"
QEMU = "qemu-system-x86_64"
#: The host's loopback as QEMU's user network shows it to the guest.
HOST_FROM_GUEST = "10.0.2.2"
GUEST_APPEND = "console=ttyS0,115200 no_timer_check panic=-1 quiet loglevel=3"
GUEST_MAC = "52:54:00:1c:bd:d0"
MARKER_RX = re.compile(r"ICBD-BOOT-OK (\S+) nbdroot=(\S+) release=(\S+)")
CONN_RX = re.compile(r"conn=\d+ peer=(\S+) export=(\S+).*")
HTTP_RX = re.compile(r"event=http .*method=GET path=/(\S+) status=200 bytes=(\d+)")
BOOT_TIMEOUT = 300.0


def _fail(text: str, code: int) -> int:
    print(f"demo --boot: {text}", file=sys.stderr, flush=True)
    return code


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _ipxe_rom() -> bool:
    """QEMU's e1000 option ROM (iPXE; Debian package ipxe-qemu) is installed."""
    return bool(list(Path("/usr/share/qemu").glob("*e1000*.rom"))) or \
        Path("/usr/lib/ipxe/qemu/efi-e1000.rom").exists()


def preflight() -> str | None:
    """Why this machine cannot run the boot demo, or None."""
    if not BUILD_SCRIPT.is_file():
        return f"{BUILD_SCRIPT} is missing: run it from a clone of the repository"
    if os.geteuid() != 0:
        return "needs root: debootstrap builds the test iMI (run as root or with sudo)"
    for tool, package in (("debootstrap", "debootstrap"), (QEMU, "qemu-system-x86"),
                          ("debugfs", "e2fsprogs")):
        if _which(tool) is None:
            return f"{tool} is missing (Debian package {package}; run scripts/setup)"
    if not _ipxe_rom():
        return "QEMU's iPXE ROM for the e1000 NIC is missing (Debian package ipxe-qemu)"
    return None


def build_image() -> Path | int:
    """scripts/build-test-imi's output directory, or an exit status after saying why."""
    say("image", "scripts/build-test-imi: the Debian test iMI (built once, about 2 minutes; "
                  "cached in ~/.cache/icbd-cache/imi)")
    t0 = time.monotonic()
    # its progress lines go to our stderr as they come; the directory is its last stdout line
    p = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if p.returncode == 77:
        return _fail("the test iMI cannot be built here (reason above)", 2)
    if p.returncode != 0 or not p.stdout.strip():
        return _fail(f"scripts/build-test-imi failed (exit {p.returncode})", 1)
    out = Path(p.stdout.strip().splitlines()[-1])
    elapsed = time.monotonic() - t0
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        files = manifest["files"]["imi.ext4"]
        what = (f"{files['bytes'] / 2**20:.0f} MiB, {files['allocated_bytes'] / 2**20:.0f} MiB "
                f"allocated, Debian {manifest['suite']}, kernel {manifest['kernel_version']}")
    except (OSError, ValueError, KeyError):
        what = "no manifest"
    how = f"built in {elapsed:.0f} s" if elapsed > 5 else "cached"
    say("image", f"{out / 'imi.ext4'} ({what}; {how})")
    return out


class Console:
    """QEMU's serial console, read line by line by a thread."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._read, args=(log,), daemon=True)
        self.thread.start()

    def _read(self, log: Path) -> None:
        assert self.proc.stdout is not None
        with open(log, "w") as f:
            for raw in iter(self.proc.stdout.readline, b""):
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.lines.append((time.monotonic(), line))
                f.write(line + "\n")

    def tail(self, n: int = 25) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
          timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_boot_demo(keep: bool = False) -> int:
    """Run the boot demo; return the exit status. ``keep``: leave the temporary directory
    (the stores, the logs, the console) and say where."""
    why = preflight()
    if why is not None:
        return _fail(why, 2)
    t_start = time.monotonic()
    built = build_image()
    if isinstance(built, int):
        return built
    image = built / "imi.ext4"
    tmp = Path(tempfile.mkdtemp(prefix="icbd-boot-demo-"))
    try:
        return _publish_and_boot(image, tmp, t_start)
    except DemoError as e:
        return _fail(str(e), 1)
    finally:
        if keep:
            say("kept", f"{tmp}: the stores master/ and site/, master.log, site.log, "
                        "console.log, stats-site.json, stats-master.json")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_and_boot(image: Path, tmp: Path, t_start: float) -> int:
    """Publish ``image`` on a master, serve it from a site, boot a workstation from the
    site. Raises DemoError when a process fails to start."""
    for line in publish(image, tmp / "master", "lab").splitlines():
        say("", line)
    master, url = start_master(tmp / "master", tmp)
    try:
        code = _serve_and_boot(url, tmp, t_start)
    finally:
        master.stop()
    if code == 0:
        _counts(tmp)
    return code


def _serve_and_boot(master_url: str, tmp: Path, t_start: float) -> int:
    nbd_port, http_port, tftp_port = free_port(), free_port(), free_port(socket.SOCK_DGRAM)
    site_store = tmp / "site"
    serve_args = [*site_args(site_store, nbd_port, master_url, "lab"),
                  "--pxe", "--pxe-nbd-host", HOST_FROM_GUEST, "--pxe-http-port", str(http_port),
                  "--pxe-tftp-port", str(tftp_port), "--pxe-menu-timeout", "0",
                  "--pxe-append", GUEST_APPEND]
    say("site", shown(serve_args))
    say("", f"an empty store: it takes lab@1's manifest, kernel and initrd from the master, "
            f"and faults each chunk from it when the workstation first reads it; NBD "
            f"127.0.0.1:{nbd_port}, HTTP :{http_port}, TFTP :{tftp_port}, one process; boot "
            f"configs name the NBD server {HOST_FROM_GUEST}:{nbd_port}, the host as QEMU's "
            "user network shows it to the guest")
    site = Proc(serve_args, tmp / "site.log")
    server_log = site.log
    qemu: subprocess.Popen[bytes] | None = None
    try:
        if not _wait_boot_menu(http_port, site.popen, "lab@1"):
            print(site.tail(30), file=sys.stderr)
            return _fail("the site did not offer lab@1 over HTTP (boot.ipxe)", 1)

        url = f"http://{HOST_FROM_GUEST}:{http_port}/boot.ipxe"
        qemu_cmd = [QEMU, "-name", "icbd-demo", "-accel", "tcg,tb-size=128", "-cpu", "qemu64",
                    "-smp", "1", "-m", "320", "-nodefaults", "-no-user-config", "-display",
                    "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                    "-netdev", f"user,id=n0,bootfile={url}",
                    "-device", f"e1000,netdev=n0,mac={GUEST_MAC}", "-boot", "n"]
        say("boot", f"{QEMU} under TCG, e1000 NIC with QEMU's iPXE ROM, DHCP bootfile {url}")
        qemu = subprocess.Popen(qemu_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        console = Console(qemu, tmp / "console.log")
        found = _watch(console, qemu, server_log, time.monotonic())
        if found is None:
            print(f"--- console (last lines):\n{console.tail()}\n--- site log (last lines):\n"
                  + site.tail(15), file=sys.stderr)
            return _fail(f"no ICBD-BOOT-OK on the console (qemu exit status {qemu.poll()})", 1)
        exports = [(m.group(2), m.group(0)) for ln in
                   server_log.read_text(errors="replace").splitlines()
                   if (m := CONN_RX.search(ln))]
        names = sorted({name for name, _ in exports})
        say("export", f"the workstation opened {', '.join(names) or '(none logged)'} "
                      f"({len(exports)} NBD connection{'s' if len(exports) != 1 else ''}); "
                      "site log:")
        for _, line in exports:
            say("", line)
        try:
            qemu.wait(60)  # icbd-boot-ok powers the guest off
            say("done", f"the workstation powered off; {time.monotonic() - t_start:.0f} s in "
                        "all")
        except subprocess.TimeoutExpired:
            say("done", f"{time.monotonic() - t_start:.0f} s in all (stopping the guest)")
        return 0
    finally:
        _stop(qemu, signal.SIGTERM, 10)
        site.stop()


def _counts(tmp: Path) -> None:
    """Print what crossed from the master for the boot, from the stopped site's and master's
    stats (``stats-site.json``, ``stats-master.json`` in ``tmp``)."""
    try:
        site, master = read_stats(tmp / "site"), read_stats(tmp / "master")
    except DemoError as e:
        say("counts", f"cannot read the counters: {e}")
        return
    for name, stats in (("site", site), ("master", master)):
        (tmp / f"stats-{name}.json").write_text(json.dumps(stats, indent=2) + "\n")
    c = PassCounts.between({}, site)
    say("counts", f"the boot faulted {c.faults} chunks from the master ({mib(c.from_master)}; "
                  f"the master's own count: {master.get('master_chunks_sent', 0)} chunks "
                  f"sent), {c.coalesced} reads joined a fault in flight; hits: hot set "
                  f"{c.hits_hot}, queue {c.hits_queued}, LMDB {c.hits_lmdb} (icbd-cache stats "
                  "--json of the site and the master)")


def _wait_boot_menu(port: int, proc: subprocess.Popen[bytes], key: str,
                    timeout: float = 120) -> bool:
    """Wait until the site's ``boot.ipxe`` (HTTP on ``port``) names ``key``: the site has the
    version's manifest and boot files from the master."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/boot.ipxe",
                                        timeout=2) as r:
                if key in r.read().decode(errors="replace"):
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _watch(console: Console, qemu: subprocess.Popen[bytes], server_log: Path,
           t0: float) -> re.Match[str] | None:
    """Print the boot's milestones (from the server's log and the console) until the boot
    marker; return it, or None on timeout or when QEMU exits first."""
    seen: set[str] = set()

    def note(key: str, text: str) -> None:
        if key not in seen:
            seen.add(key)
            say("", f"{time.monotonic() - t0:6.1f} s  {text}")

    deadline = t0 + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        for _, line in list(console.lines):
            m = MARKER_RX.search(line)
            if m:
                note("marker", f"ICBD-BOOT-OK on the serial console: multi-user reached "
                               f"(guest uptime {m.group(1)} s, nbdroot={m.group(2)}, "
                               f"release={m.group(3)})")
                say("boot", f"boot marker after {time.monotonic() - t0:.1f} s")
                return m
        for line in server_log.read_text(errors="replace").splitlines():
            h = HTTP_RX.search(line)
            if h:
                path, size = h.group(1), int(h.group(2))
                kind = ("iPXE script" if path.endswith(".ipxe") else "kernel"
                        if path.endswith("vmlinuz") else "initrd" if "initrd" in path else "file")
                note(f"http {path}", f"HTTP  {kind} /{path} ({size / 2**20:.1f} MiB)"
                     if size > 1 << 20 else f"HTTP  {kind} /{path} ({size} bytes)")
            c = CONN_RX.search(line)
            if c:
                note(f"nbd {c.group(2)}", f"NBD   the initramfs attached its root: export "
                                          f"{c.group(2)} (from {c.group(1)})")
        if qemu.poll() is not None and not console.thread.is_alive():
            return None
        time.sleep(0.3)
    return None
