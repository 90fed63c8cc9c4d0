"""The replica: a site's loop that keeps its store in step with a master (docs/replica.md).

What it does, in order, and why:

1. **Register** (``POST /v1/sites/SITE/register`` with the ``--subscribe`` list); the answer
   gives the subscriptions (the master's view: the admin may add some), the keep-alive interval
   and the generation.
2. **Keep-alive** every ``interval`` seconds (a task of its own): state (``idle``, ``syncing``,
   ``cut-off``, ``error``), the error, the version being pulled, bytes behind, and per version
   of a subscribed iMI the bytes held and needed.
3. **Learn of changes** by long-polling ``/v1/watch?since=GENERATION`` (at most 30 s a poll;
   never a tight loop). Every answer (a change, or the poll's timeout, which retries what
   failed) is followed by a keep-alive, whose answer carries the subscriptions, then a sync.
4. **Sync**: for each subscribed iMI its newest version that is not retired is pulled: the
   manifest (checked: X-Icbd-Manifest = xxh3-128 of the body = the catalog's ``manifest``),
   stored at once with the source ``icbd+http(s)://MASTER/IMI@VERSION`` so that a site serving
   with ``serve --master`` can boot it before it is complete (misses fault from the master,
   :mod:`icbdcache.sources.master`); then the chunks the store lacks (``Store.missing`` of its
   distinct non-zero digests: every chunk for a full replication, only the new ones for a
   delta), ``batch`` digests per request, ``parallel`` requests in flight. Each chunk is checked
   against its digest: a bad one is refused, counted (``replica_corrupt_chunks``) and asked for
   again in a later round; a chunk the master lacks is retried in a later round, then reported.
   One committer writes the verified chunks (``Store.write_batch`` in a worker thread): all
   the batches queued while the previous transaction ran, at most COMMIT_BYTES, in one
   transaction, while the requests go on; at most ``parallel`` batches wait for it, so a slow
   store slows the requests (back-pressure). The counters of those batches are added in the
   same transaction as their chunks, and what an interrupted pull committed is never fetched
   again; once committed, a transaction's pages leave the page cache (UNCACHED_COMMITS). (Not
   the node's BatchWriter: a write error must reach the pull, with its reason.)
   When every chunk is held the version is made the iMI's ``latest``, only then.
5. **Pinning**: a version is pinned when its pull starts (so eviction cannot undo the pull),
   after a check that the store's bound (``--store-size``) can hold it beside the pinned
   versions; a store that cannot is the error ``store full``, and the pull of that version
   stops (the versions held stay intact and served). Versions older than the newest complete
   one stay pinned until retired.
6. **Retired** versions are unpinned and deleted, unless one is the only complete version of its
   iMI: then it is kept (and served), with a log line saying why.

7. **A master that changes** (docs/replication.md): every answer names the master's store
   (``master_id``). When the id behind the URL changes, the generation goes backwards, or a
   keep-alive answer says the site is unknown, the replica registers again with its own
   subscriptions. A manifest that differs from the one the site adopted for a version it holds
   (complete or not) is refused loudly (``conflicts`` in the state, an error each sync): the held
   version keeps serving, never a mix of two images under one name.
8. **In use**: the keep-alive reports which clients run which version here (the serving
   processes' in-use records, :mod:`icbdcache.store.owners`), for the master's ``admin
   status`` and ``admin retire``. A retired version that clients still run is kept (marked
   retired: served only to them) until none does, then deleted.

Cut off from the master (refused, timed out, 5xx), the replica backs off 0.5 s doubling to 10 s,
keeps everything complete served, and says ``cut-off`` with the time since. Its state is kept in
the store record ``replica/state`` (JSON, :func:`read_state`), so ``icbd-cache stats`` shows it
from any process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icbdcache.log import Throttled, kv
from icbdcache.replication.client import (
    Catalog,
    Manifest,
    MasterAuthError,
    MasterClient,
    MasterError,
    MasterNotFound,
    MasterProtocolError,
    MasterTLSError,
    MasterUnreachable,
    TransferCounters,
    manifest_digest,
)
from icbdcache.replication.registry.base import VersionRecord
from icbdcache.replication.signing import SignatureError, Trust, check_maps, statement_of
from icbdcache.sources import Source
from icbdcache.sources.master import MasterSource, is_master_spec, master_spec
from icbdcache.store import Store, StoreError, VersionInUse, VersionMeta
from icbdcache.store.bootfiles import (
    INITRD_NAME,
    KERNEL_NAME,
    BootFilesError,
    boot_root,
    check_key,
    file_sha256,
    kept,
    record_kept,
)
from icbdcache.store.chunks import (
    DIGEST_SIZE,
    STRONG_SIZE,
    STRONG_UNKNOWN,
    UNKNOWN,
    ZERO,
    digest,
    distinct_chunks,
    strong_digest,
)
from icbdcache.store.owners import describe

log = logging.getLogger("icbdcache.replica")
warn = Throttled(log)

#: Key of the replica's state in the store's ``records`` database (JSON).
STATE_RECORD = "replica/state"
#: Back-off while the master is unreachable: first and longest wait, seconds.
BACKOFF = (0.5, 10.0)
#: Shortest time between the starts of two watches (seconds): a watch answered at once
#: must not make a tight loop.
WATCH_GAP = 1.0
#: Rounds over a version's missing chunks that may bring nothing before the pull gives up
#: (until the next sync).
MAX_IDLE_ROUNDS = 3


#: Most bytes of chunks committed in one LMDB transaction by a pull.
COMMIT_BYTES = 64 << 20
#: Whether a pull's transactions drop the pages they appended to the store's file from the
#: page cache once committed (``Store.write_batch(uncached=True)``). A pull's largest cost was
#: the kernel copying its transactions into page-cache pages it had to find: 0.4 to 0.9 GB/s
#: into pages not used for a while (this VM hands them back to its host), 6 GB/s into pages
#: just freed. Dropped, each transaction's pages come back for the next one, and a pull does
#: not fill the page cache with chunks no client has asked for. (The checks after the pull
#: read the first page of each new chunk back: LMDB looks at it on every lookup.)
UNCACHED_COMMITS = True
#: Seconds a version signed by a revoked key stays marked retired before it may be deleted:
#: a serving process records a client that attached within a second (store/inuse.py), and
#: one that attached just before the mark must be found, so that its version is kept.
WITHDRAW_SETTLE = 2.0
#: Prefix of the store records that say when a version was marked retired because a revoked
#: key signed it (seconds since the epoch, as text): every process waits for the same mark.
WITHDRAWN_PREFIX = "withdrawn/"
#: Seconds an incomplete version's held/need scan is reused in state reports.
REPORT_EVERY = 10.0


@dataclass
class _Fetched:
    """What one chunk request brought: good chunks (digest, bytes or a read-only view into
    the body received, :meth:`MasterClient.chunk_views`) and its counts."""

    chunks: list[tuple[bytes, bytes | memoryview]] = field(default_factory=list)
    bytes: int = 0
    wire: int = 0
    corrupt: int = 0
    missing: int = 0


class PullError(Exception):
    """A version could not be completed now (chunks the master lacks, chunks that kept failing
    their digest, a store full or failing); the message says which. Retried at the next sync."""


class StoreFull(PullError):
    """The store's bound cannot hold the version beside the pinned versions."""


class ManifestConflict(PullError):
    """The master's manifest of a version differs from the one this site adopted for it."""


class ManifestRefused(PullError):
    """The master's manifest is not signed by a key this site trusts (or its signed statement
    does not describe it): nothing of it is taken."""


@dataclass
class ReplicaConfig:
    """Settings of a replica. ``site``: its name at the master; ``subscribe``: iMIs to
    subscribe to at registration; ``address``: its NBD ``HOST:PORT`` for the admin's view;
    ``batch``: digests per chunk request; ``parallel``: chunk requests in flight;
    ``watch_timeout``: seconds of one long poll; ``once``: pull what is subscribed, then stop;
    ``progress``: a progress bar (None: when stderr is a terminal); ``on_demand``: take each
    version's manifest only (no background pull: a chunk crosses from the master when a
    client first reads it, see :meth:`Replica.adopt`); ``trust``: the keys a manifest must
    be signed by (:class:`~icbdcache.replication.signing.Trust`; the default trusts none and
    takes nothing)."""

    site: str
    subscribe: list[str] = field(default_factory=list)
    address: str = ""
    batch: int = 256
    parallel: int = 3
    watch_timeout: float = 30.0
    once: bool = False
    on_demand: bool = False
    once_cutoff_limit: float = 60.0
    progress: bool | None = None
    trust: Trust = field(default_factory=Trust)


@dataclass
class Counters:
    """What the replica moved since it started. Bytes: ``wire_bytes`` of chunk streams as
    received, ``chunk_bytes`` of good chunks received; ``chunks`` received good, ``corrupt``
    refused for a wrong digest, ``missing`` MISSING frames, ``requests`` chunk requests."""

    wire_bytes: int = 0
    chunk_bytes: int = 0
    chunks: int = 0
    corrupt: int = 0
    missing: int = 0
    requests: int = 0


def read_state(store: Store) -> dict[str, Any] | None:
    """The replica state record of ``store`` (see :meth:`Replica.state_dict`), or None."""
    raw = store.record(STATE_RECORD)
    if raw is None:
        return None
    try:
        out = json.loads(raw)
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


class Replica:
    """The sync loop of one site against the master behind ``client``, filling ``store``.

    :meth:`run` runs until cancelled (or, with ``config.once``, until what is subscribed is
    pulled) and returns an exit status. ``on_version``: called with ``IMI@VERSION`` when a
    version is stored, completed or deleted (a node drops its opened copy). Errors of the
    master and of the store are caught, reported and retried; nothing is raised but
    CancelledError.
    """

    def __init__(self, store: Store, client: MasterClient, config: ReplicaConfig,
                 on_version: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.client = client
        self.config = config
        self.on_version = on_version
        self.subscriptions: list[str] = list(config.subscribe)
        #: Subscribed iMIs found absent from the master's catalog (warned once each).
        self._absent_told: set[str] = set()
        #: (version, error) of pulls that failed and were logged at ERROR (once each).
        self._errors_told: set[tuple[str, str]] = set()
        self.interval = 10.0
        self.generation = -1
        self.catalog: Catalog | None = None
        self.state = "syncing"
        self.error: str | None = None
        self.cut_off_since: float | None = None
        self.pulling: str | None = None
        self.counters = Counters()
        self.registered = False
        #: the store id of the master this replica registered with (None: not yet)
        self.master_id: str | None = None
        #: IMI@V -> (manifest held here, the master's) of versions whose manifest changed
        self.conflicts: dict[str, tuple[str, str]] = {}
        self._kept_logged: set[str] = set()
        self._revoked_logged: set[str] = set()  # versions logged as signed by a revoked key
        self._inuse_logged: set[str] = set()  # withdrawn versions logged as kept for clients
        self._last_save = 0.0
        #: IMI@V -> (monotonic time, held, need) of the last held_of scan (a scan reads the
        #: whole chunk map: a complete version's result is kept, others' for REPORT_EVERY s)
        self._held: dict[str, tuple[float, int, int]] = {}
        self._file_sha: dict[tuple[str, int, int], str] = {}  # boot files: (path, mtime, size)
        self._reported_wire = 0
        self._keepalive_task: asyncio.Task[None] | None = None
        self._progress_at = 0.0
        self._writes: set[asyncio.Future[int]] = set()  # store writes
        #: the one thread that commits chunks (see :meth:`_commit`), made when first needed
        self._committer: ThreadPoolExecutor | None = None
        #: (IMI@V, instance, signature) of versions whose signature was checked here
        self._verified: set[tuple[str, str, str | None]] = set()
        #: digest -> strong digest of the version being pulled (checked before storing)
        self._strong: dict[bytes, bytes] = {}

    # ------------------------------------------------------------------ state

    def _versions_report(self) -> tuple[dict[str, dict[str, Any]], int]:
        versions: dict[str, dict[str, Any]] = {}
        subs = set(self.subscriptions)
        for m in self.store.versions():
            if m.imi not in subs or m.retired:  # withdrawn: no longer offered here
                continue
            try:
                held, need = self._held_of(m.key)
            except StoreError:
                continue
            versions[m.key] = {"held": held, "need": need, "complete": held == need}
        behind = 0
        for rec in self._targets():
            v = versions.get(rec.key)
            behind += (v["need"] - v["held"]) if v is not None else rec.distinct_bytes
        return versions, behind

    def _held_of(self, key: str) -> tuple[int, int]:
        """store.held_of(key), scanned again only if incomplete and older than REPORT_EVERY s
        (progress reports come every second during a pull). Raises StoreError."""
        now = time.monotonic()
        seen = self._held.get(key)
        if seen is not None and (seen[1] == seen[2] or now - seen[0] < REPORT_EVERY):
            return seen[1], seen[2]
        held, need = self.store.held_of(key)
        self._held[key] = (now, held, need)
        return held, need

    def state_dict(self) -> dict[str, Any]:
        """The state as stored in ``replica/state`` and shown by ``stats``: ``master``,
        ``site``, ``state``, ``error``, ``cut_off_since`` (seconds since the epoch, or None),
        ``pulling``, ``behind_bytes``, ``versions`` (``{IMI@V: {held, need, complete}}``,
        bytes), ``subscriptions``, ``generation``, ``counters`` (see :class:`Counters`),
        ``updated`` (seconds since the epoch), ``pid``."""
        versions, behind = self._versions_report()
        return {
            "master": self.client.url, "site": self.config.site, "state": self.state,
            "error": self.error, "cut_off_since": self.cut_off_since, "pulling": self.pulling,
            "behind_bytes": behind, "versions": versions, "subscriptions": self.subscriptions,
            "generation": self.generation, "counters": self.counters.__dict__.copy(),
            "updated": time.time(), "pid": os.getpid(), "master_id": self.master_id,
            "conflicts": {k: {"held": h, "master": m} for k, (h, m) in self.conflicts.items()},
            "clients": self._clients(),
        }

    def save_state(self, force: bool = True) -> None:
        """Write the state record (at most once a second unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._last_save < 1.0:
            return
        self._last_save = now
        try:
            self.store.put_record(STATE_RECORD, json.dumps(self.state_dict()).encode())
        except (StoreError, OSError) as e:
            warn.warning(kv(replica="state", error=e))

    def _set(self, state: str, error: str | None = None) -> None:
        changed = (state, error) != (self.state, self.error)
        self.state, self.error = state, error
        if changed:
            self.save_state()

    def _cut_off(self, e: Exception) -> None:
        if self.cut_off_since is None:
            self.cut_off_since = time.time()
            log.warning(kv(replica=self.config.site, master=self.client.url, state="cut-off",
                           error=e, serving="complete versions"))
        self._set("cut-off", str(e))

    def _reachable(self) -> None:
        if self.cut_off_since is not None:
            log.info(kv(replica=self.config.site, master=self.client.url, state="reachable",
                        cut_off_s=round(time.time() - self.cut_off_since, 1)))
            self.cut_off_since = None
            if self.state == "cut-off":
                self._set("syncing")

    def _clients(self) -> dict[str, list[dict[str, Any]]]:
        """The clients that run each version here (``{IMI@V: [{address, mac, ...}]}``)."""
        try:
            uses = self.store.in_use()
        except StoreError as e:
            warn.warning(kv(replica="in_use", error=e))
            return {}
        return {k: [c.to_json() for c in v] for k, v in sorted(uses.items())}

    def _report(self) -> dict[str, Any]:
        versions, behind = self._versions_report()
        return {"address": self.config.address, "state": self.state, "error": self.error,
                "pulling": self.pulling, "behind_bytes": behind, "versions": versions,
                "clients": self._clients(),
                "conflicts": {k: {"held": h, "master": m}
                              for k, (h, m) in self.conflicts.items()}}

    def _apply(self, answer: dict[str, Any]) -> None:
        """Take a registration's or keep-alive's answer; a master that no longer knows this
        site, or another master behind the URL, means registering again."""
        self.subscriptions = list(answer["subscriptions"])
        self.interval = float(answer["interval"])
        self._master_seen(str(answer.get("master_id") or ""))
        if not answer.get("registered", True) and self.registered:
            log.warning(kv(replica=self.config.site, master=self.client.url,
                           master_event="does not know this site", action="register again"))
            self.registered = False

    def _master_seen(self, master_id: str) -> None:
        """An answer came from the master with store id ``master_id``: if this replica had
        registered with another, the master changed (register again, check every held
        version's manifest)."""
        if not master_id:
            return
        if self.master_id is not None and master_id != self.master_id and self.registered:
            log.warning(kv(replica=self.config.site, master=self.client.url,
                           master_event="changed", was=self.master_id, now=master_id,
                           action="register again"))
            self.registered = False

    async def _register(self) -> None:
        """Register with this site's own subscriptions. Raises MasterError."""
        answer = await self.client.register(self.config.site, self.config.address,
                                            self.config.subscribe)
        self.master_id = str(answer.get("master_id") or "") or self.master_id
        self.registered = True
        self._apply(answer)
        log.info(kv(replica=self.config.site, master=self.client.url,
                    registered=",".join(self.subscriptions) or "-", interval=self.interval,
                    master_id=self.master_id or "-"))

    # ------------------------------------------------------------------ loop

    async def run(self) -> int:
        """The loop. Returns 0 (``once``: everything subscribed is complete), 1 (``once``: a
        pull failed, credentials or TLS refused, or the master stayed unreachable for
        ``once_cutoff_limit`` seconds)."""
        delay = BACKOFF[0]
        fresh = True  # ask for the catalog at once (first time, after an outage)
        loop = asyncio.get_running_loop()
        last_watch: float | None = None  # loop time the last watch started
        self.withdraw_revoked()  # whether the master answers or not
        try:
            while True:
                try:
                    if not self.registered:
                        await self._register()
                        fresh = True
                        if self._keepalive_task is None:
                            self._keepalive_task = asyncio.ensure_future(self._keepalive_loop())
                    if fresh:
                        cat = await self.client.catalog()
                    else:
                        # a watch answered at once (a master or proxy that does not wait)
                        # must not make a tight loop: one watch per WATCH_GAP at most
                        now = loop.time()
                        if last_watch is not None and now - last_watch < WATCH_GAP:
                            await asyncio.sleep(WATCH_GAP - (now - last_watch))
                        last_watch = loop.time()
                        cat = await self.client.watch(self.generation, self.config.watch_timeout)
                    self._reachable()
                    fresh = False
                    delay = BACKOFF[0]
                    if cat.generation < self.generation and self.registered:
                        log.warning(kv(replica=self.config.site, master=self.client.url,
                                       master_event="generation went back",
                                       was=self.generation, now=cat.generation,
                                       action="register again"))
                        self.registered = False
                    self._master_seen(cat.master_id)
                    if not self.registered:
                        self.generation = -1
                        continue  # register first, then a fresh catalog
                    self.catalog = cat
                    self.generation = cat.generation
                    self._apply(await self.client.keepalive(self.config.site, self._report()))
                    if not self.registered:
                        continue
                    ok = await self.sync(cat)
                    if self.config.once:
                        return 0 if ok else 1
                except MasterUnreachable as e:
                    self._cut_off(e)
                    if self.config.once and self.cut_off_since is not None and \
                            time.time() - self.cut_off_since > self.config.once_cutoff_limit:
                        print(f"icbd-cache replica: {e}", file=sys.stderr)
                        return 1
                    fresh = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF[1])
                except (MasterAuthError, MasterTLSError) as e:
                    log.error(kv(replica=self.config.site, master=self.client.url, error=e))
                    self._set("error", str(e))
                    if self.config.once:
                        print(f"icbd-cache replica: {e}", file=sys.stderr)
                        return 1
                    fresh = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF[1])
                except MasterError as e:
                    log.error(kv(replica=self.config.site, master=self.client.url, error=e))
                    self._set("error", str(e))
                    if self.config.once:
                        print(f"icbd-cache replica: {e}", file=sys.stderr)
                        return 1
                    fresh = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, BACKOFF[1])
        finally:
            if self._keepalive_task is not None:
                self._keepalive_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._keepalive_task
                self._keepalive_task = None

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self._apply(await self.client.keepalive(self.config.site, self._report()))
                self._reachable()
                if not self.registered:
                    await self._register()
            except MasterUnreachable as e:
                self._cut_off(e)
            except MasterError as e:
                warn.warning(kv(replica=self.config.site, keepalive="refused", error=e))
            except Exception as e:  # the loop must outlive anything one report does
                log.exception(kv(replica=self.config.site, keepalive="failed", error=e))
            self.save_state(force=False)

    # ------------------------------------------------------------------ sync

    def _targets(self) -> list[VersionRecord]:
        """Per subscribed iMI, its newest version that is not retired (catalog order)."""
        if self.catalog is None:
            return []
        out: list[VersionRecord] = []
        for imi in self.subscriptions:
            live = [v for v in self.catalog.versions if v.imi == imi and not v.retired]
            if live:
                out.append(live[-1])
        return out

    async def sync(self, cat: Catalog) -> bool:
        """Pull every subscribed iMI's newest version, then apply retirements. Returns whether
        every target is complete. Raises MasterUnreachable (the caller backs off) and other
        MasterError."""
        self.catalog = cat
        self._check_conflicts(cat)
        self.withdraw_revoked()  # before any pull, which may take long or be cut short
        ok = True
        for rec in self._targets():
            try:
                try:
                    await self.pull(rec)
                    self._errors_told = {t for t in self._errors_told if t[0] != rec.key}
                except (StoreError, OSError) as e:
                    raise PullError(f"store: {e}") from e
            except MasterNotFound as e:  # retired or withdrawn meanwhile
                log.warning(kv(pull=rec.key, error=e))
                ok = False
            except PullError as e:
                said = (rec.key, str(e))
                # once per version and error: the next syncs (every watch) meet it again,
                # and the state, `stats` and the master's status keep saying it
                (log.debug if said in self._errors_told else log.error)(
                    kv(pull=rec.key, error=e))
                if len(self._errors_told) >= 1024:
                    self._errors_told.clear()
                self._errors_told.add(said)
                self.pulling = None
                self._set("error", f"{rec.key}: {e}")
                ok = False
            finally:
                self.pulling = None
        self._retire(cat)
        absent = [imi for imi in self.subscriptions
                  if not any(v.imi == imi for v in cat.versions)]
        for imi in absent:
            if imi not in self._absent_told:
                self._absent_told.add(imi)
                log.warning(kv(replica=self.config.site, subscribe=imi,
                               error="the master has no version of this iMI (yet)"))
        if absent and self.config.once:  # nothing to pull is not "complete" for a script
            print("icbd-cache replica: the master has no version of "
                  + ", ".join(absent), file=sys.stderr)
            ok = False
        if self.conflicts:
            self._set("error", "; ".join(conflict_text(k, h, m)
                                         for k, (h, m) in sorted(self.conflicts.items())))
        elif ok:
            self._set("idle")
        self.save_state()
        with contextlib.suppress(MasterError):  # report the outcome now, not in `interval` s
            self._apply(await self.client.keepalive(self.config.site, self._report()))
        return ok

    def _check_conflicts(self, cat: Catalog) -> None:
        """Note (and log, once each) every version held here from a master whose manifest
        in ``cat`` is not the one adopted here."""
        held_here = {m.key: m for m in self.store.versions()
                     if any(is_master_spec(s) for s in m.sources)}
        found: dict[str, tuple[str, str]] = {}
        for rec in cat.versions:
            meta = held_here.get(rec.key)
            if meta is None:
                continue
            held = meta.manifest or manifest_digest(bytes(self.store.chunk_map(rec.key)))
            if held != rec.manifest:
                found[rec.key] = (held, rec.manifest)
        for key, (held, theirs) in found.items():
            if self.conflicts.get(key) != (held, theirs):
                log.error(kv(replica=self.config.site, master=self.client.url, conflict=key,
                             held=held, master_manifest=theirs,
                             kept="the version held here keeps serving; the master's is "
                                  "refused"))
        self.conflicts = found

    def _complete(self, key: str) -> bool:
        try:
            held, need = self.store.held_of(key)
        except StoreError:
            return False
        return held == need

    async def pull(self, rec: VersionRecord) -> None:
        """Make ``rec`` complete, pinned and latest in the store (``on_demand``: see
        :meth:`adopt`). Raises PullError, MasterError."""
        key = rec.key
        meta = self.store.version(key)
        if self.config.on_demand:
            await self.adopt(rec, meta)
            return
        if meta is not None and self._complete(key):
            stored = bytes(self.store.chunk_map(key))
            if manifest_digest(stored) == rec.manifest:
                meta = await self._ensure_signed(rec, meta, stored)
                if self._complete(key):  # unless chunks that were not the master's went
                    self._finish(rec, meta, announce=False)
                    return
        self.pulling = key
        self._set("syncing")
        chunk_map = await self._manifest(rec, meta)
        meta = self.store.version(key)
        assert meta is not None
        lengths = distinct_chunks(chunk_map, meta.size, meta.chunk_size)
        self._check_space(key, lengths)
        if not meta.pinned:
            self.store.set_pinned(key, True)
        self._strong = self._strong_of(key, chunk_map)
        try:
            await self._with_boot_files(rec, self._fetch_all(key, lengths))
        finally:
            self._strong = {}
        meta = self.store.version(key)
        if meta is None:
            raise PullError("the version vanished from the store during the pull")
        held, need = self.store.held_of(key)
        if held != need:
            raise PullError(f"{need - held} bytes still missing after the pull")
        self._finish(rec, meta, announce=True, need=need)

    async def adopt(self, rec: VersionRecord, meta: VersionMeta | None) -> None:
        """On demand: store ``rec``'s manifest (checked as for a pull) and its boot files, and
        make it the iMI's latest at once; its chunks are never pulled in the background, each
        is faulted from the master when a client first reads it (the read path's
        single-flight: once, however many clients ask). Not pinned: its chunks are evicted
        like any cached chunk. Raises PullError, MasterError."""
        await self._manifest(rec, meta)
        await self._boot_files(rec)
        if self.store.latest(rec.imi) != rec.version:
            self.store.set_latest(rec.imi, rec.version)
            log.info(kv(replica=self.config.site, on_demand=rec.key, latest=rec.key))
            if self.on_version is not None:
                self.on_version(rec.key)

    def _finish(self, rec: VersionRecord, meta: VersionMeta, *, announce: bool,
                need: int | None = None) -> None:
        """Pin ``rec`` and make it the iMI's latest. ``need``: its bytes, when the caller
        has just found them all held (its held/need scan is then not made again)."""
        if need is None:
            self._held.pop(rec.key, None)
        else:
            self._held[rec.key] = (time.monotonic(), need, need)
        if not meta.pinned:
            self.store.set_pinned(rec.key, True)
        if self.store.latest(rec.imi) != rec.version:
            self.store.set_latest(rec.imi, rec.version)
            announce = True
        if announce:
            if need is None:
                _, need = self.store.held_of(rec.key)
            log.info(kv(replica=self.config.site, complete=rec.key, latest=rec.key,
                        bytes=need, received_bytes=self.counters.chunk_bytes,
                        wire_bytes=self.counters.wire_bytes))
            if self.on_version is not None:
                self.on_version(rec.key)

    async def _manifest(self, rec: VersionRecord, meta: VersionMeta | None) -> bytes:
        """The version's chunk map: the stored one if it is the catalog's, else fetched,
        checked and stored (with the master as the version's source)."""
        key = rec.key
        if meta is not None:
            stored = bytes(self.store.chunk_map(key))
            held = meta.manifest or manifest_digest(stored)
            if held == rec.manifest and manifest_digest(stored) == rec.manifest:
                await self._ensure_signed(rec, meta, stored)
                return stored
            if not any(is_master_spec(s) for s in meta.sources):
                raise PullError(f"the store already has a version {key} that is not the "
                                "master's (imported here?); delete or rename it")
            # served as it is, complete or not: a version never changes under its clients
            raise ManifestConflict(conflict_text(key, held, rec.manifest))
        m: Manifest = await self.client.manifest(rec.imi, rec.version)
        if m.digest != rec.manifest:
            raise MasterError(f"manifest of {key}: digest {m.digest} differs from the "
                              f"catalog's {rec.manifest}")
        if m.size != rec.size or m.chunk_size != rec.chunk_size:
            raise MasterError(f"manifest of {key}: size {m.size}/{m.chunk_size} differs from "
                              f"the catalog's {rec.size}/{rec.chunk_size}")
        cat_id = self.catalog.master_id if self.catalog is not None else ""
        if m.master_id and cat_id and m.master_id != cat_id:
            self.registered = False
            raise MasterError(f"manifest of {key} came from master {m.master_id}, the catalog "
                              f"from {cat_id}: the master changed; starting again")
        self._check_signed(rec, m)
        new = VersionMeta(rec.imi, rec.version, m.size, m.chunk_size,
                          [master_spec(self.client.url, key)], created=time.time(),
                          manifest=m.digest, statement=m.statement, signature=m.signature)
        try:
            self.store.create_version(new, m.chunk_map, strong_map=m.strong_map or None)
        except (StoreError, OSError) as e:
            raise PullError(f"store: {e}") from e
        log.info(kv(replica=self.config.site, manifest=key, size=m.size,
                    distinct_bytes=rec.distinct_bytes))
        if self.on_version is not None:
            self.on_version(key)
        return m.chunk_map

    def _check_signed(self, rec: VersionRecord, m: Manifest) -> None:
        """Raise ManifestRefused unless ``m`` is signed by a key this site trusts and its
        signed statement describes exactly its maps (an insecure site takes it unchecked)."""
        trust = self.config.trust
        if trust.insecure:
            return
        try:
            st = trust.verify(rec.key, m.statement, m.signature)
            check_maps(st, rec.key, m.size, m.chunk_size, m.chunk_map, m.strong_map)
        except SignatureError as e:
            raise ManifestRefused(str(e)) from e

    def _signed_here(self, meta: VersionMeta, stored: bytes) -> bool:
        """Whether the version held verifies as it is: a strong map, and (unless insecure) a
        signed statement of a trusted key that describes its maps."""
        strong = self.store.strong_map(meta.key)
        if strong is None:
            return False
        trust = self.config.trust
        if trust.insecure:
            return True
        try:
            st = trust.verify(meta.key, meta.statement, meta.signature)
            check_maps(st, meta.key, meta.size, meta.chunk_size, stored, strong)
        except SignatureError:
            return False
        return True

    async def _ensure_signed(self, rec: VersionRecord, meta: VersionMeta,
                             stored: bytes) -> VersionMeta:
        """Make sure a version held here (chunk map ``stored``, the catalog's) carries a
        strong map and a signature this site accepts: otherwise (a store upgraded from an
        older format, a key rotated or revoked since) take the master's signed manifest
        again, which must have the same chunk map, and drop every held chunk that does not
        match its strong digest (fetched again). Returns the version. Raises ManifestRefused,
        ManifestConflict, MasterError."""
        memo = (rec.key, meta.instance, meta.signature)
        if memo in self._verified:
            return meta
        if not self._signed_here(meta, stored):
            m: Manifest = await self.client.manifest(rec.imi, rec.version)
            if m.chunk_map != stored:
                raise ManifestConflict(conflict_text(rec.key, manifest_digest(stored),
                                                     m.digest))
            self._check_signed(rec, m)
            if not m.strong_map:  # a master without strong maps: only an insecure site
                self._verified.add(memo)
                return meta
            try:
                dropped = await asyncio.to_thread(self.store.adopt_signed, rec.key,
                                                  m.strong_map, m.statement, m.signature,
                                                  meta.instance)
            except (StoreError, OSError) as e:
                raise PullError(f"store: {e}") from e
            st = statement_of(m)
            log.info(kv(replica=self.config.site, signed=rec.key,
                        key_id=st.key_id if st else "-", dropped_chunks=len(dropped)))
            if dropped:
                log.warning(kv(replica=self.config.site, version=rec.key,
                               dropped=f"{len(dropped)} held chunks that do not match the "
                                       "signed strong digests", action="fetched again"))
            self._held.pop(rec.key, None)
            if self.on_version is not None:
                self.on_version(rec.key)
            meta = self.store.version(rec.key) or meta
        self._verified.add((rec.key, meta.instance, meta.signature))
        return meta

    def _strong_of(self, key: str, chunk_map: bytes) -> dict[bytes, bytes]:
        """Digest -> strong digest of every chunk of version ``key`` whose strong entry is
        known (empty without a strong map)."""
        strong = self.store.strong_map(key)
        out: dict[bytes, bytes] = {}
        if strong is None:
            return out
        for i in range(len(chunk_map) // DIGEST_SIZE):
            d = chunk_map[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            e = strong[i * STRONG_SIZE : (i + 1) * STRONG_SIZE]
            if d not in (ZERO, UNKNOWN) and e != STRONG_UNKNOWN:
                out.setdefault(d, e)
        return out

    async def _with_boot_files(self, rec: VersionRecord, pull: Awaitable[None]) -> None:
        """Await ``pull`` (the version's chunks) while its boot files come
        (:meth:`_boot_files`, a task of its own): both done, or the first failure raised
        (the boot files' task is then cancelled)."""
        boot = asyncio.ensure_future(self._boot_files(rec))
        try:
            await pull
        except BaseException:
            boot.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await boot
            raise
        await boot

    async def _boot_files(self, rec: VersionRecord) -> None:
        """Keep the version's kernel and initrd as import does (best effort: a warning)."""
        meta = self.store.version(rec.key)
        if meta is None or kept(self.store, meta) is not None:
            return
        have = await asyncio.to_thread(self._kept_boot_files, rec.key)
        sent0, reused0 = self.client.counters.boot_bytes, self.client.counters.boot_reused
        st = statement_of(meta)  # its signed sha256s, when signed
        if st is not None and (st.kernel is None or st.initrd is None):
            return  # signed without boot files: none to take
        try:
            kernel = await self.client.boot_file(rec.imi, rec.version, "kernel",
                                                 have["kernel"],
                                                 st.kernel if st is not None else None)
            initrd = await self.client.boot_file(rec.imi, rec.version, "initrd",
                                                 have["initrd"],
                                                 st.initrd if st is not None else None)
        except (MasterNotFound, MasterProtocolError) as e:  # a warning, as at import
            log.warning(kv(boot_files=rec.key, error=e))
            return
        if kernel is None or initrd is None:
            return
        c = self.client.counters
        stats = {"replica_boot_bytes": c.boot_bytes - sent0,
                 "replica_boot_reused": c.boot_reused - reused0}
        try:
            # a worker thread: the files are written, and the store may wait for a chunk
            # transaction, while the chunk streams go on
            await asyncio.to_thread(self._keep_boot_files, rec.key, kernel, initrd, stats)
        except Exception as e:  # best effort, as at import
            log.warning(kv(boot_files=rec.key, error=e))

    def _keep_boot_files(self, key: str, kernel: bytes, initrd: bytes,
                         stats: dict[str, int]) -> None:
        """Write the boot files of version ``key`` (each to a temporary name, then renamed),
        note them kept and add ``stats``. Runs in a worker thread. Raises OSError,
        StoreError, BootFilesError."""
        d = boot_root(self.store.path) / check_key(key)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in ((KERNEL_NAME, kernel), (INITRD_NAME, initrd)):
            tmp = d / f".{name}.tmp"
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, d / name)
        record_kept(self.store, key)
        self.store.write_batch([], (), (), stats)

    def _kept_boot_files(self, key: str) -> dict[str, dict[str, Path]]:
        """The kernels and initrds this store keeps for versions other than ``key``, by
        sha256: ``{"kernel": {sha: path}, "initrd": {...}}``, from the newest 8 versions
        that have them (a new version mostly boots the kernel of the one before: the master
        then answers 304 and nothing is sent). Runs in a worker thread."""
        out: dict[str, dict[str, Path]] = {"kernel": {}, "initrd": {}}
        metas = sorted((m for m in self.store.versions() if m.key != key),
                       key=lambda m: m.created, reverse=True)
        found = 0
        root = boot_root(self.store.path)
        for m in metas:
            # the files in this store's boot directory (a store copied elsewhere still has
            # them there, whatever paths its metadata recorded)
            d = root / m.key
            try:
                for kind, path in (("kernel", d / KERNEL_NAME), ("initrd", d / INITRD_NAME)):
                    st = path.stat()
                    memo = (str(path), st.st_mtime_ns, st.st_size)
                    sha = self._file_sha.get(memo)
                    if sha is None:
                        sha = self._file_sha[memo] = file_sha256(path)
                    out[kind][sha] = path
            except OSError:
                continue
            found += 1
            if found >= 8:
                break
        return out

    def _check_space(self, key: str, lengths: dict[bytes, int]) -> None:
        """Raise StoreFull unless the store's bound holds the version's chunks beside those
        of every other pinned version (pinned chunks are never evicted, store.md)."""
        limit = self.store.size_limit
        if limit is None:
            return
        pinned: set[bytes] = set()
        for m in self.store.versions():
            if m.pinned and m.key != key:
                blob = bytes(self.store.chunk_map(m.key))
                pinned.update(blob[i : i + DIGEST_SIZE] for i in range(0, len(blob), DIGEST_SIZE))
        pinned.discard(ZERO)
        pinned.discard(UNKNOWN)
        held_pinned = self.store.held_bytes(pinned)
        new = sum(n for d, n in lengths.items() if d not in pinned)
        if held_pinned + new > limit:
            raise StoreFull(f"store full: {key} needs {new} bytes of chunks beside "
                            f"{held_pinned} bytes of pinned versions, and the store is bounded "
                            f"to {limit} bytes (--store-size)")

    # ------------------------------------------------------------------ chunks

    async def _fetch_all(self, key: str, lengths: dict[bytes, int]) -> None:
        missing = self.store.missing(lengths)
        total = sum(lengths[d] for d in missing)
        bar = self._bar(total, key)
        idle_rounds = 0
        try:
            while missing:
                before = len(missing)
                await self._round(key, missing, lengths, bar)
                missing = self.store.missing(missing)
                if len(missing) >= before:
                    idle_rounds += 1
                    if idle_rounds >= MAX_IDLE_ROUNDS:
                        raise PullError(
                            f"{len(missing)} chunks not received after {idle_rounds} rounds "
                            f"(the master lacks some: {self.counters.missing} missing frames; "
                            f"refused for a bad digest or length: {self.counters.corrupt})")
                    await asyncio.sleep(0.5 * idle_rounds)
                else:
                    idle_rounds = 0
        finally:
            if bar is not None:
                bar.close()

    def _bar(self, total: int, key: str) -> Any:
        show = self.config.progress
        if show is None:
            show = sys.stderr.isatty()
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=f"pull {key}", leave=False)

    async def _round(self, key: str, missing: list[bytes], lengths: dict[bytes, int],
                     bar: Any) -> None:
        """One pass over ``missing``: ``parallel`` fetchers, each a request at a time, hand
        their verified chunks to one committer, which writes everything queued meanwhile in
        one transaction (at most COMMIT_BYTES) while the fetchers go on. The queue holds at
        most ``parallel`` batches: a slow store slows the fetchers (back-pressure). Raises
        MasterError, PullError."""
        batches = iter([missing[i : i + self.config.batch]
                        for i in range(0, len(missing), self.config.batch)])
        total = sum(lengths[d] for d in missing)
        parallel = max(1, self.config.parallel)
        queue: asyncio.Queue[_Fetched | None] = asyncio.Queue(maxsize=parallel)
        done = 0

        async def fetcher() -> None:
            for batch in batches:
                await queue.put(await self._fetch_batch(batch, lengths))

        async def fetchers() -> None:
            await asyncio.gather(*(fetcher() for _ in range(parallel)))
            await queue.put(None)

        async def committer() -> None:
            nonlocal done
            end = False
            while not end:
                item = await queue.get()
                if item is None:
                    break
                items = [item]
                size = item.bytes
                while size < COMMIT_BYTES and not queue.empty():
                    nxt = queue.get_nowait()
                    if nxt is None:
                        end = True
                        break
                    items.append(nxt)
                    size += nxt.bytes
                await self._commit(items)
                done += size
                if bar is not None:
                    bar.update(size)
                self._progress(key, done, total)

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(committer())
                tg.create_task(fetchers())
        except ExceptionGroup as eg:  # the first failure says why the round stopped
            raise eg.exceptions[0] from None

    def _progress(self, key: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._progress_at >= 5.0 or done >= total:
            self._progress_at = now
            log.info(kv(pull=key, received_bytes=done, of_bytes=total,
                        pct=round(100 * done / total, 1) if total else 100.0))
        self.save_state(force=False)

    async def _fetch_batch(self, batch: list[bytes], lengths: dict[bytes, int]) -> _Fetched:
        """One chunk request: its good chunks (their digest, and their length in the chunk
        map: ``lengths``) and its counters (not committed yet). The chunks are checked once
        the stream has ended, in a worker thread (:meth:`_verify`: the hashes let go of the
        GIL, so the next streams are read meanwhile). Raises MasterError."""
        c = self.counters
        c.requests += 1
        out = _Fetched()
        tally = TransferCounters()
        got: list[tuple[bytes, bytes | memoryview]] = []
        try:
            # views into the body as received: a chunk is not copied before LMDB copies it
            async for f in self.client.chunk_views(batch, tally):
                if f.data is None:
                    out.missing += 1
                else:
                    got.append((f.digest, f.data))
        finally:
            out.wire = tally.wire_bytes
            c.wire_bytes += out.wire
            c.missing += out.missing
        if got:
            out.chunks, out.corrupt = await asyncio.get_running_loop().run_in_executor(
                None, self._verify, got, lengths, self._strong, self.pulling)
            out.bytes = sum(len(v) for _, v in out.chunks)
            c.corrupt += out.corrupt
        return out

    @staticmethod
    def _verify(got: list[tuple[bytes, bytes | memoryview]], lengths: dict[bytes, int],
                strong: dict[bytes, bytes], key: str | None
                ) -> tuple[list[tuple[bytes, bytes | memoryview]], int]:
        """In a worker thread: the chunks of ``got`` (digest, bytes) that match their
        xxh3-128 digest, their length in the chunk map (``lengths``) and the BLAKE3-256 the
        version's signed manifest gives (``strong``: digest -> strong digest; a chunk the
        xxh3 digest alone would have let in is a forged collision), each computed once; and
        how many were refused (a refused chunk is still missing: a later round asks for it
        again)."""
        good: list[tuple[bytes, bytes | memoryview]] = []
        refused = 0
        for d, data in got:
            if digest(data) != d:
                why = "digest mismatch"
            elif len(data) != lengths.get(d, len(data)):
                # its digest, but not the length of its place in the chunk map: a manifest
                # that does not describe the image (reads would come up short)
                why = f"length {len(data)}, not {lengths[d]}"
            else:
                want = strong.get(d) if strong else None
                if want is None or strong_digest(data) == want:
                    good.append((d, data))
                    continue
                why = "strong digest mismatch"
            refused += 1
            warn.warning(kv(pull=key, chunk=d.hex(), refused=why, retry="later"))
        return good, refused

    async def _commit(self, items: list[_Fetched]) -> None:
        """Write the chunks of ``items`` (verified: :meth:`_verify`) and their counters in
        one transaction, always in the same worker thread: LMDB copies each chunk into pages
        it allocates in the committing thread, and glibc gives each thread a heap of its own,
        so commits spread over the default pool's threads fault fresh, zeroed pages on every
        transaction (about 1.6x the page faults of a delta, measured with ``/usr/bin/time``).
        Raises PullError when the store refuses."""
        chunks = [kv_ for it in items for kv_ in it.chunks]
        stats = {"replica_wire_bytes": sum(it.wire for it in items),
                 "replica_chunk_bytes": sum(it.bytes for it in items),
                 "replica_chunks": len(chunks),
                 "replica_corrupt_chunks": sum(it.corrupt for it in items),
                 "replica_missing_frames": sum(it.missing for it in items),
                 "replica_requests": len(items)}
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="icbd-replica-commit")
        loop = asyncio.get_running_loop()
        self.store.stand_aside_for(loop)  # the committer's puts do not wait for the GIL
        fut = loop.run_in_executor(self._committer, self._write, chunks, stats)
        self._writes.add(fut)
        fut.add_done_callback(self._writes.discard)

        def counted(f: asyncio.Future[int]) -> None:
            # when the transaction commits, even if the pull waiting on it was cancelled
            # (the master went away): the process's counters follow the store's
            if not f.cancelled() and f.exception() is None:
                self.counters.chunk_bytes += stats["replica_chunk_bytes"]
                self.counters.chunks += stats["replica_chunks"]

        fut.add_done_callback(counted)
        try:
            # shielded: a cancelled pull still lets its transaction finish (see drain())
            await asyncio.shield(fut)
        except (StoreError, OSError) as e:
            raise PullError(f"store write failed: {e}{self._disk_note()}") from e

    def _write(self, chunks: list[tuple[bytes, bytes | memoryview]],
               stats: dict[str, int]) -> int:
        """In a worker thread: ``chunks`` (verified by :meth:`_verify`: their digests are
        not computed again) and ``stats`` in one transaction, whose pages appended to the
        store's file then leave the page cache (UNCACHED_COMMITS). Returns the bytes added.
        Raises StoreError."""
        return self.store.write_batch(chunks, (), (), stats, verified=True,
                                      uncached=UNCACHED_COMMITS)

    def _disk_note(self) -> str:
        """`` (disk full: ...)`` when the store's file system has no room left (LMDB reports
        a failed write as an I/O error), else empty."""
        try:
            st = os.statvfs(self.store.path)
        except OSError:
            return ""
        free = st.f_bavail * st.f_frsize
        if free >= 1 << 20:
            return ""
        return f" (disk full: {free} bytes free on the file system of {self.store.path})"

    async def drain(self) -> None:
        """Wait for the store writes still running in worker threads (a cancelled pull's):
        call it before the store is closed."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
        if self._committer is not None:
            self._committer.shutdown(wait=False)  # idle now; made again if needed
            self._committer = None

    # ------------------------------------------------------------------ retire

    def _retire(self, cat: Catalog) -> None:
        """Apply the catalog's retirements to the versions held here: delete a retired one,
        unless it is the only complete version of its iMI, or clients run it (then it is kept,
        marked retired: served only to them, until none does); a version offered again is
        no longer marked, unless a key revoked here signed it (:meth:`withdraw_revoked`)."""
        order = {v.key: n for n, v in enumerate(cat.versions)}
        metas = [m for m in self.store.versions() if any(map(is_master_spec, m.sources))]
        revoked = self._revoked_here(metas)
        retired = {v.key for v in cat.versions if v.retired} | revoked
        offered = {v.key for v in cat.versions if not v.retired} - revoked
        for meta in metas:
            if meta.retired and meta.key in offered:
                self._mark_retired(meta.key, False)
        self._withdraw(metas, retired, revoked, order)

    def withdraw_revoked(self) -> None:
        """Withdraw the versions held here that a key revoked here signed (``--revoked-key``),
        as retired ones are, even the only complete version of an iMI (what a revoked key
        signed may be a thief's): deleted, or, while clients run one, marked retired (served
        only to them); the iMI's latest moves to its newest complete version no revoked key
        signed, if there is one (else it stays, so that the workstations attached reconnect
        by the iMI's name). Needs no master: :meth:`run` calls it first, and :meth:`sync`
        before it pulls. A store error is logged."""
        try:
            metas = self.store.versions()  # a bundle's versions too, not only the master's
            revoked = self._revoked_here(metas)
            if revoked:
                order = ({v.key: n for n, v in enumerate(self.catalog.versions)}
                         if self.catalog is not None else {})
                self._withdraw([m for m in metas if m.key in revoked or not m.retired],
                               revoked, revoked, order)
        except (StoreError, OSError) as e:
            log.error(kv(replica=self.config.site, withdraw="revoked versions", error=e))

    def _withdraw(self, metas: list[VersionMeta], retired: set[str], revoked: set[str],
                  order: dict[str, int]) -> None:
        """Delete (or, while clients run them, mark retired) the versions of ``metas`` whose
        keys are in ``retired``; those in ``revoked`` even when they are the only complete
        version of their iMI. ``order``: the catalog's order of versions (the newest last),
        for the iMI's latest."""
        for meta in metas:
            if meta.key not in retired:
                continue
            others = [m for m in metas if m.imi == meta.imi and m.key != meta.key
                      and m.key not in retired and self._complete(m.key)]
            if meta.key in revoked and not self._settled(meta):
                if others and self.store.latest(meta.imi) == meta.version:
                    self._latest_of(meta.imi, others, order)
                continue
            if not others and self._complete(meta.key) and meta.key not in revoked:
                if meta.key not in self._kept_logged:
                    self._kept_logged.add(meta.key)
                    log.warning(kv(retired=meta.key, kept="the only complete version of its "
                                   "iMI here; deleted once another one is complete"))
                continue
            try:
                self.store.delete_version(meta.key, in_use_ok=False)
            except VersionInUse as e:
                if not meta.retired:
                    self._mark_retired(meta.key, True)
                if meta.key not in self._inuse_logged:  # once per process and version
                    self._inuse_logged.add(meta.key)
                    log.warning(kv(retired=meta.key, kept=f"{len(e.clients)} clients run it: "
                                   f"{describe(e.clients)}; served only to them, deleted "
                                   "once none does"))
                if self.store.latest(meta.imi) == meta.version and others:
                    self._latest_of(meta.imi, others, order)
                continue
            except (StoreError, OSError) as e:
                log.error(kv(retired=meta.key, error=e))
                continue
            metas = [m for m in metas if m.key != meta.key]
            if meta.key in revoked:
                with contextlib.suppress(StoreError):
                    self.store.put_record(f"{WITHDRAWN_PREFIX}{meta.key}", None)
            # check_key: a name that is not one directory under boot/ is never removed
            with contextlib.suppress(OSError, BootFilesError):
                shutil.rmtree(boot_root(self.store.path) / check_key(meta.key),
                              ignore_errors=True)
            log.info(kv(retired=meta.key, deleted="chunks evictable"))
            if self.store.latest(meta.imi) is None and others:
                self._latest_of(meta.imi, others, order)
            if self.on_version is not None:
                self.on_version(meta.key)

    def _settled(self, meta: VersionMeta) -> bool:
        """Whether the revoked version ``meta`` may be deleted now: it was marked retired for
        this at least WITHDRAW_SETTLE seconds ago, by any process (the time is the store's
        record ``withdrawn/IMI@V``), so every serving process has recorded the clients that
        ran it before the mark (:mod:`icbdcache.store.inuse`: within a second of a change),
        and since the mark no other client has been given it. If it is not marked for this
        yet it is marked now, and False."""
        raw = self.store.record(f"{WITHDRAWN_PREFIX}{meta.key}")
        try:
            since = float(raw) if raw is not None else None
        except ValueError:
            since = None
        if since is not None and meta.retired:
            return time.time() - since >= WITHDRAW_SETTLE
        self.store.put_record(f"{WITHDRAWN_PREFIX}{meta.key}", repr(time.time()).encode())
        if not meta.retired:
            self._mark_retired(meta.key, True)
        return False

    def _revoked_here(self, metas: list[VersionMeta]) -> set[str]:
        """The keys of the versions of ``metas`` whose stored statement names a key this
        site revokes (``--revoked-key``), each logged as an ERROR once. (The master's own
        manifest of such a version was asked for first, in :meth:`_ensure_signed`: one it
        signed again with a trusted key was adopted, and is not among them.)"""
        trust = self.config.trust
        if trust.insecure or not trust.revoked:
            return set()
        out: set[str] = set()
        for meta in metas:
            kid = trust.revoked_signer(meta)
            if kid is None:
                continue
            out.add(meta.key)
            if meta.key not in self._revoked_logged:
                self._revoked_logged.add(meta.key)
                log.error(kv(replica=self.config.site, version=meta.key, signed_by=kid,
                             revoked="here (--revoked-key)",
                             withdrawn="not served to new clients; deleted once none runs "
                                       "it"))
        return out

    def _mark_retired(self, key: str, retired: bool) -> None:
        def change(m: VersionMeta) -> None:
            m.retired = retired

        try:
            self.store.update_version(key, change)
        except StoreError as e:
            log.error(kv(retired=key, error=e))
            return
        if not retired:
            with contextlib.suppress(StoreError):  # a later revocation starts a mark anew
                self.store.put_record(f"{WITHDRAWN_PREFIX}{key}", None)
            log.info(kv(unretired=key, served="to every client again"))

    def _latest_of(self, imi: str, others: list[VersionMeta], order: dict[str, int]) -> None:
        newest = max(others, key=lambda m: (order.get(m.key, -1), m.created))
        self.store.set_latest(imi, newest.version)


def conflict_text(key: str, held: str, theirs: str) -> str:
    """The error of a version whose manifest changed at the master."""
    return (f"the master's manifest of {key} changed (the master's {theirs}, adopted here "
            f"{held}): a version never changes, so the master's is refused and the one held "
            "here keeps serving (publish a new version at the master)")


class ReplicaService:
    """The replica inside ``icbd-cache serve --master`` (a
    :class:`~icbdcache.node.NodeService`): runs :class:`Replica` on the node's store and opens
    the ``icbd+http(s)://`` sources of versions being replicated with its client."""

    def __init__(self, client: MasterClient, config: ReplicaConfig, *,
                 replicate: bool = True) -> None:
        self.client = client
        self.config = config
        #: False: only open master sources (a ``serve --workers`` process but the first)
        self.replicate = replicate
        self.replica: Replica | None = None
        self._task: asyncio.Task[int] | None = None
        self._node: Any = None

    def open_source(self, spec: str, meta: VersionMeta, timeout: float) -> Source | None:
        if not is_master_spec(spec) or self._node is None:
            return None
        chunk_map = bytes(self._node.store.chunk_map(meta.key))
        return MasterSource(self.client, meta.key, chunk_map, meta.size, meta.chunk_size,
                            timeout=timeout, name=spec)

    def for_worker(self, index: int) -> ReplicaService:
        """This service in worker ``index`` of ``serve --workers N``: worker 0 replicates
        (once per site), the others only open the master sources of what it replicated."""
        return self if index == 0 else ReplicaService(self.client, self.config,
                                                       replicate=False)

    async def start(self, node: Any) -> None:
        self._node = node
        trust = self.config.trust
        if trust.revoked and not trust.insecure:  # every worker, before its first client
            node.withdrawn = lambda meta: trust.revoked_signer(meta) is not None
        if not self.replicate:
            return
        self.replica = Replica(node.store, self.client, self.config,
                               on_version=self._forget)
        self._task = asyncio.ensure_future(self._run())

    def collectors(self) -> list[Any]:
        """The replica's metrics collector (:class:`~icbdcache.metrics.ReplicaCollector`)."""
        from icbdcache.metrics import ReplicaCollector

        return [ReplicaCollector(lambda: self.replica)]

    def _forget(self, key: str) -> None:
        if self._node is not None:
            self._node.forget(key)

    async def _run(self) -> int:
        assert self.replica is not None
        while True:
            try:
                return await self.replica.run()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never take the NBD server down
                log.exception(kv(replica=self.config.site, crashed=e, restart_in=5))
                self.replica._set("error", f"internal error: {e}")
                await asyncio.sleep(5.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.replica is not None:
            await self.replica.drain()
            self.replica.state = "stopped"
            self.replica.save_state()
        await self.client.close()


__all__ = ["STATE_RECORD", "Counters", "ManifestConflict", "ManifestRefused", "PullError",
           "Replica",
           "ReplicaConfig", "ReplicaService", "StoreFull", "conflict_text", "read_state"]
