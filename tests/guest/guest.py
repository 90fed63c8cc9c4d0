"""A tiny QEMU test guest that exercises the Linux kernel's NBD client against a host server.

The guest is the host's Debian kernel (``/boot/vmlinuz-*``, package linux-image-amd64) plus an
initramfs assembled here: busybox-static, Debian's ``nbd-client`` with its shared libraries,
icbd-cache's reconnecting ``icbd-nbd-client`` (pxe/initramfs/, compiled here when gcc is
installed), the ``nbd`` and ``e1000`` modules with their dependencies, and ``init.sh`` as
``/init``. It runs under
TCG (``/dev/kvm`` on these machines is a software virtualizer a stock kernel cannot use) with
QEMU user networking, where the host's loopback is 10.0.2.2; the guest talks to nothing else.

The build is reproducible (sorted cpio entries, zero timestamps, no compression) and cached under
``${XDG_CACHE_HOME:-~/.cache}/icbd-cache/guest/<key>/``, the key being a hash of every input's
bytes, so a new kernel, nbd-client, busybox or init script builds a new image.

Usage from tests::

    img = build_guest()                       # raises GuestUnavailable when it cannot be built
    res = run_guest(port, "disk", "checksum")  # boots, parses ICBD-* lines from the console
    assert res.done and res.sha256 == ...

By hand: ``python tests/guest/guest.py build`` or
``python tests/guest/guest.py run --port P --export NAME --test checksum``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"

# Part of the cache key, as is this file's own text: any change to the builder rebuilds.
FORMAT_VERSION = 1

#: The guest's view of the host (QEMU user networking maps it to the host's 127.0.0.1).
HOST_FROM_GUEST = "10.0.2.2"
#: Kernel modules the guest loads (plus their dependencies from modules.dep).
MODULES = ("nbd", "e1000")
#: The tests the guest's /init knows (see init.sh).
TESTS = ("checksum", "cow", "multiconn", "cow-multiconn", "reconnect", "idle-persist",
         "idle-icbd")

#: Where the cow test writes its pattern, and how much (must match init.sh).
COW_OFFSET = 4 << 20
COW_LENGTH = 1 << 20

QEMU = "qemu-system-x86_64"


class GuestUnavailable(Exception):
    """The test guest cannot be built or booted on this machine (a reason to skip, not fail)."""


def cow_pattern() -> bytes:
    """The bytes the cow test writes at COW_OFFSET: ``yes ICBD | head -c 1048576``."""
    line = b"ICBD\n"
    return (line * (COW_LENGTH // len(line) + 1))[:COW_LENGTH]


# ---------------------------------------------------------------------------------------------
# building


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs in the cache directory."""

    kernel: Path
    initrd: Path
    kernel_version: str
    key: str
    #: Whether /bin/icbd-nbd-client is in the initramfs (the reconnect test needs it).
    client: bool = False

    @property
    def directory(self) -> Path:
        return self.kernel.parent


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "icbd-cache" / "guest"


def _version_key(v: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~]", v)]


def find_kernel(
    boot: Path = Path("/boot"), modroot: Path = Path("/lib/modules")
) -> tuple[Path, str]:
    """The newest ``/boot/vmlinuz-VER`` that has ``/lib/modules/VER/modules.dep``.

    ``ICBD_GUEST_KVER`` picks a version explicitly.
    """
    want = os.environ.get("ICBD_GUEST_KVER")
    found: list[tuple[str, Path]] = []
    for k in boot.glob("vmlinuz-*"):
        ver = k.name.removeprefix("vmlinuz-")
        if (modroot / ver / "modules.dep").is_file() and (want is None or ver == want):
            found.append((ver, k))
    if not found:
        what = f"version {want}" if want else "any version"
        raise GuestUnavailable(
            "no kernel for the test guest: need /boot/vmlinuz-VER and "
            f"/lib/modules/VER/modules.dep ({what}); install linux-image-amd64 (scripts/setup does)"
        )
    ver, path = max(found, key=lambda t: _version_key(t[0]))
    if not os.access(path, os.R_OK):
        raise GuestUnavailable(f"{path} is not readable (Debian kernels are 0600 for non-root)")
    return path, ver


def module_closure(moddir: Path, names: Iterable[str]) -> list[str]:
    """Paths (relative to moddir) of the named modules and their dependencies, deps first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        base = Path(mod).name.split(".ko")[0]
        by_name[base.replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in order or mod in stack:
            return
        for d in deps.get(mod, []):
            visit(d, (*stack, mod))
        order.append(mod)

    for n in names:
        found = by_name.get(n.replace("-", "_"))
        if found is None:
            builtin = moddir / "modules.builtin"
            if builtin.is_file() and any(
                Path(b).name.split(".ko")[0] == n for b in builtin.read_text().split()
            ):
                continue  # built into the kernel: nothing to load
            raise GuestUnavailable(f"kernel module {n} not found in {moddir}/modules.dep")
        visit(found, ())
    return order


def _module_bytes(path: Path) -> bytes:
    """A module's uncompressed bytes (busybox insmod cannot read .zst, and .xz only maybe)."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko"):
        return data
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise GuestUnavailable(f"{path} is zstd-compressed and zstd is not installed")
        return subprocess.run(
            ["zstd", "-dc", str(path)], check=True, capture_output=True
        ).stdout
    raise GuestUnavailable(f"unknown module format: {path}")


def _which(name: str, extra: Sequence[str] = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")) -> Path:
    p = shutil.which(name) or shutil.which(name, path=os.pathsep.join(extra))
    if p is None:
        raise GuestUnavailable(f"{name} is not installed (scripts/setup installs it)")
    return Path(p)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries (and the dynamic loader) a binary needs, as ldd reports them."""
    out = subprocess.run(
        ["ldd", str(binary)], check=True, capture_output=True, text=True
    ).stdout
    libs: list[Path] = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
        elif "not found" in line:
            raise GuestUnavailable(f"ldd {binary}: {line.strip()}")
    return libs


@dataclass
class _Entry:
    path: str  # inside the initramfs, no leading slash
    mode: int  # full st_mode (type | permissions)
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class _Tree:
    """The initramfs contents, in memory."""

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}

    def dir(self, path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.entries:
                self.entries[p] = _Entry(p, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries[path] = _Entry(path, stat.S_IFREG | perm, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries[path] = _Entry(path, stat.S_IFLNK | 0o777, target.encode())

    def node(self, path: str, kind: int, major: int, minor: int, perm: int = 0o600) -> None:
        path = path.strip("/")
        self.dir(os.path.dirname(path))
        self.entries[path] = _Entry(path, kind | perm, rdev=(major, minor))

    def cpio(self) -> bytes:
        """A deterministic newc archive: sorted names, mtime 0, uid/gid 0, fixed inode numbers."""
        out = bytearray()

        def add(e: _Entry, ino: int) -> None:
            name = e.path.encode() + b"\0"
            fields = (
                ino, e.mode, 0, 0, 1, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0,
            )
            out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
            out.extend(name)
            out.extend(b"\0" * (-len(out) % 4))
            out.extend(e.data)
            out.extend(b"\0" * (-len(out) % 4))

        for ino, p in enumerate(sorted(self.entries), start=1):
            add(self.entries[p], ino)
        add(_Entry("TRAILER!!!", 0), 0)
        out.extend(b"\0" * (-len(out) % 512))
        return bytes(out)


def _client_binary() -> Path | None:
    """icbd-cache's reconnecting NBD client (pxe/initramfs/icbd-nbd-client.c), compiled once
    per source into the cache; None without a compiler (the reconnect test then skips)."""
    from pxe import initrd

    src = initrd.SOURCE.read_bytes()
    out = cache_root() / f"client-{hashlib.sha256(src).hexdigest()[:16]}" / "icbd-nbd-client"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        initrd.compile_client(tmp)
    except initrd.InitrdError:
        return None
    tmp.rename(out)
    return out


def _inputs() -> tuple[Path, str, dict[str, Path], list[str]]:
    """Locate everything the build needs; raise GuestUnavailable when something is missing."""
    kernel, kver = find_kernel()
    moddir = Path("/lib/modules") / kver
    mods = module_closure(moddir, MODULES)
    files: dict[str, Path] = {}
    busybox = Path("/bin/busybox")
    if not busybox.is_file():
        raise GuestUnavailable("/bin/busybox is missing (install busybox-static)")
    ldd = subprocess.run(["ldd", str(busybox)], capture_output=True, text=True)
    if ldd.returncode == 0 and "=>" in ldd.stdout:
        raise GuestUnavailable("/bin/busybox is not static (install busybox-static)")
    files["bin/busybox"] = busybox
    nbd_client = _which("nbd-client")
    files["bin/nbd-client"] = nbd_client
    for lib in shared_libraries(nbd_client):
        files[str(lib).lstrip("/")] = lib
    for m in mods:
        files["lib/modules/" + Path(m).name.split(".ko")[0] + ".ko"] = moddir / m
    client = _client_binary()
    if client is not None:
        files["bin/icbd-nbd-client"] = client
    return kernel, kver, files, mods


def build_guest(force: bool = False) -> GuestImage:
    """Build (or find in the cache) the test guest's kernel and initramfs."""
    kernel, kver, files, mods = _inputs()
    init = INIT_SCRIPT.read_bytes()
    load_order = "".join(Path(m).name.split(".ko")[0] + ".ko\n" for m in mods).encode()

    h = hashlib.sha256()
    h.update(b"icbd-guest-format %d\n" % FORMAT_VERSION)
    h.update(b"builder " + hashlib.sha256(Path(__file__).read_bytes()).hexdigest().encode() + b"\n")
    kernel_digest = hashlib.sha256(kernel.read_bytes()).hexdigest()
    h.update(f"kernel {kver} {kernel_digest}\n".encode())
    h.update(b"init " + hashlib.sha256(init).hexdigest().encode() + b"\n")
    h.update(b"order " + load_order)
    contents: dict[str, bytes] = {}
    for dest in sorted(files):
        src = files[dest]
        data = _module_bytes(src) if dest.startswith("lib/modules/") else src.read_bytes()
        contents[dest] = data
        h.update(b"file %s %s\n" % (dest.encode(), hashlib.sha256(data).hexdigest().encode()))
    key = h.hexdigest()[:20]

    root = cache_root()
    final = root / key
    image = GuestImage(final / "vmlinuz", final / "initrd.img", kver, key,
                       "bin/icbd-nbd-client" in files)
    if not force and (final / "manifest.json").is_file():
        return image

    tree = _Tree()
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "lib/modules"):
        tree.dir(d)
    tree.node("dev/console", stat.S_IFCHR, 5, 1)
    tree.node("dev/null", stat.S_IFCHR, 1, 3, 0o666)
    tree.file("init", init, 0o755)
    tree.file("lib/modules/load-order", load_order)
    for dest, data in contents.items():
        perm = 0o755 if dest.startswith("bin/") or ".so" in dest else 0o644
        tree.file(dest, data, perm)
    tree.symlink("bin/sh", "busybox")
    tree.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    tree.file("etc/group", b"root:x:0:\n")

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        shutil.copyfile(kernel, tmp / "vmlinuz")
        (tmp / "initrd.img").write_bytes(tree.cpio())
        manifest = {
            "key": key,
            "format": FORMAT_VERSION,
            "kernel": str(kernel),
            "kernel_version": kver,
            "modules": mods,
            "files": {d: str(files[d]) for d in sorted(files)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            # a concurrent build of the same key won the race: its result is identical
            if not (final / "manifest.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return image


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class StepResult:
    """What the guest reported for one test step."""

    index: int
    test: str
    export: str
    rc: int | None = None
    size: int | None = None
    sha256: str | None = None
    tcp_conns: int | None = None
    pattern_sha256: str | None = None
    cow_readback_live: str | None = None
    cow_readback: str | None = None
    #: (reconnect) "I/O error" lines in the kernel log, reconnections icbd-nbd-client logged
    io_errors: int | None = None
    reconnects: int | None = None
    #: (offset, length, sha256) of the slices the multiconn test read in parallel, one per CPU
    parts: list[tuple[int, int, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.errors


@dataclass
class GuestResult:
    """The parsed console of one guest boot."""

    steps: list[StepResult]
    done: bool
    console: str
    returncode: int | None
    timed_out: bool
    elapsed_s: float
    done_s: float | None = None  # host seconds from QEMU start to ICBD-TEST-DONE
    errors: list[str] = field(default_factory=list)  # ICBD-ERROR lines outside any step

    def step(self, test: str) -> StepResult:
        for s in self.steps:
            if s.test == test:
                return s
        raise KeyError(f"no step {test!r} in the guest's output\n{self.tail()}")

    @property
    def _first(self) -> StepResult:
        if not self.steps:
            return StepResult(0, "", "")
        return self.steps[0]

    @property
    def ok(self) -> bool:
        return self.done and not self.errors and bool(self.steps) and all(s.ok for s in self.steps)

    @property
    def sha256(self) -> str | None:
        return self._first.sha256

    @property
    def size(self) -> int | None:
        return self._first.size

    @property
    def cow_readback(self) -> str | None:
        return self._first.cow_readback

    @property
    def tcp_conns(self) -> int | None:
        return self._first.tcp_conns

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


_HEX = r"([0-9a-f]{64})"
_LINE_RX = re.compile(r"ICBD-([A-Z0-9-]+)(?: (.*))?$")


def parse_console(console: str) -> tuple[list[StepResult], bool, list[str]]:
    """Parse the ICBD-* lines of a guest console (markers may follow kernel text on a line)."""
    steps: list[StepResult] = []
    done = False
    loose: list[str] = []
    cur: StepResult | None = None
    for raw in console.splitlines():
        m = _LINE_RX.search(raw.replace("\r", ""))
        if not m:
            continue
        tag, arg = m.group(1), (m.group(2) or "").strip()
        words = arg.split()
        if tag == "STEP" and len(words) >= 2:
            cur = StepResult(int(words[0]), words[1], words[2] if len(words) > 2 else "")
            steps.append(cur)
        elif tag == "STEP-END" and cur is not None:
            rcm = re.search(r"rc=(\d+)", arg)
            cur.rc = int(rcm.group(1)) if rcm else None
            cur = None
        elif tag == "TEST-DONE":
            done = True
        elif tag == "ERROR":
            (cur.errors if cur is not None else loose).append(arg)
        elif cur is not None:
            if tag == "SIZE" and words and words[0].isdigit():
                cur.size = int(words[0])
            elif tag == "TCP-CONNS" and words and words[0].isdigit():
                cur.tcp_conns = int(words[0])
            elif tag == "IO-ERRORS" and words and words[0].isdigit():
                cur.io_errors = int(words[0])
            elif tag == "RECONNECTS" and words and words[0].isdigit():
                cur.reconnects = int(words[0])
            elif tag == "PART-SHA256" and len(words) == 3 and re.fullmatch(_HEX, words[2]):
                cur.parts.append((int(words[0]), int(words[1]), words[2]))
            elif tag in ("SHA256", "PATTERN-SHA256", "COW-READBACK-LIVE", "COW-READBACK"):
                hm = re.match(_HEX, arg)
                value = hm.group(1) if hm else None
                attr = {
                    "SHA256": "sha256",
                    "PATTERN-SHA256": "pattern_sha256",
                    "COW-READBACK-LIVE": "cow_readback_live",
                    "COW-READBACK": "cow_readback",
                }[tag]
                setattr(cur, attr, value)
    return steps, done, loose


def _check_name(name: str, what: str, forbidden: str = "") -> None:
    if not name or any(c.isspace() or c in "\"'\\" + forbidden for c in name):
        raise ValueError(f"{what} {name!r} cannot be passed on the kernel command line")


def qemu_command(
    image: GuestImage, append: str, *, cpus: int = 1, memory_mib: int = 256, tb_size_mib: int = 64
) -> list[str]:
    """The QEMU command line for one guest; its serial console goes to stdout."""
    return [
        QEMU,
        "-accel", f"tcg,tb-size={tb_size_mib}",
        "-cpu", "qemu64",
        "-smp", str(cpus),
        "-m", str(memory_mib),
        "-nodefaults", "-no-user-config",
        "-display", "none", "-monitor", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-netdev", "user,id=n0",
        "-device", "e1000,netdev=n0,romfile=",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", append,
    ]


def run_guest_steps(
    port: int,
    steps: Sequence[tuple[str, str]],
    timeout: float = 240.0,
    *,
    connections: int = 4,
    cpus: int | None = None,
    log_path: Path | None = None,
    verbose: bool = False,
    image: GuestImage | None = None,
    on_line: Callable[[str], None] | None = None,
) -> GuestResult:
    """Boot the guest once and run ``steps`` (test, export) in order against
    10.0.2.2:``port`` (the host's 127.0.0.1:``port``).

    ``cpus`` defaults to 2 when a step uses several connections (the kernel's nbd driver sends
    a CPU's requests on "its" connection, so one CPU would use only the first), else 1.
    ``on_line`` is called with each console line as it arrives (the host's side of a test).
    """
    if shutil.which(QEMU) is None:
        raise GuestUnavailable(f"{QEMU} is not installed (package qemu-system-x86)")
    if not steps:
        raise ValueError("no steps")
    for test, export in steps:
        if test not in TESTS:
            raise ValueError(f"unknown guest test {test!r} (known: {', '.join(TESTS)})")
        _check_name(export, "export name", ",:" if len(steps) > 1 else "")
    image = image or build_guest()
    args = [
        "console=ttyS0,115200",
        "panic=-1",
        "no_timer_check",
        "8250.nr_uarts=1",
        f"icbd.server={HOST_FROM_GUEST}",
        f"icbd.port={int(port)}",
        f"icbd.connections={int(connections)}",
    ]
    if not verbose:
        args += ["quiet", "loglevel=3"]
    if len(steps) == 1:
        args += [f"icbd.test={steps[0][0]}", f"icbd.export={steps[0][1]}"]
    else:
        args.append("icbd.steps=" + ",".join(f"{t}:{e}" for t, e in steps))
    if cpus is None:
        cpus = 2 if any(t.endswith("multiconn") for t, _ in steps) else 1
    cmd = qemu_command(image, " ".join(args), cpus=cpus)

    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    timed_out = False
    done_s: float | None = None
    chunks: list[bytes] = []
    log = open(log_path, "wb") if log_path else None  # noqa: SIM115 - closed in finally
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        pending = b""
        while True:
            left = t0 + timeout - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            t = time.monotonic() - t0
            chunks.append(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for ln in lines:
                if log:
                    log.write(b"%8.3f %s\n" % (t, ln.rstrip(b"\r")))
                if done_s is None and b"ICBD-TEST-DONE" in ln:
                    done_s = round(t, 3)
                if on_line is not None:
                    on_line(ln.decode(errors="replace").rstrip("\r"))
            if log:
                log.flush()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        if log:
            log.close()
    console = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
    parsed, done, loose = parse_console(console)
    return GuestResult(
        steps=parsed,
        done=done,
        console=console,
        returncode=proc.returncode,
        timed_out=timed_out,
        elapsed_s=round(time.monotonic() - t0, 3),
        done_s=done_s,
        errors=loose,
    )


def run_guest(
    port: int,
    export: str,
    test: str,
    timeout: float = 240.0,
    *,
    connections: int = 4,
    cpus: int | None = None,
    log_path: Path | None = None,
    verbose: bool = False,
    image: GuestImage | None = None,
) -> GuestResult:
    """Boot the guest once and run one test (checksum | cow | multiconn | cow-multiconn) against
    ``export`` on the host's 127.0.0.1:``port``; see :func:`run_guest_steps`."""
    return run_guest_steps(
        port, [(test, export)], timeout, connections=connections, cpus=cpus,
        log_path=log_path, verbose=verbose, image=image,
    )


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the guest and print where it is")
    b.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="boot the guest against a server on 127.0.0.1:PORT")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--export", default="")
    r.add_argument("--test", choices=TESTS, default="checksum")
    r.add_argument("--steps", default="", help="TEST:EXPORT,... (several tests in one boot)")
    r.add_argument("--connections", type=int, default=4)
    r.add_argument("--cpus", type=int, default=None)
    r.add_argument("--timeout", type=float, default=240.0)
    r.add_argument("--log", type=Path)
    r.add_argument("-v", "--verbose", action="store_true", help="kernel messages on the console")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            t = time.monotonic()
            img = build_guest(force=a.force)
            print(json.dumps({**asdict(img), "kernel": str(img.kernel), "initrd": str(img.initrd),
                              "seconds": round(time.monotonic() - t, 2)}))
            return 0
        steps: list[tuple[str, str]] = [(a.test, a.export)]
        if a.steps:
            steps = [(t, e) for t, _, e in (s.partition(":") for s in a.steps.split(","))]
        res = run_guest_steps(
            a.port, steps, a.timeout, connections=a.connections, cpus=a.cpus,
            log_path=a.log, verbose=a.verbose,
        )
    except GuestUnavailable as e:
        print(f"guest unavailable: {e}", file=sys.stderr)
        return 77
    sys.stdout.write(res.console)
    summary = {k: v for k, v in asdict(res).items() if k != "console"}
    print("RESULT " + json.dumps(summary))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
