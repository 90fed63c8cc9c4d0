"""Real diskless workstations: QEMU guests that network-boot the project's test iMI.

Shared by the PXE tests (``tests/pxeboot/test_pxe.py``) and ``icbd-bench bootstorm --driver vm``
(``bench/vmdriver.py``).

- The test iMI is ``scripts/build-test-imi``'s Debian image (built once, cached in
  ``~/.cache/icbd-cache/imi``): its initramfs attaches ``root=/dev/nbd0 nbdroot=HOST:PORT/EXPORT``,
  ``icbd.overlay=tmpfs`` keeps a read-only NBD root under a tmpfs overlay, and at multi-user its
  ``icbd-boot-ok`` unit prints ``ICBD-BOOT-OK <uptime s> nbdroot=... release=...`` on ttyS0 and
  powers the machine off (:data:`MARKER_RX`).
- A guest is ``qemu-system-x86_64`` with one e1000 NIC whose iPXE ROM boots the DHCP bootfile of
  QEMU's user network (where the host's 127.0.0.1 is 10.0.2.2), its serial console on stdout,
  read line by line by a thread that stamps each line with the host's monotonic clock.
- With ``interactive=True`` the serial console also takes input: :meth:`Vm.login` logs in
  as root (the test iMI's root has no password; boot it with ``icbd.halt=none``) and
  :meth:`Vm.run` runs a shell command and returns its exit status and output lines.
- Acceleration: KVM only where it is usable (:func:`kvm_usable`: a CPU with VMX/SVM and the
  kvm_intel or kvm_amd module; ``/dev/kvm`` alone is not enough: on some machines it is a
  software virtualizer, kvm_pvm, under which a stock kernel crawls), else TCG with
  ``-cpu qemu64`` and a 128 MiB translation cache.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-test-imi"
QEMU = "qemu-system-x86_64"
#: The host's loopback as QEMU's user network shows it to the guest.
HOST_FROM_GUEST = "10.0.2.2"
#: Kernel arguments every benchmark/test guest gets besides the boot config's own:
#: serial console, no timer check and reboot-on-panic (starved TCG guests otherwise may panic
#: in the IO-APIC timer check), a quiet console.
GUEST_APPEND = "console=ttyS0,115200 no_timer_check panic=-1 quiet loglevel=3"
#: The boot marker: guest uptime (s), the nbdroot it booted, the image's release word.
MARKER_RX = re.compile(r"ICBD-BOOT-OK (\S+) nbdroot=(\S+) release=(\S+)")
#: ``icbd.linger=N``'s second marker: uptime (s) and the release read again over NBD.
LINGER_RX = re.compile(r"ICBD-LINGER-OK (\S+) release=(\S+)")
#: Guest RAM, MiB (QEMU's RSS is about 1.5x this with the 128 MiB TCG cache).
DEFAULT_MEM_MIB = 320


class Unavailable(RuntimeError):
    """This machine cannot run guests (the message says why): a reason to skip, not a
    failure."""


class BootTimeout(AssertionError):
    """A guest's console did not show the awaited line in time (or QEMU exited first); the
    message carries the console's tail. An AssertionError so that a test fails with it."""


def ipxe_rom_present() -> bool:
    """QEMU's e1000 option ROM (iPXE; Debian package ipxe-qemu) is installed."""
    return bool(list(Path("/usr/share/qemu").glob("*e1000*.rom"))) or \
        Path("/usr/lib/ipxe/qemu/efi-e1000.rom").exists()


def kvm_usable() -> tuple[bool, str]:
    """Whether guests can use KVM here, and why (not). Usable means: ``/dev/kvm`` opens
    read-write, the CPU advertises VMX or SVM, and the hardware module (kvm_intel or kvm_amd)
    is loaded. A ``/dev/kvm`` served by a software virtualizer (kvm_pvm) is not usable: a stock
    Debian kernel crawls or fails under it."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as e:
        return False, f"/dev/kvm: {e.strerror}"
    os.close(fd)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
        pvm = " (kvm_pvm, a software virtualizer)" if Path("/sys/module/kvm_pvm").exists() \
            else ""
        return False, f"/dev/kvm exists{pvm} but the CPU has no VMX/SVM"
    if not (Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()):
        return False, "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded"
    return True, "kvm_intel/kvm_amd with VMX/SVM"


def accel_args(kvm: bool | None = None) -> tuple[list[str], str]:
    """QEMU's acceleration arguments and a label (``kvm`` or ``tcg``); ``kvm=None``: detect."""
    if kvm is None:
        kvm = kvm_usable()[0]
    if kvm:
        return ["-accel", "kvm", "-cpu", "host"], "kvm"
    return ["-accel", "tcg,tb-size=128", "-cpu", "qemu64"], "tcg"


def build_test_imi(timeout: float = 900) -> Path:
    """scripts/build-test-imi's output directory (``imi.ext4``, ``vmlinuz``, ``initrd.img``,
    ``manifest.json``), built once and then cached. Raises :class:`Unavailable` when this
    machine cannot have it (not root, no debootstrap, QEMU or iPXE ROM, or the script's exit
    status 77), RuntimeError when the build failed."""
    import shutil

    if not BUILD_SCRIPT.is_file():
        raise Unavailable(f"{BUILD_SCRIPT} is missing")
    for tool in (QEMU, "debootstrap", "debugfs"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            raise Unavailable(f"{tool} is not installed")
    if os.geteuid() != 0:
        raise Unavailable("building the test iMI needs root (debootstrap)")
    if not ipxe_rom_present():
        raise Unavailable("no iPXE ROM for QEMU's e1000 (package ipxe-qemu)")
    p = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout,
                       check=False)
    if p.returncode == 77:
        lines = p.stderr.strip().splitlines() or ["(no reason given)"]
        raise Unavailable(f"test iMI unavailable: {lines[-1]}")
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f"scripts/build-test-imi failed ({p.returncode}):\n"
                           f"{p.stderr[-3000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


@dataclass
class Vm:
    """A QEMU workstation booting from the network; its console is collected by a thread.
    ``t0``: host monotonic time (s) just before QEMU was started; ``lines``: (monotonic time,
    text) of every console line."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    t0: float = field(default_factory=time.monotonic)
    lines: list[tuple[float, str]] = field(default_factory=list)
    thread: threading.Thread | None = None

    def _reader(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log, "w") as f:
            for raw in iter(self.proc.stdout.readline, b""):
                t = time.monotonic()
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.lines.append((t, line))
                f.write(f"{t - self.t0:8.3f} {line}\n")
                f.flush()

    def find(self, rx: re.Pattern[str]) -> tuple[float, re.Match[str]] | None:
        """(host monotonic time, match) of the first console line matching ``rx`` so far."""
        for t, line in list(self.lines):
            m = rx.search(line)
            if m:
                return t, m
        return None

    def finished(self) -> bool:
        """QEMU exited and its console was read to the end."""
        return self.proc.poll() is not None and (self.thread is None
                                                 or not self.thread.is_alive())

    def tail(self, n: int = 40) -> str:
        """The last ``n`` console lines."""
        return "\n".join(line for _, line in self.lines[-n:])

    def wait_for(self, rx: re.Pattern[str], timeout: float) -> tuple[float, re.Match[str]]:
        """(host time, match) of the first console line matching ``rx``; raises
        :class:`BootTimeout` with the console's tail after ``timeout`` seconds or if QEMU exits
        first."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(rx)
            if found is not None:
                return found
            if self.finished() or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        found = self.find(rx)
        if found is not None:
            return found
        raise BootTimeout(f"{self.name}: no {rx.pattern!r} after "
                          f"{time.monotonic() - self.t0:.0f} s (qemu rc={self.proc.poll()}); "
                          f"console tail:\n{self.tail()}")

    # ------------------------------------------------------------ serial console input

    _tags: itertools.count[int] = field(default_factory=lambda: itertools.count(1001))

    def send(self, text: str) -> None:
        """Type ``text`` on the serial console (needs ``boot_vm(..., interactive=True)``)."""
        if self.proc.stdin is None:
            raise RuntimeError(f"{self.name} was not booted with interactive=True")
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def _after(self, since: int, rx: re.Pattern[str]) -> re.Match[str] | None:
        for _, line in list(self.lines[since:]):
            m = rx.search(line)
            if m:
                return m
        return None

    def login(self, timeout: float = 120.0, user: str = "root") -> None:
        """Log in on the serial console's getty and get a quiet shell (no echo, no prompt,
        no line editing). Raises :class:`BootTimeout`. The probe's output is computed by
        the shell (``$((...))``), so the echo of what was typed never matches it."""
        deadline = time.monotonic() + timeout
        tag = next(self._tags)
        rx = re.compile(rf"ICBD-SHELL-{tag}\b")
        # the getty's banner ends with a line naming the tty; what is typed before is lost
        with contextlib.suppress(BootTimeout):
            self.wait_for(re.compile(r"\btty\w+\s*$"), min(60.0, timeout / 2))
        time.sleep(1.0)
        while time.monotonic() < deadline and not self.finished():
            since = len(self.lines)
            self.send(f"{user}\n")
            time.sleep(2.0)
            self.send(f"echo ICBD-SHELL-$(({tag}-1+1))\n")
            end = time.monotonic() + 8.0
            while time.monotonic() < end:
                if self._after(since, rx):
                    self.send("stty -echo; set +o emacs; set +o vi; PS1=; PS2=\n")
                    time.sleep(0.5)
                    return
                time.sleep(0.2)
        raise BootTimeout(f"{self.name}: no shell on the serial console after {timeout:.0f} s; "
                          f"console tail:\n{self.tail()}")

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, list[str]]:
        """Run ``command`` in the logged-in shell (:meth:`login`): its exit status and its
        output lines (stdout and stderr). Raises :class:`BootTimeout`."""
        tag = next(self._tags)
        out_rx = re.compile(rf"ICBD-OUT-{tag}: ?(.*)$")
        rc_rx = re.compile(rf"ICBD-RC-{tag}=(\d+)")
        since = len(self.lines)
        self.send(f"{{ {command} ; }} 2>&1 | sed -u \"s/^/ICBD-OUT-$(({tag}-1+1)): /\"; "
                  f"echo \"ICBD-RC-$(({tag}-1+1))=${{PIPESTATUS[0]}}\"\n")
        deadline = time.monotonic() + timeout
        while True:
            m = self._after(since, rc_rx)
            if m is not None:
                break
            if self.finished() or time.monotonic() > deadline:
                raise BootTimeout(f"{self.name}: {command!r} did not finish in {timeout:.0f} s;"
                                  f" console tail:\n{self.tail()}")
            time.sleep(0.1)
        out = [om.group(1) for _, line in list(self.lines[since:])
               if (om := out_rx.search(line))]
        return int(m.group(1)), out

    def stop(self) -> None:
        """Stop QEMU by its PID (SIGTERM, SIGKILL after 5 s); safe to call twice."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait()
        if self.thread is not None:
            self.thread.join(5)


def qemu_argv(name: str, bootfile: str, mac: str, *, mem_mib: int = DEFAULT_MEM_MIB,
              accel: Sequence[str] | None = None) -> list[str]:
    """The QEMU command line of one workstation: one vCPU, ``mem_mib`` MiB, an e1000 NIC with
    ``mac`` whose iPXE ROM boots ``bootfile`` (a ``tftp://`` or ``http://`` URL) from QEMU's
    user network, serial console on stdout, no display, no reboot (a panic ends QEMU)."""
    acc = list(accel) if accel is not None else accel_args()[0]
    return [QEMU, "-name", name, *acc, "-smp", "1", "-m", str(mem_mib), "-nodefaults",
            "-no-user-config", "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-no-reboot", "-netdev", f"user,id=n0,bootfile={bootfile}",
            "-device", f"e1000,netdev=n0,mac={mac}", "-boot", "n"]


def boot_vm(name: str, bootfile: str, mac: str, log: Path, *, mem_mib: int = DEFAULT_MEM_MIB,
            accel: Sequence[str] | None = None, prefix: Sequence[str] = (),
            interactive: bool = False) -> Vm:
    """Start a workstation (:func:`qemu_argv`) whose console goes to ``log``. ``prefix``: a
    command that execs QEMU (``ip netns exec NS``), so the PID is still QEMU's own.
    ``accel``: QEMU acceleration arguments (default: TCG as in the tests, which must not
    depend on the host's KVM). ``interactive``: the console takes input (:meth:`Vm.send`)."""
    acc = list(accel) if accel is not None else accel_args(kvm=False)[0]
    cmd = [*prefix, *qemu_argv(name, bootfile, mac, mem_mib=mem_mib, accel=acc)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    vm = Vm(name, proc, log, t0)
    vm.thread = threading.Thread(target=vm._reader, daemon=True)
    vm.thread.start()
    return vm


def guest_mac(index: int, prefix: str = "52:54:00:1c:be") -> str:
    """A locally administered MAC for guest ``index`` (0..255)."""
    return f"{prefix}:{index % 256:02x}"
