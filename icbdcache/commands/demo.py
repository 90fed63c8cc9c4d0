"""``icbd-cache demo``: the main job, end to end: a site cache faulting from its master, cold then
warm.

All real processes on 127.0.0.1, in a temporary directory removed at the end (``--keep``: left,
and named):

1. a small real ext4 disk image (built once, cached in ~/.cache/icbd-cache) is published on a
   master as ``demo@1`` (``icbd-cache publish``, ``icbd-cache master``);
2. a site, ``icbd-cache serve --master URL --site demo-site --subscribe demo --on-demand``, with
   an empty store: it takes the version's manifest from the master, and faults each chunk from
   the master when a client first reads it;
3. the cold pass: N ``nbdcopy`` (default 15) read the image at once through the site; every
   copy's sha256 is checked against the image's;
4. the site is stopped (it writes its counters to its store) and started again on its store;
   the warm pass: N ``nbdcopy`` again, checked again;
5. a table per pass from the site's ``icbd-cache stats --json`` (the difference of the
   snapshots taken after each pass): wall time, bytes of chunks that crossed from the master
   (the cold pass: each distinct non-zero chunk once, checked against the image; the warm
   pass: none), faults, coalesced waits, hits by tier; and the master's own count of chunk
   bytes it sent, which must agree.

Exit status 0 when every copy is right and every count is what it should be, 1 when not (the
line says which), 2 when it cannot run here (a tool missing, a bad option).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    wait_export,
)
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
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent demos build apart
        subprocess.run(
            [mkfs, "-q", "-F", "-L", "icbd-demo", "-E", "root_owner=0:0", "-d", str(root),
             "-U", "5d7e1c2a-0000-4000-8000-1cbd00000001", str(tmp), f"{size // 1024}K"],
            check=True, stdout=subprocess.DEVNULL,
            env={**os.environ, "E2FSPROGS_FAKE_TIME": "1700000000"},
        )
        tmp.rename(path)
    return path


#: Zeros hashed for a file's holes (which are not read).
_ZEROS = memoryview(bytes(1 << 20))


def sha256_file(path: Path) -> str:
    """The sha256 of a file, hex. Its holes (``SEEK_HOLE``: nbdcopy writes a sparse copy)
    are hashed as zeros without being read. Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: only a hole up to the end
                    raise
                data = size
            while pos < data:
                n = min(len(_ZEROS), data - pos)
                h.update(_ZEROS[:n])
                pos += n
            if pos >= size:
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                block = os.pread(fd, min(1 << 20, hole - pos), pos)
                if not block:
                    raise OSError(errno.EIO, f"{path}: shorter than its size")
                h.update(block)
                pos += len(block)
    return h.hexdigest()


def distinct_chunk_bytes(path: Path) -> tuple[int, int]:
    """(distinct non-zero chunks, their bytes) of an image cut in the store's 64 KiB chunks:
    what a site with an empty store must fetch from the master to hold the whole image."""
    from icbdcache.store.chunks import CHUNK_SIZE, digest

    seen: dict[bytes, int] = {}
    with open(path, "rb") as f:
        while data := f.read(CHUNK_SIZE):
            if data.count(0) != len(data):
                seen[digest(data)] = len(data)
    return len(seen), sum(seen.values())


@dataclass
class Pass:
    """One pass: its name, clients, wall time (seconds, the first nbdcopy started to the
    last ended), copies whose sha256 was right, and the site's counts."""

    name: str
    clients: int
    wall: float
    right: int
    counts: PassCounts


def storm(uri: str, clients: int, want: str, work: Path) -> tuple[float, int, str]:
    """``clients`` nbdcopy of ``uri`` at once into ``work``; returns (wall seconds, copies
    whose sha256 is ``want``, the first failed client's error or ""). The copies are removed."""
    work.mkdir()
    try:
        t0 = time.monotonic()
        procs = []
        for i in range(clients):
            with open(work / f"err{i}", "wb") as err:
                procs.append(subprocess.Popen(["nbdcopy", uri, str(work / f"copy{i}")],
                                              stdout=subprocess.DEVNULL, stderr=err))
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - t0
        done = [work / f"copy{i}" for i, code in enumerate(codes) if code == 0]
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            sums = list(pool.map(sha256_file, done))
        error = ""
        for i, code in enumerate(codes):
            if code != 0:
                text = (work / f"err{i}").read_text(errors="replace").strip()
                error = f"nbdcopy client {i + 1} failed (exit {code}): {text}"
                break
        return wall, sum(1 for s in sums if s == want), error
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_demo(size_text: str, image: str | None, clients: int, keep: bool = False) -> int:
    """Run the demo; return the exit status (0 when every copy and every count is right)."""
    if not 1 <= clients <= MAX_CLIENTS:
        print(f"demo: --clients {clients}: 1 to {MAX_CLIENTS}", file=sys.stderr)
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
    tmp = Path(tempfile.mkdtemp(prefix="icbd-demo-"))
    try:
        return _demo(path, clients, tmp)
    except DemoError as e:
        print(f"demo: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if keep:
            say("kept", f"{tmp}: the stores master/ and site/, master.log, site.log, and "
                        "stats-cold.json, stats-warm.json, stats-master.json (icbd-cache "
                        "stats --json of the site after each pass, of the master at the end)")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _demo(path: Path, clients: int, tmp: Path) -> int:
    want = sha256_file(path)
    size = path.stat().st_size
    n_distinct, expect = distinct_chunk_bytes(path)
    say("image", f"{path}: {size / 2**20:.0f} MiB, sha256 {want[:16]}...; {n_distinct} "
                 f"distinct non-zero 64 KiB chunks ({mib(expect)}), the rest zeros or repeats")
    master_store, site_store = tmp / "master", tmp / "site"
    say("", publish(path, master_store, "demo"))
    master, url = start_master(master_store, tmp)
    passes: list[Pass] = []
    try:
        port = free_port()
        args = site_args(site_store, port, url, "demo")
        uri = f"nbd://127.0.0.1:{port}/demo@1"
        say("site", shown(args))
        say("", "an empty store: it takes demo@1's manifest from the master, and faults a "
                "chunk from it when a client first reads it")
        before: dict[str, Any] = {}
        for name in ("cold", "warm"):
            if name == "warm":
                say("warm", "the site stopped (writing its counters to its store) and started "
                            "again on that store, as above")
            site = Proc(args, tmp / "site.log")
            try:
                site.wait_port(port, "the site (icbd-cache serve)")
                wait_export(uri, site)
                wall, right, error = storm(uri, clients, want, tmp / "copies")
            finally:
                site.stop()
            after = read_stats(site_store)
            (tmp / f"stats-{name}.json").write_text(json.dumps(after, indent=2) + "\n")
            passes.append(Pass(name, clients, wall, right, PassCounts.between(before, after)))
            before = after
            say(name, f"{clients} x nbdcopy {uri} at once: {right}/{clients} copies with the "
                      f"image's sha256 ({wall:.2f} s)")
            if error:
                say("", error)
    finally:
        master.stop()
    master_stats = read_stats(master_store)
    (tmp / "stats-master.json").write_text(json.dumps(master_stats, indent=2) + "\n")
    sent = int(master_stats.get("master_chunks_sent", 0))
    print()
    print(table(passes))
    print()
    return verdict(passes, expect, n_distinct, sent)


def table(passes: list[Pass]) -> str:
    """The per-pass table the demo prints."""
    head = (f"{'pass':5} {'clients':>7} {'wall':>7} {'master->site':>13} {'faults':>7} "
            f"{'coalesced':>9}   hits: {'hot set':>7} {'queue':>6} {'LMDB':>6}")
    rows = [head]
    for p in passes:
        c = p.counts
        rows.append(f"{p.name:5} {p.clients:>7} {p.wall:>5.2f} s {mib(c.from_master):>13} "
                    f"{c.faults:>7} {c.coalesced:>9}         {c.hits_hot:>7} "
                    f"{c.hits_queued:>6} {c.hits_lmdb:>6}")
    return "\n".join(rows)


def verdict(passes: list[Pass], expect: int, n_distinct: int, sent: int) -> int:
    """Print what the counts show, and whether they are what they must be (``expect``,
    ``n_distinct``: the image's distinct non-zero chunk bytes and chunks; ``sent``: the
    master's count of chunks sent); the exit status."""
    cold, warm = passes
    problems: list[str] = []
    for p in passes:
        if p.right != p.clients:
            problems.append(f"{p.name} pass: {p.clients - p.right} of {p.clients} copies "
                            "differ from the image")
    if cold.counts.from_master == expect:
        say("cold", f"each of the {n_distinct} distinct non-zero chunks crossed once "
                    f"({expect} bytes), with {cold.clients} clients asking at once")
    else:
        problems.append(f"cold pass: {cold.counts.from_master} bytes from the master, not "
                        f"the image's {expect} bytes of distinct non-zero chunks")
    if warm.counts.from_master == 0:
        say("warm", "nothing crossed: every chunk read was a hit in the site's store")
    else:
        problems.append(f"warm pass: {warm.counts.from_master} bytes from the master, not 0")
    if sent == n_distinct:
        say("master", f"its own count agrees: {sent} chunks sent, each once")
    else:
        problems.append(f"the master counts {sent} chunks sent, not the image's {n_distinct} "
                        "distinct non-zero chunks")
    say("counts", "icbd-cache stats --store SITE --json after each pass; wall: first nbdcopy "
                  "started to last ended")
    if problems:
        for text in problems:
            print(f"demo: FAILED: {text}")
        return 1
    print("demo: OK")
    return 0


#: Most --clients (each nbdcopy opens up to 4 connections; serve takes 512 by default).
MAX_CLIENTS = 100

DEMO = Command(
    "demo", "a site cache faulting from its master: a boot storm, cold then warm",
    textwrap.fill(
        "Publishes a small ext4 disk image (built once, kept in ~/.cache/icbd-cache) on a "
        "master, starts a site ('icbd-cache serve --master URL --on-demand') with an empty "
        "store, and has N clients (nbdcopy) read the image through the site at once, twice: "
        "cold (the site faults each chunk from the master once, however many clients ask) "
        "and warm (nothing crosses). Checks every copy's sha256 and prints per pass the "
        "wall time, the bytes that crossed from the master, faults, coalesced waits and hits "
        "by tier, from 'icbd-cache stats --json'. All on 127.0.0.1 in a temporary directory. "
        "Needs mkfs.ext4, nbdinfo and nbdcopy (scripts/setup installs them).", 78),
    "examples:\n  icbd-cache demo\n  icbd-cache demo --clients 40 --keep\n"
    "  icbd-cache demo --image /srv/imi/lab-7.img\n  icbd-cache demo --boot",
    (Option("size", default="128M", metavar="SIZE",
            help="image size: bytes, or a number with K, M or G (default 128M)"),
     Option("image", metavar="FILE", help="publish this raw image instead of building one"),
     Option("clients", "int", default=15, metavar="N",
            help=f"nbdcopy readers at once (default 15, at most {MAX_CLIENTS})"),
     Option("keep", "bool", default=False,
            help="keep the temporary directory (the master's and the site's stores, their "
                 "logs, stats --json after each pass) and say where"),
     Option("boot", "bool", default=False,
            help="instead, boot a real workstation: build the Debian test iMI "
                 "(scripts/build-test-imi: root, debootstrap), publish it on a master, serve "
                 "it from a site with an empty store ('serve --master --on-demand --pxe') and "
                 "boot a QEMU guest from the site over iPXE and NBD (2 to 4 minutes the first "
                 "time)")),
    doc="store.md")

#: The demo's table.
COMMANDS = (DEMO,)


def cmd_demo(args: Any) -> int:
    if args.boot:
        from icbdcache.commands.bootdemo import run_boot_demo

        return run_boot_demo(keep=args.keep)
    return run_demo(args.size, args.image, args.clients, args.keep)


def register(sub: Any) -> None:
    """Add ``demo`` to ``sub`` (argparse subparsers)."""
    DEMO.add_parser(sub, cmd_demo)
