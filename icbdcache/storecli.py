"""Store commands of the CLI: ``import``, ``ls``, ``stats``, ``verify``, ``warm``, ``pin``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from icbdcache.log import kv
from icbdcache.store import (
    BatchWriter,
    Store,
    StoreError,
    VersionMeta,
    digest,
    split_key,
    version_key,
)
from icbdcache.store.chunks import CHUNK_SIZE, ZERO

log = logging.getLogger("icbdcache.cli")
DEFAULT_STORE = os.environ.get("ICBD_STORE", "/var/lib/icbd-cache/store")


def parse_bytes(text: str) -> int:
    """``64K``, ``512M``, ``20G``, ``1T`` or a number of bytes -> bytes. Raises ValueError."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=DEFAULT_STORE, metavar="DIR",
                   help=f"the store directory (default $ICBD_STORE or {DEFAULT_STORE})")


def _progress(total: int, desc: str) -> tqdm[Any]:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not sys.stderr.isatty(), leave=False)


def _next_version(store: Store, imi: str) -> str:
    nums = [int(m.version) for m in store.versions() if m.imi == imi and m.version.isdigit()]
    return str(max(nums, default=0) + 1)


def cmd_import(args: argparse.Namespace) -> int:
    """Index a snapshot file as a new version: its chunk map, and its bytes copied (--copy) or
    left in the file, which becomes the version's first source."""
    path = os.path.abspath(args.file)
    try:
        size = os.path.getsize(path)
        store = Store(args.store, size_limit=args.store_size)
    except (OSError, StoreError) as e:
        print(f"icbd-cache import: {e}", file=sys.stderr)
        return 2
    version = args.version or _next_version(store, args.imi)
    key = version_key(args.imi, version)
    if store.version(key) is not None and not args.force:
        print(f"icbd-cache import: {key} exists (versions never change; --force replaces it)",
              file=sys.stderr)
        return 2
    writer = BatchWriter(store) if args.copy else None
    chunk_map = bytearray()
    t0 = time.monotonic()
    copied = 0
    last_log = t0
    with open(path, "rb", buffering=0) as f, _progress(size, key) as bar:
        pos = 0
        while pos < size:
            data = f.read(min(CHUNK_SIZE, size - pos))
            if not data:
                break
            d = digest(data)
            chunk_map += d
            if writer is not None and d != ZERO:
                writer.put(d, data)
                copied += len(data)
            pos += len(data)
            bar.update(len(data))
            if bar.disable and time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info(kv(importing=key, done=f"{100 * pos // max(size, 1)}%"))
    sources = ([] if args.copy else [path]) + list(args.source or [])
    meta = VersionMeta(args.imi, version, size, CHUNK_SIZE, sources, pinned=args.pin,
                       created=time.time(), kernel=args.kernel, initrd=args.initrd)
    if writer is not None:
        writer.close()
    store.put_version(meta, bytes(chunk_map))
    if not args.no_latest:
        store.set_latest(args.imi, version)
    distinct = len({bytes(chunk_map[i:i + 16]) for i in range(0, len(chunk_map), 16)} - {ZERO})
    where = f"copied {copied} bytes" if args.copy else f"bytes left in {path}"
    print(f"imported {key}: {size} bytes, {len(chunk_map) // 16} chunks ({distinct} distinct "
          f"non-zero), {where}, {time.monotonic() - t0:.1f} s")
    store.close()
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    store = _open_ro(args.store)
    if store is None:
        return 2
    rows: list[dict[str, Any]] = []
    for m in sorted(store.versions(), key=lambda m: (m.imi, m.version)):
        held, need = store.held_of(m.key)
        latest = store.latest(m.imi) == m.version
        rows.append({"imi": m.imi, "version": m.version, "size": m.size, "held": held,
                     "needed": need, "pinned": m.pinned, "latest": latest,
                     "sources": m.sources})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'IMI':16} {'VERSION':10} {'SIZE':>12} {'HELD':>12} {'HELD%':>6} PINNED LATEST")
    for r in rows:
        pct = 100 * r["held"] / r["needed"] if r["needed"] else 100.0
        print(f"{r['imi']:16} {r['version']:10} {r['size']:>12} {r['held']:>12} {pct:>5.1f}% "
              f"{'yes' if r['pinned'] else 'no':6} {'*' if r['latest'] else ''}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    store = _open_ro(args.store)
    if store is None:
        return 2
    s = store.stats()
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    for k in sorted(s):
        print(f"{k:32} {s[k]}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        store = Store(args.store, readonly=not args.repair)
    except StoreError as e:
        print(f"icbd-cache verify: {e}", file=sys.stderr)
        return 2
    r = store.verify(repair=args.repair)
    ok = r["bad"] == 0 and r["held_recorded"] == r["held_actual"]
    print(f"{'OK' if ok else 'DAMAGED'}: {r['chunks']} chunks, {r['bad']} bad, "
          f"held {r['held_actual']} bytes (recorded {r['held_recorded']})")
    return 0 if ok else 1


def cmd_pin(args: argparse.Namespace) -> int:
    try:
        store = Store(args.store)
        store.set_pinned(args.version, not args.unpin)
    except StoreError as e:
        print(f"icbd-cache pin: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    """Fault in a version's boot profile (or with --all, every chunk) ahead of a boot storm."""
    from icbdcache.node import Node

    try:
        store = Store(args.store, size_limit=args.store_size)
    except StoreError as e:
        print(f"icbd-cache warm: {e}", file=sys.stderr)
        return 2

    async def run() -> int:
        node = Node(store)
        backend = node.resolve(args.version)
        if backend is None:
            print(f"icbd-cache warm: unknown version {args.version}", file=sys.stderr)
            return 2
        indexes = list(range(backend.meta.chunks)) if args.all else store.profile(backend.key)
        if not indexes:
            print(f"icbd-cache warm: {backend.key} has no boot profile yet (boot a client once, "
                  "or use --all)", file=sys.stderr)
            return 1
        sem = asyncio.Semaphore(args.parallel)
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            async with sem:
                d = backend.digest_at(i)
                try:
                    if d != ZERO and backend.shared.lookup(d) is None:
                        await backend.fault(i)
                except OSError:
                    failed += 1

        with _progress(len(indexes), f"warm {backend.key}") as bar:
            for coro in asyncio.as_completed([one(i) for i in indexes]):
                await coro
                bar.update(1)
        await node.close()
        print(f"warmed {backend.key}: {len(indexes)} chunks, {failed} failed")
        return 1 if failed else 0

    from icbdcache.server import new_event_loop

    loop = new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()
        store.close()


def _open_ro(path: str) -> Store | None:
    if not os.path.exists(os.path.join(path, "data.mdb")):
        print(f"icbd-cache: no store at {path}", file=sys.stderr)
        return None
    try:
        return Store(path, readonly=True)
    except StoreError as e:
        print(f"icbd-cache: {e}", file=sys.stderr)
        return None


def add_parsers(sub: Any, verbosity: Any) -> dict[str, Any]:
    """Add the store subcommands; return their handlers by name."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("import", help="index a snapshot file as a new iMI version",
                       description="Make a new version of an iMI from a raw image snapshot: its "
                                   "chunk map (xxh3-128 per 64 KiB chunk), and its bytes either "
                                   "left in the file (the version's first source) or copied "
                                   "into the store (--copy).",
                       epilog="example:\n  icbd-cache import /snap/lab-7.img --imi lab --store "
                              "/var/lib/icbd-cache/store\n  icbd-cache import lab.img --imi lab "
                              "--version 8 --copy --pin --source nbd://master/lab@8",
                       formatter_class=raw)
    p.add_argument("file", help="the raw image (a read-only snapshot)")
    p.add_argument("--imi", required=True, help="iMI name")
    p.add_argument("--version", help="version name (default: next number)")
    add_store_arg(p)
    p.add_argument("--store-size", type=parse_bytes, default=None, help="bound of the store")
    p.add_argument("--copy", action="store_true", help="copy the bytes into the store")
    p.add_argument("--source", action="append", metavar="URI",
                   help="another source to fault from when the file is gone (repeatable)")
    p.add_argument("--pin", action="store_true", help="never evict this version's chunks")
    p.add_argument("--no-latest", action="store_true", help="do not make it the latest")
    p.add_argument("--kernel", help="the version's kernel file (PXE)")
    p.add_argument("--initrd", help="the version's initrd file (PXE)")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    verbosity(p)
    p = sub.add_parser("ls", help="list iMIs and versions in the store",
                       epilog="example:\n  icbd-cache ls --store /var/lib/icbd-cache/store",
                       formatter_class=raw)
    add_store_arg(p)
    p.add_argument("--json", action="store_true")
    verbosity(p)
    p = sub.add_parser("stats", help="cache counters: hits, misses, coalesced, bytes per source",
                       epilog="example:\n  icbd-cache stats --store DIR --json",
                       formatter_class=raw)
    add_store_arg(p)
    p.add_argument("--json", action="store_true")
    verbosity(p)
    p = sub.add_parser("verify", help="check every chunk of a store against its digest",
                       epilog="example:\n  icbd-cache verify --store DIR\n"
                              "exit status: 0 consistent, 1 damaged, 2 no store",
                       formatter_class=raw)
    add_store_arg(p)
    p.add_argument("--repair", action="store_true", help="delete bad chunks, fix counters")
    verbosity(p)
    p = sub.add_parser("warm", help="fault a version's boot profile in before a boot storm",
                       epilog="example:\n  icbd-cache warm lab@7 --store DIR\n"
                              "  icbd-cache warm lab --all",
                       formatter_class=raw)
    p.add_argument("version", help="IMI@VERSION or IMI (latest)")
    add_store_arg(p)
    p.add_argument("--all", action="store_true", help="every chunk, not only the profile")
    p.add_argument("--store-size", type=parse_bytes, default=None,
                   help="the bound the store is served with (evicts cold chunks as it fills)")
    p.add_argument("--parallel", type=int, default=16, help="faults in flight (default 16)")
    verbosity(p)
    p = sub.add_parser("pin", help="pin (or --unpin) a version: its chunks are never evicted",
                       epilog="example:\n  icbd-cache pin lab@7 --store DIR", formatter_class=raw)
    p.add_argument("version", help="IMI@VERSION")
    add_store_arg(p)
    p.add_argument("--unpin", action="store_true")
    verbosity(p)
    return {"import": cmd_import, "ls": cmd_ls, "stats": cmd_stats, "verify": cmd_verify,
            "warm": cmd_warm, "pin": cmd_pin}


__all__ = ["add_parsers", "parse_bytes", "split_key"]
