"""icbd-cache's own initrd, loaded by workstations after their iMI's: the reconnecting NBD root.

Boot configs hand the kernel a second initrd (iPXE: a second ``initrd``; PXELINUX:
``INITRD IMI,icbd``); the kernel unpacks both archives into one initramfs, the later one
adding its files. This one adds two files to any initramfs-tools iMI without touching the
image:

==============================  ==================================================================
``usr/sbin/icbd-nbd-client``    ``pxe/initramfs/icbd-nbd-client.c``, compiled here with the
                                host's gcc (``-static``: it needs nothing from the iMI)
``conf/conf.d/icbd-reconnect``  sets ``NBDCLIENT`` for Debian's ``scripts/local-top/nbd``
                                (nbd-client's initramfs hook), which then runs our client
==============================  ==================================================================

The archive is a gzip-compressed newc cpio, deterministic (sorted names, mtime 0, root-owned),
built once per source, configuration snippet and compiler, and cached as
``DIR/reconnect-<key>.img``. See docs/pxe.md, "A restart of the server".
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from icbdcache.log import kv

log = logging.getLogger("pxe.initrd")

HERE = Path(__file__).resolve().parent / "initramfs"
#: The client's C source and the conf.d snippet that selects it.
SOURCE = HERE / "icbd-nbd-client.c"
CONF = HERE / "icbd-reconnect.conf"
#: Where the boot tree serves the archive (and ``pxe render`` writes it).
TREE_PATH = "icbd/reconnect.img"
#: Paths inside the archive.
CLIENT_PATH = "usr/sbin/icbd-nbd-client"
CONF_PATH = "conf/conf.d/icbd-reconnect"
#: Part of the cache key: a change to how the archive is made builds it again.
FORMAT = 1
CFLAGS = ("-static", "-Os", "-s", "-Wall", "-Wextra")


class InitrdError(Exception):
    """The archive cannot be built here (no compiler, no static C library, a compile error);
    the message says what."""


@dataclass(frozen=True)
class Built:
    """A built archive: its path and size in bytes."""

    path: Path
    size: int


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise InitrdError("no C compiler (install gcc and libc6-dev: the reconnecting NBD "
                          "client is compiled on this host)")
    return cc


def _compiler_id(cc: str) -> bytes:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise InitrdError(f"{cc} --version failed: {e}") from e
    return out.stdout.splitlines()[0] if out.stdout else b""


def cache_key(cc: str) -> str:
    """Hash of everything the archive is made of: source, snippet, compiler, format."""
    h = hashlib.sha256()
    h.update(b"icbd-reconnect-initrd %d\n" % FORMAT)
    h.update(b" ".join(c.encode() for c in CFLAGS) + b"\n")
    h.update(_compiler_id(cc) + b"\n")
    for p in (SOURCE, CONF):
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def compile_client(out: Path, cc: str | None = None) -> None:
    """Compile the client to ``out``. Raises InitrdError with the compiler's messages."""
    cc = cc or _compiler()
    cmd = [cc, *CFLAGS, "-o", str(out), str(SOURCE)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise InitrdError(f"{' '.join(cmd)}: {e}") from e
    if p.returncode != 0:
        hint = (" (a static link needs libc6-dev's libc.a)"
                if "cannot find -lc" in p.stderr else "")
        raise InitrdError(f"compiling {SOURCE.name} failed{hint}:\n{p.stderr[-2000:]}")


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, st_mode, data) entries, parents first: sorted, inode
    numbers from 1, mtime 0, owner root, ending with TRAILER!!!."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(raw)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(sorted(entries), start=1):
        add(name, mode, data, ino)
    add("TRAILER!!!", 0, b"", 0)
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def archive(client: bytes, conf: bytes) -> bytes:
    """The gzip'ed archive holding ``client`` and ``conf`` at their paths (deterministic:
    no name or time in the gzip header)."""
    d = stat.S_IFDIR | 0o755
    entries = [("conf", d, b""), ("conf/conf.d", d, b""), ("usr", d, b""),
               ("usr/sbin", d, b""),
               (CLIENT_PATH, stat.S_IFREG | 0o755, client),
               (CONF_PATH, stat.S_IFREG | 0o644, conf)]
    return gzip.compress(newc(entries), compresslevel=9, mtime=0)


def build(directory: str | os.PathLike[str], *, force: bool = False) -> Built:
    """The archive in ``directory`` (``reconnect-<key>.img``), built if missing; older
    builds there are removed. Raises InitrdError (nothing to compile with, a compile error)
    or OSError (the directory)."""
    cc = _compiler()
    d = Path(directory)
    key = cache_key(cc)
    final = d / f"reconnect-{key}.img"
    if final.is_file() and not force:
        return Built(final, final.stat().st_size)
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".icbd-initrd-", dir=d) as tmp:
        exe = Path(tmp) / "icbd-nbd-client"
        compile_client(exe, cc)
        data = archive(exe.read_bytes(), CONF.read_bytes())
        part = Path(tmp) / "out.img"
        part.write_bytes(data)
        part.chmod(0o644)
        os.replace(part, final)
    for old in d.glob("reconnect-*.img"):
        if old != final:
            old.unlink(missing_ok=True)
    log.info(kv(event="reconnect_initrd", path=final, bytes=len(data), key=key))
    return Built(final, len(data))
