"""Store commands of the CLI: ``import``, ``ls``, ``stats``, ``verify``, ``warm``, ``pin``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

from icbdcache.commands.options import Command, Option
from icbdcache.store import (
    BatchWriter,
    Pending,
    Store,
    StoreError,
    VersionMeta,
    split_key,
    version_key,
)
from icbdcache.store.chunks import CHUNK_SIZE, ZERO, map_digest
from icbdcache.store.index import index_image
from icbdcache.store.lifecycle import usable_source
from icbdcache.store.owners import ClientUse, describe
from icbdcache.store.storeformat import FORMAT

log = logging.getLogger("icbdcache.cli")
DEFAULT_STORE = os.environ.get("ICBD_STORE", "/var/lib/icbd-cache/store")


def store_option(default: str | None = DEFAULT_STORE, help: str | None = None,
                 group: str | None = None) -> Option:
    """``--store DIR`` (every command on a store has it)."""
    return Option("store", default=default, metavar="DIR", group=group, help=help or (
        f"the store directory (default $ICBD_STORE or {DEFAULT_STORE})"))


def store_size_option(help: str, group: str | None = None) -> Option:
    """``--store-size BYTES``: the bound of the store's chunks."""
    return Option("store-size", "size", metavar="BYTES", help=help, group=group)


def progress_bar(total: int | None, desc: str) -> tqdm[Any]:
    """A byte (or chunk) progress bar on stderr, shown only on a terminal."""
    from tqdm import tqdm  # imported when a command shows progress (~20 ms)

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not sys.stderr.isatty(), leave=False)


def check_name(what: str, name: str) -> str | None:
    """Why ``name`` cannot be an iMI or version name (``IMI@VERSION`` is a version's name and
    export name everywhere), or None."""
    if not name:
        return f"{what} is empty"
    bad = sorted({c for c in name if c in "@/?" or c.isspace() or not c.isprintable()})
    if bad:
        shown = ", ".join(dict.fromkeys(
            "whitespace" if c.isspace() else repr(c) if c.isprintable() else
            "control characters" for c in bad))
        return (f"{what} {name!r} may not contain {shown} (names become export names "
                "IMI@VERSION, URL paths and directory names)")
    if len(name.encode("utf-8", "surrogatepass")) > 200:
        return f"{what} is longer than 200 bytes"
    return None


def check_source(spec: str) -> str | None:
    """Why ``spec`` is neither an existing file nor a source URI, or None. Opens nothing."""
    from icbdcache.sources import open_source

    if "://" not in spec:
        if os.path.isfile(spec):
            return None
        what = "not a file" if os.path.exists(spec) else "no such file"
        return (f"--source {spec!r}: {what} (a source is an image file or "
                "nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
    try:
        open_source(spec)
    except ValueError as e:
        return f"--source {spec!r}: {e}"
    return None


def _image_size(path: str) -> int:
    """Bytes of a file or block device. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def cmd_import(args: argparse.Namespace) -> int:
    """Index a snapshot file as a new version: its chunk map, and its bytes copied (--copy) or
    left in the file, which becomes the version's first source. The name is reserved in the
    store before the file is read and the version made in one transaction after it
    (docs/store.md, 'CONCURRENCY'): a failure leaves nothing half-made."""
    path = os.path.abspath(args.file)
    problems = [m for m in (check_name("--imi", args.imi),
                            None if args.version is None else check_name("--version",
                                                                         args.version))
                if m is not None]
    problems += [m for m in map(check_source, args.source or []) if m is not None]
    for opt, f in (("--kernel", args.kernel), ("--initrd", args.initrd)):
        if f is not None and not os.path.isfile(f):
            problems.append(f"{opt} {f}: no such file")
    if args.force_in_use and not args.force:
        problems.append("--force-in-use goes with --force")
    if problems:
        for m in problems:
            print(f"icbd-cache import: {m}", file=sys.stderr)
        return 2
    # file sources are kept as absolute paths: the server may run from another directory
    extra = [s if "://" in s else os.path.abspath(s) for s in args.source or []]
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(f"{args.file} is a directory, not an image")
        size = _image_size(path)
        if size == 0:
            print(f"icbd-cache import: {args.file}: empty image (0 bytes)", file=sys.stderr)
            return 2
        from icbdcache.store.index import sector_note

        note = sector_note(size)
        if note is not None:
            print(f"icbd-cache import: warning: {args.file}: {note}", file=sys.stderr)
        store = Store(args.store, size_limit=args.store_size)
    except (OSError, StoreError) as e:
        print(f"icbd-cache import: {e}", file=sys.stderr)
        return 2
    try:
        return _import(args, store, path, size, extra)
    finally:
        store.close()


def _import(args: argparse.Namespace, store: Store, path: str, size: int,
            extra: list[str]) -> int:
    try:
        version = store.reserve_version(args.imi, args.version, pinned=args.pin,
                                        force=args.force, in_use_ok=args.force_in_use)
    except StoreError as e:  # VersionExists, VersionBusy, VersionInUse, ...
        print(f"icbd-cache import: {e}", file=sys.stderr)
        return 2
    key = version_key(args.imi, version)
    made = False
    writer: BatchWriter | None = None
    try:
        held_before = store.held
        evicted_before = store.stats().get("evicted_bytes", 0)
        fit = store.fit_check(key) if args.copy else None
        writer = BatchWriter(store, protect=key) if args.copy else None
        t0 = time.monotonic()
        strong = bytearray()
        with progress_bar(size, key) as bar:
            chunk_map = index_image(path, size, writer, check=fit,
                                    progress=None if bar.disable else bar.update, label=key,
                                    strong=strong)
        if writer is not None:
            writer.close()
            if writer.errors:
                raise StoreError(f"{writer.errors} write batches to the store failed (see the "
                                 "log)")
        sources = list(dict.fromkeys(([] if args.copy else [path]) + extra))  # once each
        meta = VersionMeta(args.imi, version, size, CHUNK_SIZE, sources, pinned=args.pin,
                           created=time.time(),
                           kernel=os.path.abspath(args.kernel) if args.kernel else None,
                           initrd=os.path.abspath(args.initrd) if args.initrd else None,
                           manifest=map_digest(chunk_map))
        stored = store.commit_version(meta, bytes(chunk_map), latest=not args.no_latest,
                                      force=args.force, in_use_ok=args.force_in_use,
                                      copied=args.copy,
                                      bound=store.bound if args.copy else None,
                                      strong_map=bytes(strong))
        made = True
    except (OSError, EOFError, StoreError) as e:
        print(f"icbd-cache import: {e}", file=sys.stderr)
        return 2
    finally:
        if writer is not None:
            writer.close()
        if not made:
            try:
                store.abandon_version(key)
            except StoreError as e:
                print(f"icbd-cache import: {key}: {e}", file=sys.stderr)
    distinct = len({bytes(chunk_map[i:i + 16]) for i in range(0, len(chunk_map), 16)} - {ZERO})
    if args.copy:
        # bytes of the non-zero chunks queued for the store (duplicates included)
        copied = sum(min(CHUNK_SIZE, size - i * CHUNK_SIZE)
                     for i in range(len(chunk_map) // 16)
                     if chunk_map[i * 16 : (i + 1) * 16] != ZERO)
        # what the store grew by, plus what it evicted meanwhile to make room
        added = (store.held - held_before
                 + store.stats().get("evicted_bytes", 0) - evicted_before)
        where = (f"{added} bytes added to the store, {max(0, copied - added)} already there "
                 "(dedup)")
    else:
        where = f"bytes left in {path}, 0 added to the store"
    if not args.quiet:
        print(f"imported {key}: {size} bytes, {len(chunk_map) // 16} chunks ({distinct} "
              f"distinct non-zero), {where}, {time.monotonic() - t0:.1f} s")
    keep_boot_files(store, stored, path, quiet=args.quiet)
    return 0


def keep_boot_files(store: Store, meta: VersionMeta, image: str, *, quiet: bool,
                     command: str = "import") -> None:
    """import's (and publish's) best effort for PXE: the --kernel/--initrd given, or those
    inside an ext4 image, copied to STORE/boot/IMI@VERSION (icbdcache.store.bootfiles). A
    failure is a warning naming ``icbd-cache COMMAND``."""
    from icbdcache.store import bootfiles

    try:
        bf = bootfiles.prepare_at_import(store, meta, image)
    except Exception as e:  # best effort: the version is imported whatever happens here
        print(f"icbd-cache {command}: warning: {meta.key}: no kernel and initrd kept for PXE: "
              f"{e}", file=sys.stderr)
        return
    if bf is not None and not quiet:
        print(f"boot files {bf.kernel.parent}/: {bf.kernel.name} {bf.kernel.stat().st_size} "
              f"bytes, {bf.initrd.name} {bf.initrd.stat().st_size} bytes ({bf.how})")


def cmd_ls(args: argparse.Namespace) -> int:
    store = _open_ro(args.store)
    if store is None:
        return 2
    try:
        uses = store.in_use()
        pending = store.pending_versions()
        rows: list[dict[str, Any]] = []
        for m in sorted(store.versions(), key=lambda m: (m.imi, m.version)):
            held, need = store.held_of(m.key)
            latest = store.latest(m.imi) == m.version
            rows.append({"imi": m.imi, "version": m.version, "size": m.size, "held": held,
                         "needed": need, "pinned": m.pinned, "latest": latest,
                         "retired": m.retired, "sources": m.sources, "instance": m.instance,
                         "manifest": m.manifest,
                         "clients": [c.to_json() for c in uses.get(m.key, [])]})
    finally:
        store.close()
    if args.json:
        rows += [pending_row(p) for p in pending]
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'IMI':16} {'VERSION':10} {'SIZE':>12} {'HELD':>12} {'HELD%':>6} PINNED LATEST   "
          "CLIENTS")
    for r in rows:
        pct = 100 * r["held"] / r["needed"] if r["needed"] else 100.0
        clients = describe([ClientUse(**c) for c in r["clients"]], most=3) or "-"
        # a withdrawn latest (its only version, still run by attached workstations): both
        mark = "*" * bool(r["latest"]) + ("retired" if r["retired"] else "")
        print(f"{r['imi']:16} {r['version']:10} {r['size']:>12} {r['held']:>12} {pct:>5.1f}% "
              f"{'yes' if r['pinned'] else 'no':6} {mark:8} {clients}")
    for p in pending:
        print(pending_line(p))
    return 0


def pending_row(p: Pending) -> dict[str, Any]:
    """A pending version as a row of ``ls --json``."""
    return {"imi": p.imi, "version": p.version, "pending": True, "pid": p.owner.pid,
            "alive": p.alive, "started": p.started, "chunks": p.chunks, "pinned": p.pinned}


def pending_line(p: Pending) -> str:
    """A pending version as ``ls`` and ``verify`` print it."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p.started))
    state = ("being made" if p.alive else
             "its process is gone: reclaimable (verify --repair drops it)")
    return (f"pending {p.key}: {state} (pid {p.owner.pid}, since {since}, {p.chunks} chunks "
            "copied)")


#: Counters a server keeps (docs/store.md); absent ones are zero. ``bytes_from:SOURCE``
#: counters are added per source that ever answered.
COUNTERS = ("hits", "misses", "coalesced", "faults", "fault_errors", "corrupt_chunks",
            "prefetched", "evicted_bytes", "held_bytes", "chunks", "hits_hot", "hits_queued",
            "hits_lmdb", "lease_waits", "lease_takeovers", "not_kept")


def cmd_stats(args: argparse.Namespace) -> int:
    store = _open_ro(args.store)
    if store is None:
        return 2
    s: dict[str, Any] = {**dict.fromkeys(COUNTERS, 0), **store.stats()}
    from icbdcache.replication.replica import read_state

    replica = read_state(store)
    uses = store.in_use()
    store.close()
    if args.json:
        if replica is not None:
            s["replica"] = replica
        s["in_use"] = {k: [c.to_json() for c in v] for k, v in sorted(uses.items())}
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    for k in sorted(s):
        print(f"{k:32} {s[k]}")
    for key, clients in sorted(uses.items()):
        print(f"{'in_use.' + key:32} {describe(clients)}")
    if replica is not None:
        print(replica_lines(replica))
    return 0


def replica_lines(r: dict[str, Any], now: float | None = None) -> str:
    """The replica state record (``replica/state``, written by the replica of ``serve
    --master`` or ``icbd-cache replica``) as the lines ``stats`` prints."""
    now = time.time() if now is None else now
    state = str(r.get("state"))
    since = r.get("cut_off_since")
    if state == "cut-off" and isinstance(since, int | float):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        state = f"cut-off since {stamp} ({now - since:.0f} s), serving complete versions"
    lines = [f"{'replica.master':32} {r.get('master')}",
             f"{'replica.site':32} {r.get('site')}",
             f"{'replica.state':32} {state}"]
    if r.get("error"):
        lines.append(f"{'replica.error':32} {r['error']}")
    if r.get("pulling"):
        lines.append(f"{'replica.pulling':32} {r['pulling']}")
    versions = r.get("versions") or {}
    done = [k for k, v in versions.items() if v.get("complete")]
    partial = [f"{k} ({v.get('held', 0)}/{v.get('need', 0)} bytes)"
               for k, v in versions.items() if not v.get("complete")]
    lines.append(f"{'replica.complete':32} {', '.join(sorted(done)) or '-'}")
    if partial:
        lines.append(f"{'replica.incomplete':32} {', '.join(sorted(partial))}")
    lines.append(f"{'replica.behind_bytes':32} {r.get('behind_bytes', 0)}")
    conflicts = r.get("conflicts") or {}
    if isinstance(conflicts, dict) and conflicts:
        lines.append(f"{'replica.conflicts':32} {', '.join(sorted(conflicts))} (the master's "
                     "manifest changed: refused, the held version kept)")
    updated = r.get("updated")
    if isinstance(updated, int | float):
        pid = r.get("pid")
        running = ""
        if isinstance(pid, int) and state != "stopped":
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                running = ", not running"
            except OSError:
                pass
        lines.append(f"{'replica.updated':32} {now - updated:.0f} s ago (pid {pid}{running})")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open_store(args.store, "verify", readonly=not args.repair)
    if store is None:
        return 2
    try:
        return _verify(store, args.repair)
    finally:
        store.close()


def _verify(store: Store, repair: bool) -> int:
    r = store.verify(repair=repair)
    ok = r["bad"] == 0 and r["held_recorded"] == r["held_actual"]
    print(f"{'OK' if ok else 'DAMAGED'}: {r['chunks']} chunks, {r['bad']} bad, "
          f"held {r['held_actual']} bytes (recorded {r['held_recorded']})")
    if repair and not ok:
        # the repair deleted the bad chunks and set the counter in one transaction
        print(f"repaired: deleted {r['bad']} bad chunks; held counter fixed "
              f"({r['held_recorded']} -> {store.held} bytes)")
        ok = True
    unreadable = 0
    for m in sorted(store.versions(), key=lambda m: m.key):
        why = unreadable_because(store, m)
        if why:
            unreadable += 1
            print(f"UNREADABLE {m.key}: {'; '.join(why)}")
    for p in store.pending_versions():
        print(pending_line(p))
    if repair:
        dropped, records = store.reclaim()
        if dropped or records:
            print(f"reclaimed: {len(dropped)} pending versions of processes that are gone "
                  f"({', '.join(dropped) or '-'}), {records} stale in-use records")
    if unreadable:
        print(f"{unreadable} version(s) cannot be read in full by a client")
    return 0 if ok and not unreadable else 1


def cmd_store_upgrade(args: argparse.Namespace) -> int:
    """Upgrade a store made by an older release to this release's format, in place."""
    if not os.path.exists(os.path.join(args.store, "data.mdb")):
        print(f"icbd-cache store upgrade: no store at {args.store}", file=sys.stderr)
        return 2
    try:
        store = Store(args.store, allow_old=True)
    except StoreError as e:
        print(f"icbd-cache store upgrade: {e}", file=sys.stderr)
        return 2
    try:
        r = store.upgrade()
    except StoreError as e:
        print(f"icbd-cache store upgrade: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if not args.quiet:
        if r["versions"] == 0 and r["from"] == FORMAT:
            print(f"store {args.store} has format {FORMAT} already: nothing to do")
        else:
            print(f"upgraded store {args.store} from format {r['from']} to {FORMAT}: "
                  f"{r['versions']} versions, {r['hashed']} chunks hashed for their strong "
                  f"digests ({r['unknown']} chunks not held), {r['replicated']} versions "
                  "from a master left to take its signed strong digests at the next sync")
    return 0


def unreadable_because(store: Store, m: VersionMeta) -> list[str]:
    """Why a client could not read version ``m`` in full (empty: it can): chunks missing
    with no source left to fault them from, a map that is not the manifest it was made with."""
    why = []
    chunk_map = store.chunk_map(m.key)
    if m.manifest and map_digest(chunk_map) != m.manifest:
        why.append(f"its chunk map (digest {map_digest(chunk_map)}) is not the manifest it was "
                   f"made with ({m.manifest})")
    held, need = store.held_of(m.key)
    if held < need and not any(map(usable_source, m.sources)):
        why.append(f"misses {need - held} bytes of chunks and has no source left to fault "
                   "them from (import its image again with --force)")
    return why


def cmd_pin(args: argparse.Namespace) -> int:
    store = _open_store(args.store, "pin")
    if store is None:
        return 2
    try:
        meta = store.version(args.version)
        if meta is None:
            print(f"icbd-cache pin: unknown version {args.version} (see icbd-cache ls)",
                  file=sys.stderr)
            return 2
        store.set_pinned(meta.key, not args.unpin)
    except StoreError as e:
        print(f"icbd-cache pin: {e}", file=sys.stderr)
        return 2
    finally:
        store.close()
    if not args.quiet:
        print(f"{'unpinned' if args.unpin else 'pinned'} {meta.key}")
    return 0


#: The hot set of ``warm`` (bytes): it serves nobody, so a few chunks in flight at most.
WARM_HOT_BYTES = 8 << 20


def cmd_warm(args: argparse.Namespace) -> int:
    """Fault in a version's boot profile (or with --all, every chunk) ahead of a boot storm."""
    from icbdcache.loop import new_event_loop
    from icbdcache.node import Node

    store = _open_store(args.store, "warm", size_limit=args.store_size)
    if store is None:
        return 2

    async def run() -> int:
        # warm fills the store: no hot set to speak of (it serves nobody), and each fault
        # waits for room in the writer's queue rather than leaving its chunk unkept
        node = Node(store, services=(), hot_bytes=WARM_HOT_BYTES)
        node.faults.patient = True
        indexes = None
        if args.all:
            meta = store.version(args.version)
            indexes = list(range(meta.chunks)) if meta is not None else None
        try:
            with progress_bar(None if indexes is None else len(indexes),
                              f"warm {args.version}") as bar:

                def progress(n: int) -> None:
                    bar.update(n)

                key, asked, failed = await node.warm(
                    args.version, indexes, parallel=args.parallel, progress=progress)
        except StoreError:
            print(f"icbd-cache warm: unknown version {args.version}", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"icbd-cache warm: {e} (boot a client once, or use --all)", file=sys.stderr)
            return 1
        finally:
            await node.close()
        # fetched but not stored: the store's writer stopped, or a write batch failed
        unkept = node.stats.not_kept
        errors = node.reader.writer.errors
        print(f"warmed {key}: {asked} chunks, {failed} failed"
              + (f", {unkept} not stored" if unkept else "")
              + (f", {errors} write batches failed (see the log)" if errors else ""))
        return 1 if failed or unkept or errors else 0

    loop = new_event_loop()
    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()
        store.close()


def _open_ro(path: str) -> Store | None:
    return _open_store(path, None, readonly=True)


def _open_store(path: str, command: str | None, *, readonly: bool = False,
                size_limit: int | None = None) -> Store | None:
    """An existing store (a missing one is refused, not created), or None after saying why."""
    prog = f"icbd-cache {command}" if command else "icbd-cache"
    if not os.path.exists(os.path.join(path, "data.mdb")):
        print(f"{prog}: no store at {path}", file=sys.stderr)
        return None
    try:
        return Store(path, readonly=readonly, size_limit=size_limit)
    except StoreError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None


_NAME_RULE = "no '@', '/', '?' or whitespace"

IMPORT = Command(
    "import", "index a snapshot file as a new iMI version",
    textwrap.fill(
        "Make a new version of an iMI from a raw image snapshot: its chunk map (xxh3-128 per "
        "64 KiB chunk), and its bytes either left in the file (the version's first source) or "
        "copied into the store (--copy).", 78),
    "example:\n  icbd-cache import /snap/lab-7.img --imi lab --store /var/lib/icbd-cache/store\n"
    "  icbd-cache import lab.img --imi lab --version 8 --copy --pin --source "
    "nbd://master/lab@8",
    (Option("file", positional=True, help="the raw image (a read-only snapshot)"),
     Option("imi", required=True, metavar="IMI", help=f"iMI name ({_NAME_RULE})"),
     Option("version", metavar="VERSION",
            help=f"version name (default: next number; {_NAME_RULE})"),
     store_option(),
     store_size_option("bound of the store's chunks (e.g. 50G; with --copy, cold unpinned "
                       "chunks are evicted to make room)"),
     Option("copy", "bool", default=False, help="copy the bytes into the store"),
     Option("source", "list", metavar="URI",
            help="another source to fault from when the file is gone: an image file or "
                 "nbd://HOST[:PORT]/EXPORT (repeatable)"),
     Option("pin", "bool", default=False, help="never evict this version's chunks"),
     Option("no-latest", "bool", default=False, help="do not make it the latest"),
     Option("kernel", metavar="FILE", help="the version's kernel file (PXE)"),
     Option("initrd", metavar="FILE", help="the version's initrd file (PXE)"),
     Option("force", "bool", default=False,
            help="replace an existing version (refused while clients run it)"),
     Option("force-in-use", "bool", default=False,
            help="with --force: replace it even while clients run it (their open "
                 "connections keep the old bytes; a reconnecting client gets the new ones)")),
    doc="store.md")

LS = Command(
    "ls", "list iMIs and versions in the store",
    textwrap.fill(
        "List every version in the store: its size, the bytes of its chunks held here (HELD, "
        "and HELD% of its non-zero bytes), whether it is pinned, and (*) the latest version "
        "of its iMI.", 78),
    "example:\n  icbd-cache ls --store /var/lib/icbd-cache/store",
    (store_option(),
     Option("json", "bool", default=False, help="a JSON list, with each version's sources")),
    doc="store.md")

STATS = Command(
    "stats", "cache counters: hits, misses, coalesced, bytes per source",
    textwrap.fill(
        "Print the store's counters, summed over every server that used it: hits, misses, "
        "coalesced, faults, fault_errors, corrupt_chunks, prefetched, evicted_bytes, "
        "held_bytes, chunks, and bytes_from:SOURCE per source that answered; on a master's "
        "store master_* (chunks served), on a site's replica_* (chunks pulled) and the "
        "replica's state (replica.*: master, cut off or not, complete and incomplete "
        "versions; docs/replica.md). A running server adds its counts about every 5 s and at "
        "shutdown; a counter never counted shows 0.", 78),
    "example:\n  icbd-cache stats --store DIR --json",
    (store_option(), Option("json", "bool", default=False, help="one JSON object")),
    doc="store.md")

VERIFY = Command(
    "verify", "check every chunk of a store against its digest",
    textwrap.fill(
        "Read every chunk of the store and check it against its digest, and the held-bytes "
        "counter against the chunks; name every version a client could not read in full "
        "(chunks missing with no source left, a chunk map that is not its manifest) and every "
        "pending version; --repair deletes bad chunks (they are faulted again from the "
        "version's sources) and drops what crashed processes left.", 78),
    "example:\n  icbd-cache verify --store DIR\n  icbd-cache verify --store DIR --repair\n"
    "exit status: 0 consistent (or repaired) and every version readable in full, 1 damaged\n"
    "or a version a client could not read in full (each named), 2 no store",
    (store_option(),
     Option("repair", "bool", default=False,
            help="delete bad chunks, fix the held counter, drop the pending versions and "
                 "in-use records of processes that are gone")),
    doc="store.md")

WARM = Command(
    "warm", "fault a version's boot profile in before a boot storm",
    textwrap.fill(
        "Fault the chunks of a version's boot profile (the chunks clients read while "
        "booting it, recorded by the server), or with --all every chunk, into the store "
        "from its sources, ahead of a boot storm.", 78),
    "example:\n  icbd-cache warm lab@7 --store DIR\n  icbd-cache warm lab --all",
    (Option("version", positional=True, help="IMI@VERSION or IMI (latest)"),
     store_option(),
     Option("all", "bool", default=False, help="every chunk, not only the profile"),
     store_size_option("the bound the store is served with (evicts cold chunks as it "
                       "fills)"),
     Option("parallel", "count", default=16, metavar="N",
            help="faults in flight (default 16)")),
    doc="store.md")

PIN = Command(
    "pin", "pin (or --unpin) a version: its chunks are never evicted",
    "Pin a version: its chunks are never evicted (--unpin: they may be again).",
    "example:\n  icbd-cache pin lab@7 --store DIR",
    (Option("version", positional=True, help="IMI@VERSION, or IMI for its latest version"),
     store_option(),
     Option("unpin", "bool", default=False,
            help="unpin instead: its chunks may be evicted again")),
    doc="store.md")

STORE_UPGRADE = Command(
    "store upgrade", "upgrade a store made by an older release, in place",
    textwrap.fill(
        "A store records its format; a store from an older release is refused by every "
        "command until it is upgraded with this one (stop the processes that use it first). "
        "It gives every version its strong (BLAKE3-256) digests: from the chunks held for "
        "versions made here; a replica takes the master's signed ones on its next sync.", 78),
    "examples:\n  icbd-cache store upgrade --store /var/lib/icbd-cache/store\n"
    "\nexit status: 0 upgraded (or nothing to do), 1 the upgrade failed, 2 no store",
    (store_option(),),
    doc="store.md")

#: The store commands' tables, in ``--help`` order.
COMMANDS = (IMPORT, LS, STATS, VERIFY, WARM, PIN, STORE_UPGRADE)


def register(sub: Any) -> None:
    """Add the store commands to ``sub`` (argparse subparsers), and ``store upgrade``."""
    handlers = (cmd_import, cmd_ls, cmd_stats, cmd_verify, cmd_warm, cmd_pin)
    for command, handler in zip(COMMANDS[:-1], handlers, strict=True):
        command.add_parser(sub, handler)
    group = sub.add_parser(
        "store", help="the store itself: upgrade its format",
        description="Commands on a store as a whole. See docs/store.md.",
        epilog=STORE_UPGRADE.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    gsub = group.add_subparsers(dest="store_command", metavar="SUBCOMMAND")
    STORE_UPGRADE.add_parser(gsub, cmd_store_upgrade)

    def usage(args: argparse.Namespace) -> int:
        group.print_help()
        return 2

    group.set_defaults(func=usage, verbose=0, quiet=False)


__all__ = ["COMMANDS", "DEFAULT_STORE", "check_name", "keep_boot_files", "progress_bar",
           "register", "split_key", "store_option", "store_size_option"]
