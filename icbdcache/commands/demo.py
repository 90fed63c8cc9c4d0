"""``icbd-cache demo``: serve a small real disk image and read it back, end to end.

Builds (once, cached) a small real ext4 disk image, serves it with ``icbd-cache serve`` on
127.0.0.1, reads it back with real NBD clients (``nbdinfo``, then several ``nbdcopy`` at once),
checks every copy's sha256 against the file, and prints what it did.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from icbdcache.commands.options import Command, Option

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "icbd-cache"


#: Smallest and largest --size: mkfs.ext4 needs a few MiB; the image is built in ~/.cache.
MIN_SIZE, MAX_SIZE = 4 << 20, 64 << 30


def parse_size(text: str) -> int:
    """``128M``, ``1G``, ``4096`` -> bytes. Raises ValueError naming the accepted forms."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        n = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, OverflowError):
        raise ValueError(f"--size {text!r} is not a size: give bytes, or a number with K, M or "
                         "G (e.g. 128M, 1G)") from None
    if not MIN_SIZE <= n <= MAX_SIZE:
        raise ValueError(f"--size {text!r}: the demo image must be between 4M and 64G")
    return n


def demo_image(size: int) -> Path:
    """A small ext4 image with a few generated files, made with ``mkfs.ext4 -d`` (e2fsprogs)
    and cached under ~/.cache/icbd-cache. Raises RuntimeError if mkfs.ext4 is missing."""
    path = CACHE / f"demo-{size}.ext4"
    if path.exists():
        return path
    mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
    if not os.path.exists(mkfs):
        raise RuntimeError("mkfs.ext4 not found (Debian package e2fsprogs)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tree:
        root = Path(tree)
        (root / "etc").mkdir()
        (root / "etc" / "hostname").write_text("icbd-demo\n")
        (root / "README").write_text("An iMI served by icbd-cache over NBD.\n")
        data = root / "data"
        data.mkdir()
        seed = hashlib.sha256(b"icbd-demo").digest()
        for i in range(min(24, size // (4 << 20))):
            block = hashlib.sha256(seed + i.to_bytes(4, "big")).digest() * 32768  # 1 MiB
            (data / f"blob{i:02d}.bin").write_bytes(block)
        tmp = path.with_suffix(".tmp")
        subprocess.run(
            [mkfs, "-q", "-F", "-L", "icbd-demo", "-E", "root_owner=0:0", "-d", str(root),
             "-U", "5d7e1c2a-0000-4000-8000-1cbd00000001", str(tmp), f"{size // 1024}K"],
            check=True, stdout=subprocess.DEVNULL,
            env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
        )
        tmp.rename(path)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("icbd-cache serve exited at start")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("icbd-cache serve did not start listening")


def run_demo(size_text: str, image: str | None, clients: int) -> int:
    """Run the demo; return the exit status (0 when every checksum matched)."""
    if clients < 1:
        print(f"demo: --clients {clients}: at least 1", file=sys.stderr)
        return 2
    size_bytes = 0
    if image is not None:
        if not os.path.isfile(image):
            what = "not a file" if os.path.exists(image) else "no such file"
            print(f"demo: --image {image}: {what}", file=sys.stderr)
            return 2
        if not os.access(image, os.R_OK):
            print(f"demo: --image {image}: not readable", file=sys.stderr)
            return 2
        if os.path.getsize(image) == 0:
            print(f"demo: --image {image}: empty file", file=sys.stderr)
            return 2
    else:
        try:
            size_bytes = parse_size(size_text)
        except ValueError as e:
            print(f"demo: {e}", file=sys.stderr)
            return 2
    for tool in ("nbdinfo", "nbdcopy"):
        if shutil.which(tool) is None:
            print(f"demo: {tool} is missing (Debian package libnbd-bin; run scripts/setup)",
                  file=sys.stderr)
            return 2
    try:
        path = Path(image).resolve() if image else demo_image(size_bytes)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"demo: cannot make the image: {e}", file=sys.stderr)
        return 2
    want = _sha256(path)
    size = path.stat().st_size
    print(f"image   {path} ({size / 2**20:.0f} MiB, sha256 {want[:16]}...)")
    port = _free_port()
    serve_args = ["serve", "-q", "--listen", f"127.0.0.1:{port}", "--export", f"demo={path}"]
    # run as this interpreter's module (no PATH needed); shown as a user would type it
    cmd = [sys.executable, "-m", "icbdcache.cli", *serve_args]
    print(f"serve   {shlex.join(['icbd-cache', *serve_args])}")
    server = subprocess.Popen(cmd)
    ok = True
    try:
        _wait_port(port, server)
        uri = f"nbd://127.0.0.1:{port}/demo"
        info = subprocess.run(["nbdinfo", uri], capture_output=True, text=True, check=True)
        for line in info.stdout.splitlines():
            if any(k in line for k in ("export-size", "description", "is_read_only",
                                        "can_multi_conn", "block_size_maximum")):
                print(f"nbdinfo {line.strip()}")
        with tempfile.TemporaryDirectory() as out:
            t0 = time.monotonic()
            procs = [subprocess.Popen(["nbdcopy", uri, f"{out}/copy{i}.img"])
                     for i in range(clients)]
            codes = [p.wait() for p in procs]
            elapsed = time.monotonic() - t0
            for i, code in enumerate(codes):
                got = _sha256(Path(f"{out}/copy{i}.img")) if code == 0 else "(failed)"
                match = got == want
                ok &= match
                print(f"nbdcopy client {i + 1}: sha256 {got[:16]}... "
                      f"{'matches' if match else 'DIFFERS'}")
            mib = clients * size / 2**20
            print(f"read    {mib:.0f} MiB by {clients} clients at once in {elapsed:.2f} s "
                  f"({mib / elapsed:.0f} MiB/s)")
    except RuntimeError as e:
        print(f"demo: {e}", file=sys.stderr)
        ok = False
    except subprocess.CalledProcessError as e:
        print(f"demo: {e.cmd[0]} failed: {(e.stderr or '').strip()}", file=sys.stderr)
        ok = False
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
    print("demo: OK, every client read the image exactly" if ok else "demo: FAILED")
    return 0 if ok else 1


DEMO = Command(
    "demo", "make a small real disk image, serve it, read it back with nbdcopy",
    textwrap.fill(
        "Builds a small ext4 disk image (once, kept in ~/.cache/icbd-cache), serves it with "
        "'icbd-cache serve' on 127.0.0.1, reads it back with real NBD clients (nbdinfo, then "
        "several nbdcopy at once) and checks each copy's sha256. Needs mkfs.ext4, nbdinfo and "
        "nbdcopy (scripts/setup installs them).", 78),
    "examples:\n  icbd-cache demo\n  icbd-cache demo --size 256M --clients 8\n"
    "  icbd-cache demo --image /srv/imi/lab-7.img\n  icbd-cache demo --boot",
    (Option("size", default="128M", metavar="SIZE",
            help="image size: bytes, or a number with K, M or G (default 128M)"),
     Option("image", metavar="FILE", help="serve this raw image instead of building one"),
     Option("clients", "int", default=4, metavar="N",
            help="parallel nbdcopy readers (default 4)"),
     Option("boot", "bool", default=False,
            help="instead, boot a real workstation: build the Debian test iMI "
                 "(scripts/build-test-imi: root, debootstrap), import it into a temporary "
                 "store, serve it with 'serve --store --pxe' and boot a QEMU guest from it "
                 "over iPXE and NBD (2 to 4 minutes the first time)")),
    doc="store.md")

#: The demo's table.
COMMANDS = (DEMO,)


def cmd_demo(args: Any) -> int:
    if args.boot:
        from icbdcache.commands.bootdemo import run_boot_demo

        return run_boot_demo()
    return run_demo(args.size, args.image, args.clients)


def register(sub: Any) -> None:
    """Add ``demo`` to ``sub`` (argparse subparsers)."""
    DEMO.add_parser(sub, cmd_demo)
