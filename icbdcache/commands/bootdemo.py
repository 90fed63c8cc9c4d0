"""``icbd-cache demo --boot``: boot a real diskless workstation from a served iMI, end to end.

1. builds (once; cached in ``~/.cache/icbd-cache/imi``) the Debian test iMI with
   ``scripts/build-test-imi`` (root, debootstrap, the host's apt mirror);
2. imports it into a temporary store (``icbd-cache import``, which keeps its kernel and initrd);
3. serves it with ``icbd-cache serve --store --pxe`` on 127.0.0.1 (free high ports): NBD, TFTP
   and HTTP in one process;
4. boots one QEMU workstation under TCG with QEMU's user network, where the host's 127.0.0.1 is
   10.0.2.2: the e1000 NIC's iPXE ROM fetches ``boot.ipxe``, the kernel and the initrd over
   HTTP; the initramfs attaches its root over NBD; systemd reaches multi-user and the image's
   ``icbd-boot-ok`` service prints ``ICBD-BOOT-OK`` on the serial console and powers off;
5. prints the export the workstation opened, from the server's log.

Exit status 0 when the marker came, 1 when the boot failed, 2 when this machine cannot run it
(not root, debootstrap or QEMU missing, no clone of the repository).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
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


def _say(tag: str, text: str) -> None:
    print(f"{tag:7} {text}", flush=True)


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


def _free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str) -> list[str]:
    """``icbd-cache ARGS`` as this interpreter's module (no PATH needed)."""
    return [sys.executable, "-m", "icbdcache.cli", *args]


def build_image() -> Path | int:
    """scripts/build-test-imi's output directory, or an exit status after saying why."""
    _say("image", "scripts/build-test-imi: the Debian test iMI (built once, about 2 minutes; "
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
    _say("image", f"{out / 'imi.ext4'} ({what}; {how})")
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


def run_boot_demo() -> int:
    """Run the boot demo; return the exit status."""
    why = preflight()
    if why is not None:
        return _fail(why, 2)
    t_start = time.monotonic()
    built = build_image()
    if isinstance(built, int):
        return built
    image = built / "imi.ext4"
    with tempfile.TemporaryDirectory(prefix="icbd-boot-demo-") as tmp:
        return _serve_and_boot(image, Path(tmp), t_start)


def _serve_and_boot(image: Path, tmp: Path, t_start: float) -> int:
    store = tmp / "store"
    import_args = ["import", str(image), "--imi", "lab", "--store", str(store)]
    _say("import", shlex.join(["icbd-cache", *import_args]))
    p = subprocess.run(_cli(*import_args), capture_output=True, text=True, check=False)
    # its stdout says what it did; of its log (stderr) only warnings and errors
    for line in p.stdout.splitlines() + [ln for ln in p.stderr.splitlines()
                                         if " INFO " not in ln]:
        _say("", line)
    if p.returncode != 0:
        return _fail("the import failed", 1)

    nbd_port, http_port, tftp_port = _free_port(), _free_port(), _free_port(socket.SOCK_DGRAM)
    serve_args = ["serve", "--store", str(store), "--listen", f"127.0.0.1:{nbd_port}", "--pxe",
                  "--pxe-nbd-host", HOST_FROM_GUEST, "--pxe-http-port", str(http_port),
                  "--pxe-tftp-port", str(tftp_port), "--pxe-menu-timeout", "0",
                  "--pxe-append", GUEST_APPEND]
    _say("serve", shlex.join(["icbd-cache", *serve_args]))
    _say("", f"NBD 127.0.0.1:{nbd_port}, HTTP :{http_port}, TFTP :{tftp_port}, one process; "
             f"boot configs name the NBD server {HOST_FROM_GUEST}:{nbd_port}, the host as "
             "QEMU's user network shows it to the guest")
    server_log = tmp / "serve.log"
    server: subprocess.Popen[bytes] | None = None
    qemu: subprocess.Popen[bytes] | None = None
    try:
        with open(server_log, "wb") as out:
            server = subprocess.Popen(_cli(*serve_args), stdout=out, stderr=subprocess.STDOUT)
        if not _wait_listening(http_port, server):
            print(server_log.read_text(errors="replace")[-3000:], file=sys.stderr)
            return _fail("icbd-cache serve --pxe did not start", 1)

        url = f"http://{HOST_FROM_GUEST}:{http_port}/boot.ipxe"
        qemu_cmd = [QEMU, "-name", "icbd-demo", "-accel", "tcg,tb-size=128", "-cpu", "qemu64",
                    "-smp", "1", "-m", "320", "-nodefaults", "-no-user-config", "-display",
                    "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                    "-netdev", f"user,id=n0,bootfile={url}",
                    "-device", f"e1000,netdev=n0,mac={GUEST_MAC}", "-boot", "n"]
        _say("boot", f"{QEMU} under TCG, e1000 NIC with QEMU's iPXE ROM, DHCP bootfile {url}")
        qemu = subprocess.Popen(qemu_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        console = Console(qemu, tmp / "console.log")
        found = _watch(console, qemu, server_log, time.monotonic())
        if found is None:
            print(f"--- console (last lines):\n{console.tail()}\n--- server log (last lines):\n"
                  + "\n".join(server_log.read_text(errors="replace").splitlines()[-15:]),
                  file=sys.stderr)
            return _fail(f"no ICBD-BOOT-OK on the console (qemu exit status {qemu.poll()})", 1)
        exports = [(m.group(2), m.group(0)) for ln in
                   server_log.read_text(errors="replace").splitlines()
                   if (m := CONN_RX.search(ln))]
        names = sorted({name for name, _ in exports})
        _say("export", f"the workstation opened {', '.join(names) or '(none logged)'} "
                       f"({len(exports)} NBD connection{'s' if len(exports) != 1 else ''}); "
                       "server log:")
        for _, line in exports:
            _say("", line)
        try:
            qemu.wait(60)  # icbd-boot-ok powers the guest off
            _say("done", f"the workstation powered off; {time.monotonic() - t_start:.0f} s in "
                         "all")
        except subprocess.TimeoutExpired:
            _say("done", f"{time.monotonic() - t_start:.0f} s in all (stopping the guest)")
        return 0
    finally:
        _stop(qemu, signal.SIGTERM, 10)
        _stop(server)


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    """Wait for ``serve --pxe``'s HTTP port (after the boot files are kept)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def _watch(console: Console, qemu: subprocess.Popen[bytes], server_log: Path,
           t0: float) -> re.Match[str] | None:
    """Print the boot's milestones (from the server's log and the console) until the boot
    marker; return it, or None on timeout or when QEMU exits first."""
    seen: set[str] = set()

    def note(key: str, text: str) -> None:
        if key not in seen:
            seen.add(key)
            _say("", f"{time.monotonic() - t0:6.1f} s  {text}")

    deadline = t0 + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        for _, line in list(console.lines):
            m = MARKER_RX.search(line)
            if m:
                note("marker", f"ICBD-BOOT-OK on the serial console: multi-user reached "
                               f"(guest uptime {m.group(1)} s, nbdroot={m.group(2)}, "
                               f"release={m.group(3)})")
                _say("boot", f"boot marker after {time.monotonic() - t0:.1f} s")
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
