"""A node's cached versions: the store, the shared read path, and one layer stack per version.

``icbd-cache serve --store DIR`` exports every version in the store as ``IMI@VERSION`` and the
latest of each iMI as ``IMI``; ``--export NAME=nbd://...`` adds a version faulted from an NBD
upstream (its chunk map learned as it is read).

A version replaced under its name (``import --force``) gets a new ``instance`` in the store:
:meth:`Node.resolve` opens the new one for new clients while the connections to the old one
keep its stack (and bytes) until they close. A version the master retired is kept by the
site's replica while clients run it, and served only to those clients (:meth:`Node.resolve`
with the client's address). The node records which clients run which version in the store
(:class:`~icbdcache.store.inuse.InUseTracker`), for ``ls``, ``stats``, eviction, ``import
--force``, the replica's retirement and the master's ``admin status``.

A node may run **services** beside its versions (``serve --master``: the replica,
:mod:`icbdcache.replication.replica`): each is started with the node, closed before it, and may
open sources the store only names (``icbd+http(s)://`` specs of versions being replicated,
whose credentials live in the service, never in the store).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from icbdcache.layers.base import Layer
from icbdcache.layers.fault import FaultLayer, Faults
from icbdcache.layers.profile import BootProfile
from icbdcache.layers.readahead import ReadaheadLayer
from icbdcache.layers.stats import ReadStats
from icbdcache.layers.version import VersionLayer
from icbdcache.log import kv
from icbdcache.sources import Source, open_source
from icbdcache.store import UNKNOWN, ZERO, Store, StoreError, VersionMeta, split_key, version_key
from icbdcache.store.chunks import CHUNK_SIZE, DIGEST_SIZE
from icbdcache.store.inuse import InUseTracker
from icbdcache.store.reader import StoreReader
from nbd.constants import BASE_ALLOCATION, StateFlag
from nbd.errors import NegotiationError, RequestError
from nbd.errors import ProtocolError as NBDError

#: Share of the hot set's budget that :meth:`Node.fill_hot_set` fills at the start: the rest
#: is for what the clients read outside the boot profiles.
HOT_FILL_SHARE = 0.5

log = logging.getLogger("icbdcache.node")


async def probe_upstream(uri: str, chunk_size: int, timeout: float) -> tuple[int, list[int]]:
    """Ask an NBD upstream for its export size (bytes) and which chunks read as all zeros
    (``base:allocation`` extents with NBD_STATE_ZERO covering a whole chunk). A server without
    block status gives no zero chunks. Raises OSError, TimeoutError, NBDError, RequestError."""
    from icbdcache.sources import nbd as nbd_source

    try:
        target = nbd_source.parse_uri(uri)
    except ValueError as e:
        raise OSError(f"upstream {uri}: {e}") from e
    client = await nbd_source.connect(target, timeout=timeout,
                                      meta_contexts=(BASE_ALLOCATION,))
    try:
        size = client.info.size
        zeros: list[int] = []
        if not client.meta_contexts:
            return size, zeros
        pos = 0
        while pos < size:
            length = min(size - pos, 1 << 30)
            extents = await asyncio.wait_for(client.block_status(pos, length), timeout)
            if not extents:
                break
            for n, flags in extents:
                n = min(n, size - pos)
                if flags & StateFlag.ZERO:
                    first = -(-pos // chunk_size)
                    last = (pos + n) // chunk_size if pos + n < size else -(-size // chunk_size)
                    zeros.extend(range(first, last))
                pos += n
                if pos >= size:
                    break
        return size, zeros
    finally:
        await client.close()


class NodeService(Protocol):
    """Something that runs with a node (``serve --master``: the replica)."""

    def open_source(self, spec: str, meta: VersionMeta, timeout: float) -> Source | None:
        """The source ``spec`` of version ``meta`` if this service opens that kind, else
        None. ``timeout``: seconds per read. Raises ValueError on a spec it cannot use."""

    async def start(self, node: Node) -> None:
        """Start (in the running event loop) with the node's store and read path. Raises
        OSError when it cannot (a port in use): the server then does not start."""

    async def close(self) -> None:
        """Stop; called before the node closes its store's writer."""


@dataclass
class VersionStack:
    """The layers of one opened version, bottom up: ``version`` (chunk map, hits only),
    ``fault`` (sources, single-flight), ``readahead`` (the top, shared by every connection;
    an export may put a per-client overlay over it)."""

    meta: VersionMeta
    version: VersionLayer
    fault: FaultLayer
    readahead: ReadaheadLayer
    uses: InUseTracker | None = None
    #: connections to this stack now (:meth:`attach` less :meth:`detach`)
    connections: int = 0
    #: told when the last connection ends (:meth:`detach` to 0): set by the node once the
    #: version was replaced, so the stack goes with its last client
    on_unused: Callable[[VersionStack], None] | None = None

    @property
    def key(self) -> str:
        return self.meta.key

    def attach(self, address: str) -> None:
        """A connection of the client at ``address`` to this version started."""
        self.connections += 1
        if self.uses is not None:
            self.uses.attach(self.key, self.meta.instance, address)

    def detach(self, address: str) -> None:
        """A connection of the client at ``address`` to this version ended."""
        self.connections = max(0, self.connections - 1)
        if self.uses is not None:
            self.uses.detach(self.key, address)
        if self.connections == 0 and self.on_unused is not None:
            self.on_unused(self)

    @property
    def top(self) -> Layer:
        return self.readahead

    @property
    def fingerprint(self) -> str:
        """What identifies the version's bytes: its key, size and creation time."""
        return f"version {self.meta.key} size={self.meta.size} created={self.meta.created!r}"


class Node:
    """The versions of one store, opened on demand and kept open.

    ``hot_bytes``: the store's memory tier (bytes). ``source_timeout`` is seconds per source
    request; ``fault_timeout`` the deadline of a missing chunk (well inside the kernel
    client's 30 s request timeout); ``readahead``: chunks faulted ahead of a sequential miss.
    ``services``: see the module docstring.
    """

    def __init__(self, store: Store, *, hot_bytes: int = 1 << 30, fault_timeout: float = 10.0,
                 source_timeout: float = 5.0, upstream_connections: int = 4,
                 readahead: int = 8, services: Sequence[NodeService] = ()) -> None:
        self.store = store
        self.services = list(services)
        self.stats = ReadStats()
        self.reader = StoreReader(store, hot_bytes=hot_bytes, hits=self.stats)
        self.faults = Faults(self.stats, fault_timeout=fault_timeout)
        self.source_timeout = source_timeout
        self.upstream_connections = upstream_connections
        self.readahead = max(0, readahead)
        self.versions: dict[str, VersionStack] = {}
        #: stacks of versions replaced since they were opened, while their clients still
        #: use them (each goes with its last connection: :meth:`_release`)
        self.replaced: list[VersionStack] = []
        #: released stacks whose sources are being closed, by the task closing them
        self._closing: dict[asyncio.Task[None], VersionStack] = {}
        self.inuse = InUseTracker(store)
        #: set by a service (the replica of ``serve --master``, in every worker): whether a
        #: version is withdrawn here (signed by a key this site revokes), refused to the
        #: clients that do not run it as a retired one is, from the first connection on
        self.withdrawn: Callable[[VersionMeta], bool] | None = None
        self._reported = ReadStats()
        self._task: asyncio.Task[None] | None = None
        #: :meth:`start` was called (a successor's worker that took nothing over starts
        #: its node itself).
        self.started = False
        self._inuse_task: asyncio.Task[None] | None = None
        self._fill_task: asyncio.Task[None] | None = None
        self._inuse_write: asyncio.Future[None] | None = None

    def resolve(self, name: str, client: str | None = None) -> VersionStack | None:
        """The stack of ``IMI@VERSION``, or of the latest version of ``IMI``; None if the
        store has no such version, or it is retired or :attr:`withdrawn` and ``client`` (an
        address; None: not a client's question) does not run it. A version replaced in the
        store since it was opened is opened anew (the old stack stays with its connections).
        Raises StoreError if the store cannot be read."""
        meta = self.store.version(name)
        if meta is None:
            return None
        if client is not None and (meta.retired or (self.withdrawn is not None
                                                    and self.withdrawn(meta))) \
                and not self.inuse.runs(meta.key, client):
            log.info(kv(export=name, client=client,
                        refused=f"{'retired' if meta.retired else 'signed by a revoked key'}: "
                                "served only to the clients that run it"))
            return None
        stack = self.versions.get(meta.key)
        if stack is not None and stack.meta.instance != meta.instance:
            log.info(kv(version=meta.key, replaced=f"{stack.meta.instance or '-'} -> "
                        f"{meta.instance}", open_clients="keep the old bytes"))
            self._retire(self.versions.pop(meta.key))
            stack = None
        if stack is None:
            stack = self._open(meta)
        return stack

    def _retire(self, stack: VersionStack) -> None:
        """``stack``'s version was replaced in the store: keep the stack for the connections
        that use it, and release it with the last (at once if none does; after the callbacks
        already queued when a loop runs, so a connection being made with it attaches first)."""
        self.replaced.append(stack)
        stack.on_unused = self._release
        if stack.connections == 0:
            try:
                asyncio.get_running_loop().call_soon(self._release, stack)
            except RuntimeError:  # no loop (a command's node): nothing can attach meanwhile
                self._release(stack)

    def _release(self, stack: VersionStack) -> None:
        """Drop the replaced ``stack`` once no connection uses it, and close its sources:
        without it a worker kept every replaced version's chunk map (about 4 MB a GiB) for
        good. A stack with connections again is kept."""
        if stack.connections or stack not in self.replaced:
            return
        self.replaced.remove(stack)
        stack.on_unused = None
        log.info(kv(version=stack.key, instance=stack.meta.instance or "-",
                    released="replaced, its last client gone"))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: its sources are closed with the process
        if stack.fault.sources:
            task = loop.create_task(self._close_sources(stack))
            self._closing[task] = stack
            task.add_done_callback(self._closing.pop)

    @staticmethod
    async def _close_sources(stack: VersionStack) -> None:
        """Close a released stack's sources once its own fetches ended: a client of the new
        version reading a chunk of the same digest may have joined one (it got EIO when the
        source closed under it)."""
        await stack.fault.drain()
        for src in stack.fault.sources:
            try:
                await src.close()
            except Exception as e:  # one source's failure must not keep the others open
                log.warning(kv(version=stack.key, source=src.name, close_error=e))

    def retire_replaced(self) -> int:
        """Retire the opened stacks no connection uses whose version was replaced in the store
        since (a worker no client asks for the name again kept the old stack, and its source
        files open, for good). Returns how many. Raises nothing: a store that cannot be read
        is tried again next time."""
        n = 0
        for key, stack in list(self.versions.items()):
            if stack.connections:
                continue
            try:
                meta = self.store.version(key)
            except StoreError:
                return n
            if meta is not None and meta.instance != stack.meta.instance:
                log.info(kv(version=key, replaced=f"{stack.meta.instance or '-'} -> "
                            f"{meta.instance}", open_clients="none"))
                self._retire(self.versions.pop(key))
                n += 1
        return n

    def forget(self, key: str) -> None:
        """Drop the opened stack of version ``key`` if the store no longer has the version
        (retired): the next client opens what the store holds then; take its strong map if it
        got one since it was opened."""
        stack = self.versions.get(key)
        if stack is None:
            return
        meta = self.store.version(key)
        if meta is None:
            del self.versions[key]
        elif meta.instance == stack.meta.instance and meta.strong != stack.meta.strong:
            # its signed strong map came (a store upgraded, a replica that adopted it): faults
            # check against it from now on, in every connection
            stack.version.strong = self.store.strong_map(key)
            stack.meta.strong = meta.strong

    def _open(self, meta: VersionMeta) -> VersionStack:
        sources: list[Source] = []
        for spec in meta.sources:
            try:
                src = None
                for svc in self.services:
                    src = svc.open_source(spec, meta, self.source_timeout)
                    if src is not None:
                        break
                if src is None and spec.startswith("icbd+"):
                    # a master named by a replica: only the process running it has the client
                    log.info(kv(version=meta.key, source=spec,
                                skipped="no replica in this process (serve --master)"))
                    continue
                sources.append(src or open_source(
                    spec, size=meta.size, timeout=self.source_timeout,
                    connections=self.upstream_connections))
            except ValueError as e:  # a bad source spec costs that source, not the version
                log.error(kv(version=meta.key, source=spec, error=e))
        version = VersionLayer(self.reader, meta, self.store.chunk_map(meta.key), self.stats,
                               self.store.strong_map(meta.key))
        fault = FaultLayer(version, sources, self.faults)
        readahead = ReadaheadLayer(
            fault, BootProfile(self.store, meta.key, instance=meta.instance),
            meta.chunk_size, self.readahead)
        stack = VersionStack(meta, version, fault, readahead, self.inuse)
        self.versions[meta.key] = stack
        return stack

    async def warm(self, name: str, indexes: list[int] | None, *, parallel: int = 16,
                   progress: Callable[[int], None] | None = None) -> tuple[str, int, int]:
        """Fault chunks ``indexes`` of version ``name`` (None: its boot profile) into the
        store, ``parallel`` at a time; ``progress(n)`` after each ``n`` chunks. Returns
        (version key, chunks asked, chunks that failed). Raises StoreError for an unknown
        version, ValueError when it has no boot profile yet."""
        stack = self.resolve(name)
        if stack is None:
            raise StoreError(f"unknown version {name}")
        todo = self.store.profile(stack.key) if indexes is None else indexes
        if not todo:
            raise ValueError(f"{stack.key} has no boot profile yet")
        sem = asyncio.Semaphore(max(1, parallel))
        failed = 0

        async def one(i: int) -> None:
            nonlocal failed
            async with sem:
                try:
                    if not stack.version.held(i):
                        await stack.fault.fault(i)
                except OSError:
                    failed += 1

        for coro in asyncio.as_completed([one(i) for i in todo]):
            await coro
            if progress is not None:
                progress(1)
        return stack.key, len(todo), failed

    async def fill_hot_set(self, share: float = HOT_FILL_SHARE, batch: int = 16) -> int:
        """Copy the boot profiles' chunks of every iMI's latest version into the hot set
        (profile order, the iMIs in turn), up to ``share`` of its budget, ``batch`` chunks
        per turn of the event loop. Returns the chunks added.

        Why: a chunk enters the hot set as a new 64 KiB object, and a process's new memory
        costs a page fault per 4 KiB page when first written: 16 faults, 30 to 40 µs a chunk
        on the machine of docs/bench.md, against 5 µs to copy it into memory used before. A
        server just started would pay that on its first clients' reads (a restart before the
        morning's boot storm); this pays it before them, on the chunks they read first."""
        hot = self.reader.hot
        limit = int(hot.budget * share)
        if limit <= 0:
            return 0
        started = time.monotonic()
        metas = [m for m in self.store.versions() if not m.retired]
        if any(m.chunk_size > hot.budget for m in metas):
            # it could not keep such a chunk: each would be copied and dropped at once (with
            # --hot-size 100K and 2 workers, every profile's chunks: 4.4 GB, 3 s of CPU each)
            return 0
        queues: list[list[bytes]] = []
        for imi in sorted({m.imi for m in metas}):
            version = self.store.latest(imi)
            if version is None:
                continue
            key = version_key(imi, version)
            order = self.store.profile(key)
            if not order:
                continue
            chunk_map = self.store.chunk_map(key)
            keys = []
            for i in order:
                d = bytes(chunk_map[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
                if d not in (ZERO, UNKNOWN):
                    keys.append(d)
            queues.append(keys)
        chunks = size = 0
        pos = 0
        while queues and hot.used < limit:
            # a batch of each iMI in turn: every latest version gets its first chunks
            for keys in list(queues):
                n, b = self.reader.preload(keys[pos : pos + batch], limit)
                chunks += n
                size += b
                if pos + batch >= len(keys):
                    queues.remove(keys)
            pos += batch
            await asyncio.sleep(0)
        log.debug(kv(event="hot_set_filled", chunks=chunks, bytes=size,
                     seconds=round(time.monotonic() - started, 3)))
        return chunks

    async def add_upstream(self, name: str, uri: str) -> VersionStack:
        """Register ``name`` (``IMI@VERSION``, or ``IMI`` = ``IMI@upstream``) as a version
        faulted from the NBD upstream ``uri``. The size comes from the upstream (or from the
        store when the upstream is down and the version is known); a new version's all-zero
        chunks are learned from the upstream's ``base:allocation`` block status, so they are
        never fetched. Raises StoreError if the size cannot be known."""
        imi, version = split_key(name)
        version = version or "upstream"
        key = version_key(imi, version)
        meta = self.store.version(key)
        size: int | None = None
        zero_chunks: list[int] = []
        try:
            size, zero_chunks = await probe_upstream(uri, CHUNK_SIZE, self.source_timeout)
        except (OSError, TimeoutError, ValueError, NBDError, RequestError, NegotiationError) as e:
            log.warning(kv(upstream=uri, error=e or type(e).__name__))
        if size is None:
            if meta is None:
                raise StoreError(f"upstream {uri} is unreachable and {key} is not in the store")
            size = meta.size
        if meta is not None and meta.size != size:
            raise StoreError(f"{key}: upstream size {size} differs from the stored {meta.size}")
        if meta is None:
            meta = VersionMeta(imi, version, size, CHUNK_SIZE, [uri], created=time.time())
            chunk_map = bytearray(UNKNOWN * meta.chunks)
            for i in zero_chunks:
                chunk_map[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] = ZERO
            # another process may have made it meanwhile: then that one is it
            meta = self.store.create_version(meta, bytes(chunk_map), exists_ok=True)
        if uri not in meta.sources:
            def add(m: VersionMeta) -> None:
                if uri not in m.sources:
                    m.sources.append(uri)

            meta = self.store.update_version(key, add)
        if self.store.latest(imi) is None:
            self.store.set_latest(imi, version)
        self.versions.pop(key, None)
        return self._open(meta)

    def exports(self) -> list[tuple[str, str]]:
        """(name, description) of every version and every iMI's latest, for NBD_OPT_LIST."""
        out: list[tuple[str, str]] = []
        latest: dict[str, str] = {}
        for meta in sorted(self.store.versions(), key=lambda m: (m.imi, m.version)):
            if meta.retired:  # kept only for the clients that run it
                continue
            out.append((meta.key, f"iMI {meta.imi} version {meta.version}, {meta.size} bytes"))
            lv = self.store.latest(meta.imi)
            if lv is not None:
                latest[meta.imi] = lv
        out += [(imi, f"latest version of iMI {imi} (now {v})") for imi, v in latest.items()]
        return out

    async def start(self) -> None:
        """Start the periodic task that persists counters and boot profiles, then the
        services. Raises what a service's start raises (after closing the ones started)."""
        loop = asyncio.get_running_loop()
        self.started = True
        self.store.stand_aside_for(loop)  # the writer's puts do not wait for the GIL
        self._task = loop.create_task(self._persist_loop())
        self._inuse_task = loop.create_task(self._inuse_loop())
        self._fill_task = loop.create_task(self._fill())
        started: list[NodeService] = []
        try:
            for svc in self.services:
                await svc.start(self)
                started.append(svc)
        except BaseException:
            self.services = started
            raise

    async def _fill(self) -> None:
        try:
            await self.fill_hot_set()
        except Exception as e:  # (StoreError, lmdb's) a cache left cold is slower, not wrong
            log.warning(kv(event="hot_set_fill", error=e))

    async def _persist_loop(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(1.0)
            self.reader.flush_recent()  # access ticks: to the writer every second
            n += 1
            if n % 5 == 0:
                self.persist()
                self.retire_replaced()

    async def _inuse_loop(self) -> None:
        """Write the in-use record within a second of a change, and every minute anyway (in
        a worker thread: the write may wait for another process's transaction)."""
        last = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            if self.inuse.dirty or now - last > 60.0:
                last = now
                self._inuse_write = loop.run_in_executor(None, self.inuse.write,
                                                         self.inuse.snapshot())
                try:
                    await asyncio.shield(self._inuse_write)
                except StoreError as e:
                    log.warning(kv(inuse="record", error=e))

    def persist(self) -> None:
        """Write counter deltas, access ticks and changed boot profiles to the store (through
        the writer)."""
        self.reader.flush_recent()
        s, r = self.stats, self._reported
        for name in ReadStats.COUNTERS:
            delta = getattr(s, name) - getattr(r, name)
            if delta:
                self.reader.count(name, delta)
                setattr(r, name, getattr(s, name))
        for v in self.versions.values():  # not the replaced ones: their profile is stale
            try:
                v.readahead.profile.save()
            except StoreError as e:
                log.warning(kv(profile=v.key, error=e))

    async def close(self) -> None:
        for svc in self.services:
            try:
                await svc.close()
            except Exception as e:  # one service's failure must not keep the store open
                log.error(kv(service=type(svc).__name__, close_error=e))
        for task in (self._task, self._inuse_task, self._fill_task):
            if task is not None:
                task.cancel()
        if self._inuse_write is not None:  # a write in a worker thread ends before the store
            await asyncio.wait([self._inuse_write])
        self.persist()
        try:
            self.inuse.write(self.inuse.snapshot(closing=True))
        except StoreError as e:
            log.warning(kv(inuse="record", error=e))
        for task in list(self._closing):  # still waiting for their fetches: closed now
            task.cancel()
        for v in [*self.versions.values(), *self.replaced, *self._closing.values()]:
            for src in v.fault.sources:
                await src.close()
        self.reader.close()
