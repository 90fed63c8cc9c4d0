"""``icbd-cache master``: the HTTP API v1 of docs/replication.md over the master's store and
registry (aiohttp).

Replica-facing: catalog, watch (long poll), manifests, chunk streams, boot files, register and
keep-alive. Admin: status (the holistic view), ls, subscribe, unsubscribe, retire, unretire,
forget. Every answer a replica acts on names the master's store (``master_id``, a random id made
with the store): a replica that sees another id behind the same URL knows its master changed
(docs/replication.md, 'A master that changes'). Credentials
are checked by one middleware (:mod:`icbdcache.replication.auth`; registry site tokens looked up
by their digest on each request, so a revoked one fails its next request); a master the network
reaches starts only with site credentials or ``--insecure-open``
(:mod:`icbdcache.replication.exposure`); every error is JSON ``{"error": "..."}``.

Chunk streams read each slice of a request from the store in one read transaction
(:meth:`~icbdcache.store.Store.with_chunks`: chunks copied out before it ends) and
encode/compress it in a worker thread while the previous slice is being sent, so a response
holds at most two slices (:data:`SLICE_CHUNKS` chunks each) in memory. How many run at once,
and how many one site or address may hold, is :mod:`icbdcache.replication.streams`; a stream
whose client takes less than ``stream_min_rate`` bytes a second (after ``stream_stall``
seconds of grace, counting only the time spent waiting for the client) is cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import signal
import struct
import termios
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web

from icbdcache import activation, earlyhup
from icbdcache.limits import reset
from icbdcache.log import Throttled, kv
from icbdcache.replication import wire
from icbdcache.replication.auth import (
    Auth,
    AuthConfigError,
    bearer,
    load_admin_tokens,
    load_site_tokens,
    new_token,
    server_ssl_context,
    token_digest,
    token_site_problem,
)
from icbdcache.replication.defaults import (
    ADDRESS_STREAMS,
    DEFAULT_MASTER_PORT,
    MASTER_MAP_SIZE,
    MAX_STREAMS,
    SITE_STREAMS,
    STALL_TIMEOUT,
    STREAM_MIN_RATE,
)
from icbdcache.replication.exposure import Access, decide, is_loopback_listen
from icbdcache.replication.registry import (
    Registry,
    RegistryError,
    SiteRecord,
    SiteTokenExists,
    VersionRecord,
    open_registry,
)
from icbdcache.replication.streams import Stream, StreamReleased, StreamSlots
from icbdcache.store import ChunkGet, Store, StoreError, bootfiles, version_key
from icbdcache.store.chunks import DIGEST_SIZE, UNKNOWN, ZERO, strong_hex
from icbdcache.store.owners import IN_USE_LINGER

log = logging.getLogger("icbdcache.master")

#: Chunks read, encoded and sent as one piece of a chunk stream (4 MiB of 64 KiB chunks).
SLICE_CHUNKS = 64
#: Bounds of ``/v1/watch``'s ``timeout`` (seconds) and its default.
WATCH_MIN, WATCH_MAX, WATCH_DEFAULT = 1.0, 60.0, 30.0
#: Highest zstd level the master compresses at: a replica asking for more gets this (levels
#: above 9 cost the sender many times the CPU for a few per cent of bytes).
MAX_ZSTD_LEVEL = 9
#: Most distinct iMIs one registration may subscribe to (each is a registry write).
MAX_SUBSCRIBE = 256
#: Lists and objects nested deeper than this in a request body are refused (no body of the
#: API nests more than a few levels; json.loads recurses once per level).
MAX_JSON_DEPTH = 64


def _nested_deeper(raw: bytes, limit: int) -> bool:
    """Whether lists and objects in ``raw`` (JSON text) open deeper than ``limit`` levels
    (brackets in strings counted too: a body of this API holds no such string)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for c in raw:
        if c == 0x5B or c == 0x7B:  # [ {
            depth += 1
            if depth > limit:
                return True
        elif c == 0x5D or c == 0x7D:  # ] }
            depth -= 1
    return False


#: Seconds between flushes of the master's counters into the store's ``stats``.
STATS_FLUSH = 5.0
#: Cache-Control of answers that never change (manifests, boot files, chunks by digest).
IMMUTABLE = "public, max-age=31536000, immutable"
#: Keys of :class:`Master`'s counters (``admin status`` ``master``; in the store's stats
#: with the prefix ``master_``).
COUNTERS = ("chunk_requests", "chunks_sent", "chunks_missing", "raw_bytes", "wire_bytes",
            "manifests")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


_bad_name = wire.bad_name


def _int(value: Any) -> int:
    """A count from a replica's report (anything not a number: 0)."""
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def latest_versions(records: list[VersionRecord]) -> dict[str, VersionRecord]:
    """Each iMI's latest version: its last record in registry order (publication order,
    oldest first) that is not retired."""
    return {r.imi: r for r in records if not r.retired}


def site_view(site: SiteRecord, latest: dict[str, VersionRecord], now: float) -> dict[str, Any]:
    """One site of ``admin status``: its record, ``age`` (seconds since its last keep-alive,
    None if never), ``state`` (``down`` when not up) and ``lag`` per subscribed iMI."""
    report = site.report or {}
    reported = report.get("versions")
    versions: dict[str, Any] = reported if isinstance(reported, dict) else {}
    lag: dict[str, Any] = {}
    for imi in site.subscriptions:
        rec = latest.get(imi)
        if rec is None:
            lag[imi] = {"latest": None, "complete": True, "behind_bytes": 0}
            continue
        held = versions.get(rec.key)
        if isinstance(held, dict):
            complete = bool(held.get("complete"))
            behind = 0 if complete else max(0, _int(held.get("need")) - _int(held.get("held")))
        else:
            complete, behind = False, rec.distinct_bytes
        lag[imi] = {"latest": rec.key, "complete": complete, "behind_bytes": behind}
    clients = report.get("clients")
    return {
        "name": site.name, "address": site.address or str(report.get("address") or ""),
        "clients": clients if isinstance(clients, dict) else {},
        "up": site.up, "last_seen": site.last_seen or None,
        "age": round(now - site.last_seen, 3) if site.last_seen else None,
        "state": str(report.get("state") or "registered") if site.up else "down",
        "error": report.get("error"), "pulling": report.get("pulling"),
        "behind_bytes": report.get("behind_bytes"),
        "subscriptions": list(site.subscriptions), "versions": versions, "lag": lag,
        "token_created": site.token_created or None,
    }


@dataclass
class _Pace:
    """A chunk stream's bytes handed to the transport and seconds spent waiting for the
    client to take them."""

    handed: int = 0
    taken: int = 0
    waited: float = 0.0


def _unsent(transport: asyncio.BaseTransport | None) -> int:
    """Bytes written to ``transport`` that its peer has not taken: the transport's buffer
    and the kernel's send queue (SIOCOUTQ)."""
    if transport is None:
        return 0
    size = getattr(transport, "get_write_buffer_size", None)  # uvloop's: no WriteTransport
    n = int(size()) if size is not None else 0
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            n += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                b"\0\0\0\0"))[0]
    return n


@dataclass
class MasterConfig:
    """Settings of ``icbd-cache master`` (times in seconds)."""

    store: str
    host: str = "0.0.0.0"
    port: int = DEFAULT_MASTER_PORT
    registry: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    client_ca: str | None = None
    token_file: str | None = None
    admin_token_file: str | None = None
    down_after: float = 30.0
    keepalive_interval: float = 5.0
    max_streams: int = MAX_STREAMS
    site_streams: int = SITE_STREAMS
    address_streams: int = ADDRESS_STREAMS
    stream_min_rate: int = STREAM_MIN_RATE
    stream_stall: float = STALL_TIMEOUT
    insecure_open: bool = False


class Master:
    """The API over ``store`` and ``registry``. ``keepalive_interval``: seconds between
    keep-alives asked of replicas; ``access``: how it lets sites in, shown by ``admin
    status`` (None: not decided by :func:`serve`, e.g. a master in a test). Chunk streams:
    ``max_streams`` at once, ``site_streams`` per site known by its token,
    ``address_streams`` per address otherwise, ``stream_min_rate`` bytes a second after
    ``stream_stall`` seconds (None: the module's defaults, as they are when the master is
    made)."""

    def __init__(self, store: Store, registry: Registry, auth: Auth | None = None, *,
                 keepalive_interval: float = 5.0, access: Access | None = None,
                 max_streams: int | None = None, site_streams: int | None = None,
                 address_streams: int | None = None, stream_min_rate: int | None = None,
                 stream_stall: float | None = None) -> None:
        self.store = store
        self.registry = registry
        self.master_id = store.identity or ""
        self.auth = auth or Auth()
        self.access = access
        self.keepalive_interval = keepalive_interval
        self.counters: Counter[str] = Counter()
        self._unflushed: Counter[str] = Counter()
        self._file_sha: dict[tuple[str, int, int], str] = {}  # (path, mtime ns, size) -> sha
        self.slots = StreamSlots(MAX_STREAMS if max_streams is None else max_streams)
        self.site_streams = SITE_STREAMS if site_streams is None else site_streams
        self.address_streams = ADDRESS_STREAMS if address_streams is None else address_streams
        self.min_rate = max(1, STREAM_MIN_RATE if stream_min_rate is None else stream_min_rate)
        self.stall = STALL_TIMEOUT if stream_stall is None else stream_stall
        #: What peers can cause at will, one line a second per reason.
        self.refusals = Throttled(log, level=logging.INFO)
        self._closing = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._registry: Any = None
        #: What the last scrape read of the registry (:meth:`metrics`).
        self.scraped: dict[str, Any] = {}

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (one of :data:`COUNTERS`)."""
        self.counters[name] += n
        self._unflushed[name] += n

    # ------------------------------------------------------------------ app

    def app(self) -> web.Application:
        """The aiohttp application (routes, middlewares, background tasks)."""
        app = web.Application(middlewares=[self._errors, self._check_auth])
        p = wire.API
        app.router.add_get(f"{p}/catalog", self.catalog)
        app.router.add_get(f"{p}/watch", self.watch)
        app.router.add_get(p + "/manifest/{imi}/{version}", self.manifest)
        app.router.add_get(p + "/signature/{imi}/{version}", self.signature)
        app.router.add_post(f"{p}/chunks", self.chunks)
        app.router.add_get(p + "/chunk/{digest}", self.chunk)
        app.router.add_get(p + "/boot/{imi}/{version}/{which}", self.boot)
        app.router.add_post(p + "/sites/{site}/register", self.register)
        app.router.add_post(p + "/sites/{site}/keepalive", self.keepalive)
        app.router.add_get(f"{p}/admin/status", self.admin_status)
        app.router.add_get(f"{p}/admin/ls", self.admin_ls)
        app.router.add_post(f"{p}/admin/subscribe", self.admin_subscribe)
        app.router.add_post(f"{p}/admin/unsubscribe", self.admin_unsubscribe)
        app.router.add_post(f"{p}/admin/retire", self.admin_retire)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post(f"{p}/admin/unretire", self.admin_unretire)
        app.router.add_post(f"{p}/admin/forget", self.admin_forget)
        app.router.add_post(f"{p}/admin/site/add", self.admin_site_add)
        app.on_startup.append(self._start)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _start(self, app: web.Application) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop()),
                       asyncio.create_task(self._watch_sites())]

    async def _shutdown(self, app: web.Application) -> None:
        self._closing.set()  # pending long polls answer now
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.flush_stats()

    async def flush_stats(self) -> None:
        """Add the counters not yet written to the store's ``stats`` (``master_NAME``)."""
        delta = {f"master_{k}": v for k, v in self._unflushed.items() if v}
        self._unflushed.clear()
        if delta:
            try:
                await asyncio.to_thread(self.store.write_batch, stats=delta)
            except StoreError as e:
                log.warning(kv(event="stats_flush", error=e))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_FLUSH)
            await self.flush_stats()

    async def _watch_sites(self) -> None:
        """Log each site going down or coming back (the registry computes ``up``)."""
        was: dict[str, bool] = {}
        while True:
            await asyncio.sleep(max(0.5, min(5.0, self.registry.down_after / 2)))
            try:
                sites = await self.registry.sites()
            except RegistryError as e:
                log.warning(kv(event="registry", error=e))
                continue
            for s in sites:
                if s.name in was and was[s.name] != s.up:
                    (log.info if s.up else log.warning)(
                        kv(event="site_up" if s.up else "site_down", site=s.name,
                           last_seen=round(s.last_seen, 3)))
                was[s.name] = s.up

    # ------------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = _error(e.status, e.reason)
        except RegistryError as e:
            log.error(kv(event="registry", path=request.raw_path, error=e))
            resp = _error(503, f"registry: {e}")
        except StoreError as e:
            log.error(kv(event="store", path=request.raw_path, error=e))
            resp = _error(500, f"store: {e}")
        except ConnectionError:
            raise  # the peer is gone: nobody to answer
        except Exception as e:  # a bug or an LMDB failure: still a JSON answer, and logged
            log.exception(kv(event="error", path=request.raw_path, error=e))
            resp = _error(500, f"internal error: {e}")
        if not resp.prepared and "Cache-Control" not in resp.headers:
            resp.headers["Cache-Control"] = "no-store"  # only immutable answers are cacheable
        # raw_path: as received, percent-encoded (a decoded %0A would forge a log line)
        log.debug(kv(request=request.method, path=request.raw_path, status=resp.status,
                     peer=request.remote))
        return resp

    @web.middleware
    async def _check_auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        auth_header = request.headers.get("Authorization")
        if request.path.startswith(f"{wire.API}/admin/") or request.path == "/metrics":
            refused = self.auth.check_admin(auth_header, request.remote)
            if refused is not None:
                return _error(*refused)
        else:
            why = await self.refusal(request)
            if why is not None:
                return _error(401, why)
        return await handler(request)

    async def refusal(self, request: web.Request) -> str | None:
        """Why a replica-facing request is refused (logged), or None: its token (the token
        file's, else the registry's, looked up by digest now) or client certificate. Raises
        RegistryError when the registry cannot be asked."""
        if not self.auth.replica_auth:
            return None
        auth_header = request.headers.get("Authorization")
        token = bearer(auth_header)
        owner = None
        if token is not None and self.auth.file_owner(token) is None:
            owner = await self.registry.token_site(token_digest(token))
        transport = request.transport
        cert = transport.get_extra_info("peercert") if transport is not None else None
        why = self.auth.check_replica(auth_header, bool(cert), request.match_info.get("site"),
                                      registry_owner=owner)
        if why is not None:
            self.refusals.info(kv(event="refused", path=request.raw_path, peer=request.remote,
                                  why=why), "unauthorized")
        return why

    # ------------------------------------------------------------------ catalog

    async def catalog_body(self) -> dict[str, Any]:
        """``{"generation", "master_id", "versions"}``. The generation is read first: a change
        between the two reads shows up again at the next watch, never gets lost."""
        generation = await self.registry.generation()
        versions = await self.registry.versions()
        return {"generation": generation, "master_id": self.master_id,
                "versions": [asdict(r) for r in versions]}

    async def catalog(self, request: web.Request) -> web.Response:
        """``GET /v1/catalog``: :meth:`catalog_body` as JSON."""
        return web.json_response(await self.catalog_body())

    async def watch(self, request: web.Request) -> web.Response:
        """``GET /v1/watch?since=G&timeout=S``: the catalog once the generation passes ``G``,
        else after ``S`` seconds (clamped to 1..60, default 30), or at once on shutdown.
        400 if ``since`` is not an integer or ``timeout`` not a number."""
        try:
            since = int(request.query.get("since", "-1"))
            timeout = float(request.query.get("timeout", WATCH_DEFAULT))
        except ValueError:
            return _error(400, "since must be an integer and timeout a number of seconds")
        timeout = min(WATCH_MAX, max(WATCH_MIN, timeout))
        waiter = asyncio.create_task(self.registry.wait_change(since, timeout))
        closing = asyncio.create_task(self._closing.wait())
        try:
            await asyncio.wait({waiter, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiter, closing):
                if not t.done():
                    t.cancel()
        if waiter.done() and not waiter.cancelled():
            waiter.result()  # a RegistryError goes to the error middleware
        why = await self.refusal(request)  # revoked while it waited: no catalog
        if why is not None:
            return _error(401, why)
        return web.json_response(await self.catalog_body())

    async def _published(self, imi: str, version: str) -> VersionRecord | None:
        """The registry's record of a version that is offered (not retired), or None."""
        for r in await self.registry.versions(imi):
            if r.version == version and not r.retired:
                return r
        return None

    # ------------------------------------------------------------------ manifests, chunks

    async def manifest(self, request: web.Request) -> web.Response:
        """``GET /v1/manifest/IMI/VERSION``: the chunk map (16 bytes per chunk), with
        X-Icbd-Size, X-Icbd-Chunk-Size (bytes) and X-Icbd-Manifest (hex xxh3-128 of the body).
        404 unless published, not retired, and in this master's store."""
        imi, version = request.match_info["imi"], request.match_info["version"]
        key = version_key(imi, version)
        rec = await self._published(imi, version)
        if rec is None:
            return _error(404, f"{key} is not published (or retired)")
        meta = self.store.version(key)
        if meta is None:
            return _error(404, f"{key} is not in this master's store")
        body = bytes(await asyncio.to_thread(self.store.chunk_map, key))
        digest = wire.manifest_digest(body)
        strong: bytes | None = None
        if request.query.get("strong") == "1":
            strong = await asyncio.to_thread(self.store.strong_map, key)
            if strong is None:
                return _error(409, f"{key} has no strong map in this master's store (run "
                                   "icbd-cache store upgrade, or publish it again)")
        if digest != rec.manifest:
            # never serve a map that is not what was published under the name
            log.error(kv(event="manifest_mismatch", version=key, store=digest,
                         registry=rec.manifest))
            return _error(409, f"{key}: this master's store holds a chunk map (digest {digest}) "
                               f"that is not the published manifest ({rec.manifest})")
        self.count("manifests")
        headers = {"X-Icbd-Size": str(meta.size), "X-Icbd-Chunk-Size": str(meta.chunk_size),
                   "X-Icbd-Manifest": digest, wire.MASTER_ID_HEADER: self.master_id,
                   "Cache-Control": IMMUTABLE}
        if strong is not None:
            headers[wire.STRONG_HEADER] = strong_hex(strong)
            body += strong
        return web.Response(body=body, content_type=wire.CONTENT_TYPE, headers=headers)

    async def signature(self, request: web.Request) -> web.Response:
        """``GET /v1/signature/IMI/VERSION``: ``{"statement": TEXT, "signature": HEX}``, the
        signed statement of the version's manifest (not cached: a key rotation signs it
        again). 404 unless published, not retired, in this store and signed."""
        imi, version = request.match_info["imi"], request.match_info["version"]
        key = version_key(imi, version)
        if await self._published(imi, version) is None:
            return _error(404, f"{key} is not published (or retired)")
        meta = self.store.version(key)
        if meta is None:
            return _error(404, f"{key} is not in this master's store")
        if not meta.statement or not meta.signature:
            return _error(404, f"{key} is not signed (publish --signing-key)")
        return web.json_response({"statement": meta.statement, "signature": meta.signature})

    def _read_slice(self, digests: list[bytes], enc: wire.ChunkStreamEncoder, last: bool,
                    lengths: list[int | None] | None) -> tuple[bytes | bytearray, int, int]:
        """(encoded frames, missing count, frame bytes before compression) of one slice, read
        in one store read transaction and encoded before it ends (:meth:`Store.with_chunks`:
        its buffers die with it). A plain stream (``lengths``: what
        :meth:`Store.chunk_lengths` found) is built with one copy straight from LMDB into the
        slice; a compressed one goes through the compressor. Raises StoreError if a chunk
        came or went since its length was taken (the stream is then cut short). Runs in a
        worker thread."""
        if lengths is not None:
            plain = lengths

            def build_plain(get: ChunkGet) -> tuple[bytes | bytearray, int, int]:
                head = wire.HEADER_SIZE
                size = sum(head + (n or 0) for n in plain) + (head if last else 0)
                out = bytearray(size)
                pos = miss = 0
                for d, n in zip(digests, plain, strict=True):
                    buf = get(d)
                    if (len(buf) if buf is not None else None) != n:
                        raise StoreError(f"chunk {d.hex()} changed while being sent")
                    out[pos : pos + head] = wire.frame_header(d, n)
                    pos += head
                    if buf is None or n is None:
                        miss += 1
                    else:
                        out[pos : pos + n] = buf
                        pos += n
                if last:
                    out[pos:] = wire.frame_header(ZERO, 0)  # the end frame
                enc.raw_bytes += size
                return out, miss, size

            return self.store.with_chunks(build_plain)

        def build_compressed(get: ChunkGet) -> tuple[bytes | bytearray, int, int]:
            raw_before = enc.raw_bytes
            parts: list[bytes] = []
            miss = 0
            for j, d in enumerate(digests):
                buf = get(d)
                miss += buf is None
                parts.append(enc.frame(d, buf, flush=j == len(digests) - 1))
            if last:
                parts.append(enc.end())
            return b"".join(parts), miss, enc.raw_bytes - raw_before

        return self.store.with_chunks(build_compressed)

    async def chunks(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chunks[?zstd=LEVEL]``: a chunk stream (:mod:`~icbdcache.replication.wire`)
        of the digests in the body, in order, MISSING for those not held. 400 on a body that
        is not 1..MAX_BATCH digests or a level outside 1..19 (above MAX_ZSTD_LEVEL it is sent
        at MAX_ZSTD_LEVEL), 413 over MAX_BATCH, 429 when the site (or address) holds its
        streams already, the connection reset when the body does not come within
        ``stream_stall`` seconds;
        at most ``max_streams`` are sent at once, the others wait (:class:`StreamSlots`)."""
        level: int | None = None
        if "zstd" in request.query:
            text = request.query["zstd"]
            # ASCII digits only, at most 3 of them: str.isdigit() also accepts '²' (which
            # int() refuses) and int() refuses thousands of digits
            if not (text.isascii() and text.isdigit() and len(text) <= 3) \
                    or not 1 <= int(text) <= 19:
                return _error(400, f"zstd level {text[:20]!r} is not 1 to 19")
            level = min(int(text), MAX_ZSTD_LEVEL)
        peer = request.remote or "?"
        party, limit, site = self._party(request, peer)
        tr = request.transport
        if tr is None:
            return _error(400, "the connection is gone")

        def alive() -> bool:
            return request.transport is not None and not tr.is_closing()

        s = self.slots.enter(party, limit, site, peer, alive, partial(reset, tr))
        if s is None:
            self.refusals.info(kv(event="refused", path=request.raw_path, peer=peer,
                                  party=party, why="stream limit", limit=limit),
                               "stream limit")
            return _error(429, f"{limit} chunk streams of {party} already")
        try:
            try:
                async with asyncio.timeout(self.stall):
                    body = await request.read()
            except TimeoutError:  # a stalled client: not worth an answer it will not read
                self.refusals.info(kv(event="chunks_cut", peer=peer, party=party,
                                      why=f"no body in {self.stall:g} s"), "chunks_cut")
                reset(tr)
                return _error(408, f"the body did not come in {self.stall:g} s")
            if body and len(body) % DIGEST_SIZE == 0 \
                    and len(body) // DIGEST_SIZE > wire.MAX_BATCH:
                return _error(413, f"{len(body) // DIGEST_SIZE} digests in one request "
                                   f"(at most {wire.MAX_BATCH})")
            try:
                digests = wire.parse_digests(body)
            except wire.WireError as e:
                return _error(400, str(e))
            await self.slots.run(s)
            return await self._chunks(request, level, digests, s)
        except StreamReleased:
            return _error(409, "stream released: its site came back")
        finally:
            self.slots.leave(s)

    def _party(self, request: web.Request, peer: str) -> tuple[str, int, str | None]:
        """(party, its bound of streams, the site the stream is known to belong to)."""
        token_site = self.auth.token_site(request.headers.get("Authorization"))
        if token_site is not None:
            return f"site:{token_site}", self.site_streams, token_site
        named = request.headers.get(wire.SITE_HEADER)
        if named is not None and _bad_name(named) is not None:
            named = None
        return f"addr:{peer}", self.address_streams, named

    async def _chunks(self, request: web.Request, level: int | None, digests: list[bytes],
                      stream: Stream) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": wire.CONTENT_TYPE})
        loop = asyncio.get_running_loop()
        lengths: list[int | None] | None = None
        if level is not None:
            resp.headers[wire.ENCODING_HEADER] = "zstd"
        else:
            # a plain stream's length is known: a Content-Length, not chunked encoding (which
            # costs aiohttp a copy of every slice)
            lengths = await loop.run_in_executor(None, self.store.chunk_lengths, digests)
            resp.content_length = wire.plain_stream_size(lengths)
        await resp.prepare(request)
        self.count("chunk_requests")
        enc = wire.ChunkStreamEncoder(level)
        slices = [digests[i : i + SLICE_CHUNKS] for i in range(0, len(digests), SLICE_CHUNKS)]
        pace = _Pace()

        def start(i: int) -> asyncio.Future[tuple[bytes | bytearray, int, int]]:
            part = (lengths[i * SLICE_CHUNKS : (i + 1) * SLICE_CHUNKS]
                    if lengths is not None else None)
            return loop.run_in_executor(None, self._read_slice, slices[i], enc,
                                        i == len(slices) - 1, part)

        fut = start(0)
        try:
            for i in range(len(slices)):
                out, miss, raw = await fut
                if i + 1 < len(slices):
                    fut = start(i + 1)  # read and compress the next slice while this one goes
                # counted before it is sent: a client that has the bytes sees them counted
                self.count("wire_bytes", len(out))
                self.count("raw_bytes", raw)
                self.count("chunks_missing", miss)
                self.count("chunks_sent", len(slices[i]) - miss)
                await self._send(request, resp, out, pace, stream)
            await resp.write_eof()
        except ConnectionError as e:  # the replica went away, or was too slow: not ours
            fut.cancel()
            self.refusals.info(kv(event="chunks_cut", peer=request.remote, party=stream.party,
                                  digests=len(digests), error=e), "chunks_cut")
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:  # LMDB failed mid-stream: the stream ends without its end frame
            fut.cancel()
            log.error(kv(event="chunks_failed", peer=request.remote, error=e))
        return resp

    async def _send(self, request: web.Request, resp: web.StreamResponse,
                    out: bytes | bytearray, pace: _Pace, stream: Stream) -> None:
        """Write one slice of ``stream``. The client must have taken ``min_rate`` bytes a
        second of the time spent waiting for it, after ``stall`` seconds of grace; else its
        connection is reset (its slices freed) and ConnectionResetError raised."""
        loop = asyncio.get_running_loop()
        write = asyncio.ensure_future(resp.write(out))
        pace.handed += len(out)
        tick = max(0.05, min(1.0, self.stall / 4))
        try:
            while True:
                t = loop.time()
                done, _ = await asyncio.wait({write}, timeout=tick)
                pace.waited += loop.time() - t
                if done:
                    write.result()
                    stream.moved = time.monotonic()
                    return
                taken = pace.handed - _unsent(request.transport)
                if taken > pace.taken:
                    pace.taken = taken
                    stream.moved = time.monotonic()
                if taken < self.min_rate * (pace.waited - self.stall):
                    if request.transport is not None:
                        reset(request.transport)
                    raise ConnectionResetError(
                        f"{taken} bytes taken in {pace.waited:.0f} s: under "
                        f"{self.min_rate} bytes/s after {self.stall:g} s")
        finally:
            if not write.done():
                write.cancel()
            elif not write.cancelled():
                write.exception()  # retrieved

    async def boot(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/boot/IMI/VERSION/kernel|initrd``: the boot file kept with a published
        version (:mod:`icbdcache.store.bootfiles`), 404 if none."""
        imi, version = request.match_info["imi"], request.match_info["version"]
        which = request.match_info["which"]
        if which not in ("kernel", "initrd"):
            return _error(404, f"no boot file {which!r} (kernel or initrd)")
        key = version_key(imi, version)
        meta = self.store.version(key)
        if meta is None or await self._published(imi, version) is None:
            return _error(404, f"{key} is not published (or retired)")
        kept = bootfiles.kept(self.store, meta)
        if kept is None:
            return _error(404, f"{key} has no kernel and initrd kept")
        path = kept.kernel if which == "kernel" else kept.initrd
        try:
            sha = await asyncio.to_thread(self._sha256, path)
        except OSError as e:
            return _error(404, f"{key}: its {which} cannot be read: {e}")
        headers = {"ETag": f'"{sha}"', wire.SHA256_HEADER: sha, "Cache-Control": IMMUTABLE}
        if sha in wire.etags(request.headers.get("If-None-Match", "")):
            # the replica has these bytes already (another version's kernel, most often)
            self.count("boot_not_modified")
            return web.Response(status=304, headers=headers)
        body = await asyncio.to_thread(path.read_bytes)
        self.count("boot_bytes", len(body))
        return web.Response(body=body, content_type="application/octet-stream",
                            headers=headers)

    def _sha256(self, path: Path) -> str:
        """sha256 (hex) of a boot file, remembered while its mtime and size stay. Raises
        OSError. Runs in a worker thread."""
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        sha = self._file_sha.get(key)
        if sha is None:
            sha = bootfiles.file_sha256(path)
            self._file_sha[key] = sha
        return sha

    async def chunk(self, request: web.Request) -> web.Response:
        """``GET /v1/chunk/DIGEST`` (32 hex digits): one chunk's bytes, cacheable forever by
        any HTTP cache (content-addressed, immutable). 400 on a bad digest, 404 if not held."""
        text = request.match_info["digest"]
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != DIGEST_SIZE:
            return _error(400, f"{text!r} is not a digest (32 hex digits)")
        data = await asyncio.to_thread(self.store.get_chunk, key)
        if data is None:
            return _error(404, f"chunk {text} is not held here")
        self.count("chunks_sent")
        self.count("raw_bytes", len(data))
        self.count("wire_bytes", len(data))
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"Cache-Control": IMMUTABLE, "ETag": f'"{key.hex()}"'})

    # ------------------------------------------------------------------ sites

    async def _json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        if _nested_deeper(raw, MAX_JSON_DEPTH):  # refused before json.loads recurses into
            # it (a RecursionError, whose deep traceback once broke the test runner's report)
            raise web.HTTPBadRequest(reason="the body is not JSON (or nested too deep)")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise web.HTTPBadRequest(reason="the body is not JSON (or nested too deep)") \
                from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(reason="the body is not a JSON object")
        return body

    async def _site_answer(self, site: str, known: bool = True) -> dict[str, Any]:
        """What a registration or keep-alive is answered: the site's subscriptions, the
        keep-alive interval, the generation, ``master_id``, and ``registered``: False when the
        site was unknown before this request (a master that lost it: register again)."""
        rec = await self.registry.site(site)
        return {"subscriptions": list(rec.subscriptions) if rec else [],
                "interval": self.keepalive_interval,
                "generation": await self.registry.generation(),
                "master_id": self.master_id, "registered": known}

    async def register(self, request: web.Request) -> web.Response:
        """``POST /v1/sites/SITE/register`` ``{"address", "subscribe"}``: create or update the
        site, add its subscriptions, count it as a keep-alive. 400 on a bad name or body."""
        site = request.match_info["site"]
        body = await self._json(request)
        address, subscribe = body.get("address", ""), body.get("subscribe", [])
        bad = _bad_name(site)
        if bad is None and not (isinstance(address, str) and len(address) <= 300
                                and address.isprintable()):
            bad = "address must be a string (HOST:PORT or empty, printable, 300 at most)"
        if bad is None and not (isinstance(subscribe, list)
                                and all(isinstance(x, str) for x in subscribe)):
            bad = "subscribe must be a list of iMI names"
        if bad is None:
            bad = next((m for m in map(_bad_name, subscribe) if m), None)
        if bad is None:
            subscribe = list(dict.fromkeys(subscribe))  # each once
            if len(subscribe) > MAX_SUBSCRIBE:
                bad = (f"{len(subscribe)} iMIs to subscribe to in one registration "
                       f"(at most {MAX_SUBSCRIBE})")
        if bad is not None:
            return _error(400, bad)
        await self.registry.register(site, address)
        for imi in subscribe:
            await self.registry.subscribe(site, imi)
        # the site came back (restarted, or its link did): what it streamed before is gone
        by_token = self.auth.token_site(request.headers.get("Authorization")) == site
        released = self.slots.site_back(site, request.remote or "?", by_token)
        if released:
            log.info(kv(event="site_back", site=site, streams_released=released))
        # a registration is a sign of life: the site is up (state "registered") until its
        # first keep-alive replaces this report
        await self.registry.keepalive(site, {"address": address, "state": "registered"})
        log.info(kv(event="register", site=site, address=address or "-", peer=request.remote,
                    subscribe=",".join(subscribe) or "-"))
        return web.json_response(await self._site_answer(site))

    async def keepalive(self, request: web.Request) -> web.Response:
        """``POST /v1/sites/SITE/keepalive`` with the replica's report (a JSON object, kept as
        is). 400 if the body is not an object."""
        site = request.match_info["site"]
        bad = _bad_name(site)
        if bad is not None:
            return _error(400, bad)
        report = await self._json(request)
        known = await self.registry.site(site) is not None
        await self.registry.keepalive(site, report)
        return web.json_response(await self._site_answer(site, known))

    # ------------------------------------------------------------------ admin

    async def status_body(self) -> dict[str, Any]:
        """The body of ``GET /v1/admin/status`` (docs/replication.md)."""
        generation = await self.registry.generation()
        records = await self.registry.versions()
        latest = latest_versions(records)
        now = time.time()
        sites = [site_view(s, latest, now) for s in await self.registry.sites()]
        imis: dict[str, Any] = {}
        for r in records:
            entry = imis.setdefault(r.imi, {"latest": None, "versions": []})
            if not r.retired:
                entry["versions"].append(r.version)
        for imi, rec in latest.items():
            imis[imi]["latest"] = rec.version
        return {"generation": generation, "down_after": self.registry.down_after,
                "sites": sites, "imis": imis,
                "master": {k: self.counters.get(k, 0) for k in COUNTERS},
                "access": self.access_view()}

    def access_view(self) -> dict[str, Any]:
        """``admin status``'s ``access``: how sites get in (:meth:`Access.view`), or, for a
        master not started by :func:`serve`, whether they need credentials."""
        if self.access is not None:
            return self.access.view()
        return {"sites_need_credentials": self.auth.replica_auth, "warning": None}

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: Prometheus metrics (:class:`MasterCollector`); answered like the
        admin API (loopback, or an admin token)."""
        from icbdcache.metrics import metrics_response, new_registry

        if self._registry is None:
            self._registry = new_registry(MasterCollector(self))

        async def refresh() -> None:
            self.scraped = await self.status_body()

        return await metrics_response(self._registry, refresh)

    async def admin_status(self, request: web.Request) -> web.Response:
        """``GET /v1/admin/status``: :meth:`status_body` as JSON."""
        return web.json_response(await self.status_body())

    async def admin_ls(self, request: web.Request) -> web.Response:
        """``GET /v1/admin/ls``: per iMI its latest version, every record, and the bytes of
        its distinct non-zero chunks in this store."""
        generation = await self.registry.generation()
        records = await self.registry.versions()
        latest = latest_versions(records)
        imis: dict[str, Any] = {}
        for r in records:
            entry = imis.setdefault(r.imi, {"latest": None, "distinct_bytes": 0,
                                            "versions": []})
            entry["versions"].append(asdict(r))
        for imi, entry in imis.items():
            rec = latest.get(imi)
            entry["latest"] = rec.version if rec else None
            entry["distinct_bytes"] = await asyncio.to_thread(self._distinct_of, imi)
        return web.json_response({"generation": generation, "imis": imis})

    def _distinct_of(self, imi: str) -> int:
        """Bytes of the distinct non-zero chunks of every version of ``imi`` in the store
        (what the master holds for it, shared chunks counted once)."""
        seen: dict[bytes, int] = {}
        for m in self.store.versions():
            if m.imi != imi:
                continue
            blob = self.store.chunk_map(m.key)
            for i in range(m.chunks):
                d = bytes(blob[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])
                if d not in seen and d not in (ZERO, UNKNOWN):
                    seen[d] = min(m.chunk_size, m.size - i * m.chunk_size)
        return sum(seen.values())

    async def _site_imi(self, request: web.Request) -> tuple[str, str]:
        body = await self._json(request)
        site, imi = body.get("site"), body.get("imi")
        if not isinstance(site, str) or not isinstance(imi, str):
            raise web.HTTPBadRequest(reason='the body must be {"site": NAME, "imi": NAME}')
        bad = _bad_name(site) or _bad_name(imi)
        if bad is not None:
            raise web.HTTPBadRequest(reason=bad)
        return site, imi

    async def admin_subscribe(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/subscribe`` ``{"site", "imi"}``: the site's subscriptions after."""
        site, imi = await self._site_imi(request)
        await self.registry.subscribe(site, imi)
        log.info(kv(event="subscribe", site=site, imi=imi))
        rec = await self.registry.site(site)
        return web.json_response({"site": site,
                                  "subscriptions": rec.subscriptions if rec else []})

    async def admin_unsubscribe(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/unsubscribe`` ``{"site", "imi"}``: the site's subscriptions after."""
        site, imi = await self._site_imi(request)
        await self.registry.unsubscribe(site, imi)
        log.info(kv(event="unsubscribe", site=site, imi=imi))
        rec = await self.registry.site(site)
        return web.json_response({"site": site,
                                  "subscriptions": rec.subscriptions if rec else []})

    async def _version_body(self, request: web.Request) -> tuple[str, str, dict[str, Any]]:
        body = await self._json(request)
        imi, version = body.get("imi"), body.get("version")
        if not isinstance(imi, str) or not isinstance(version, str):
            raise web.HTTPBadRequest(reason='the body must be {"imi": NAME, "version": NAME}')
        if not any(r.version == version for r in await self.registry.versions(imi)):
            raise web.HTTPNotFound(reason=f"unknown version {version_key(imi, version)}")
        return imi, version, body

    async def running(self, key: str) -> dict[str, list[dict[str, Any]]]:
        """The clients each site reported running version ``key`` (site name -> clients), from
        the sites that are up or went down less than their linger ago."""
        out: dict[str, list[dict[str, Any]]] = {}
        now = time.time()
        for site in await self.registry.sites():
            if not site.up and now - site.last_seen > IN_USE_LINGER:
                continue  # silent too long: its clients' report is stale
            clients = (site.report or {}).get("clients")
            if isinstance(clients, dict) and isinstance(clients.get(key), list) \
                    and clients[key]:
                out[site.name] = [c for c in clients[key] if isinstance(c, dict)]
        return out

    async def admin_retire(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/retire`` ``{"imi", "version", "force"}``: no longer offered; 404 if
        unknown; 409 naming the sites and clients that run it, unless ``force``."""
        imi, version, body = await self._version_body(request)
        key = version_key(imi, version)
        running = await self.running(key)
        if running and body.get("force") is not True:
            who = "; ".join(f"{site}: " + ", ".join(
                str(c.get("address")) + (f" ({c['mac']})" if c.get("mac") else "")
                for c in clients) for site, clients in sorted(running.items()))
            return _error(409, f"{key} is in use ({who}); --force retires it anyway (the "
                               "sites keep it for those clients until they boot anew)")
        await self.registry.retire(imi, version)
        log.info(kv(event="retire", version=key, running=",".join(sorted(running)) or "-"))
        return web.json_response({"retired": key, "running": running})

    async def admin_unretire(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/unretire`` ``{"imi", "version"}``: offered again; 404 if unknown."""
        imi, version, _ = await self._version_body(request)
        await self.registry.unretire(imi, version)
        key = version_key(imi, version)
        log.info(kv(event="unretire", version=key))
        return web.json_response({"unretired": key})

    async def admin_forget(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/forget`` ``{"site"}``: the site, its subscriptions, keep-alives and
        registry token removed (the token fails its next request): ``{"forgot", "revoked"
        (it had a registry token), "token_file" (a --token-file line still names it)}``; 404
        if unknown."""
        body = await self._json(request)
        site = body.get("site")
        if not isinstance(site, str) or _bad_name(site) is not None:
            return _error(400, 'the body must be {"site": NAME}')
        rec = await self.registry.site(site)
        if not await self.registry.forget(site):
            return _error(404, f"unknown site {site}")
        revoked = bool(rec is not None and rec.token_created)
        in_file = site in self.auth.site_tokens.values()
        log.info(kv(event="forget", site=site, token="revoked" if revoked else "-",
                    token_file="yes" if in_file else "no"))
        return web.json_response({"forgot": site, "revoked": revoked, "token_file": in_file})

    async def admin_site_add(self, request: web.Request) -> web.Response:
        """``POST /v1/admin/site/add`` ``{"site", "replace"}``: a new token for the site
        (created if new), kept in the registry as its SHA-256 only: ``{"site", "token",
        "created", "replaced", "sites_need_credentials"}`` (the only time the token is
        shown). 400 on a bad name (or ``*``), 409 if the site has a token and ``replace`` is
        not true."""
        body = await self._json(request)
        site, replace = body.get("site"), body.get("replace", False)
        if not isinstance(site, str) or not isinstance(replace, bool):
            return _error(400, 'the body must be {"site": NAME, "replace": false}')
        bad = token_site_problem(site)
        if bad is not None:
            return _error(400, bad)
        token, created = new_token(), time.time()
        try:
            replaced = await self.registry.set_site_token(site, token_digest(token), created,
                                                          replace=replace)
        except SiteTokenExists as e:
            return _error(409, str(e))
        log.info(kv(event="site_token", site=site, replaced="yes" if replaced else "no"))
        return web.json_response({"site": site, "token": token, "created": created,
                                  "replaced": replaced,
                                  "sites_need_credentials": self.auth.replica_auth})


class MasterCollector:
    """The master's metrics: its counters, the sites up and down, each site's lag, the
    versions published (read from :attr:`Master.scraped`, refreshed before each scrape)."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Any:
        from icbdcache.metrics import counter, gauge

        m = self.master
        for name in COUNTERS:
            yield counter(f"master_{name}", f"The master's {name.replace('_', ' ')} since it "
                          f"started (stats: master_{name})", float(m.counters.get(name, 0)))
        st = m.scraped
        sites = st.get("sites") or []
        up = sum(1 for s in sites if s.get("up"))
        yield gauge("master_sites", "Sites registered, by whether they are up",
                    labels=["state"], samples=[(["up"], up), (["down"], len(sites) - up)])
        yield gauge("master_site_up", "1 when the site's keep-alives arrive",
                    labels=["site"],
                    samples=[([s["name"]], 1.0 if s.get("up") else 0.0) for s in sites])
        yield gauge("master_site_behind_bytes", "Bytes of the newest versions of its iMIs "
                    "the site lacks (its lag)", labels=["site"],
                    samples=[([s["name"]], float(sum(int(e.get("behind_bytes") or 0)
                                                     for e in (s.get("lag") or {}).values())))
                             for s in sites])
        yield gauge("master_site_seen_seconds", "Seconds since each site's last keep-alive",
                    labels=["site"],
                    samples=[([s["name"]], float(s["age"])) for s in sites
                             if isinstance(s.get("age"), int | float)])
        imis = st.get("imis") or {}
        yield gauge("master_versions", "Versions offered (not retired), by iMI",
                    labels=["imi"],
                    samples=[([k], float(len(v.get("versions") or []))) for k, v in
                             sorted(imis.items())])


# ---------------------------------------------------------------------------- runner


def _reload_tokens(master: Master, cfg: MasterConfig) -> None:
    """SIGHUP: the token files again (a token added or revoked without a restart)."""
    try:
        auth = build_auth(cfg)
    except AuthConfigError as e:
        log.error(kv(event="reload", result="refused, tokens unchanged", error=e))
        return
    master.auth.site_tokens = auth.site_tokens
    master.auth.admin_tokens = auth.admin_tokens
    log.info(kv(event="reload", tokens=len(auth.site_tokens),
                admin_tokens=len(auth.admin_tokens)))


def build_auth(cfg: MasterConfig) -> Auth:
    """The credentials ``cfg`` names, loaded. Raises AuthConfigError naming the file."""
    return Auth(site_tokens=load_site_tokens(cfg.token_file) if cfg.token_file else {},
                client_ca=bool(cfg.client_ca),
                admin_tokens=load_admin_tokens(cfg.admin_token_file)
                if cfg.admin_token_file else set())


async def decide_access(cfg: MasterConfig, registry: Registry) -> Access:
    """How the master ``cfg`` describes lets sites in (:func:`exposure.decide` with the
    registry's site tokens counted). Raises ExposureError (a ValueError) when it would serve
    everyone who reaches a non-loopback address without ``--insecure-open``, RegistryError
    when the registry cannot be read."""
    loopback = is_loopback_listen(cfg.host)
    try:
        tokens = sum(1 for s in await registry.sites() if s.token_created)
    except RegistryError as e:
        if not (loopback or cfg.token_file or cfg.client_ca or cfg.insecure_open):
            raise RegistryError(f"cannot count the sites' tokens: {e}") from e
        log.warning(kv(event="registry", error=e))  # not needed to start: it may come back
        tokens = 0
    return decide(cfg.host, cfg.port, token_file=bool(cfg.token_file),
                  client_ca=bool(cfg.client_ca), registry_tokens=tokens,
                  insecure_open=cfg.insecure_open, loopback=loopback)


async def serve(cfg: MasterConfig, stop: asyncio.Event | None = None) -> None:
    """Run the master until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None; then
    SIGHUP reads the token files again). Raises AuthConfigError, ExposureError (a master the
    network reaches without site credentials), StoreError, RegistryError, ValueError
    (registry spec) or OSError (bind) at startup."""
    auth = build_auth(cfg)
    ssl_ctx = (server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.client_ca)
               if cfg.tls_cert and cfg.tls_key else None)
    store = Store(cfg.store, map_size=MASTER_MAP_SIZE)
    watchdog = activation.Watchdog()
    registry: Registry | None = None
    runner: web.AppRunner | None = None
    try:
        registry = open_registry(cfg.registry, store=store, down_after=cfg.down_after)
        access = await decide_access(cfg, registry)
        auth.closed = not access.open
        master = Master(store, registry, auth, keepalive_interval=cfg.keepalive_interval,
                        access=access, max_streams=cfg.max_streams,
                        site_streams=cfg.site_streams, address_streams=cfg.address_streams,
                        stream_min_rate=cfg.stream_min_rate, stream_stall=cfg.stream_stall)
        runner = web.AppRunner(master.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ssl_ctx)
        await site.start()
        loop = asyncio.get_running_loop()
        if stop is None:
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            loop.add_signal_handler(signal.SIGHUP, _reload_tokens, master, cfg)
            if earlyhup.seen():  # one came while the master started: applied now
                _reload_tokens(master, cfg)
        log.info(kv(event="listening", address=f"{cfg.host}:{cfg.port}",
                    tls="yes" if ssl_ctx else "no", registry=cfg.registry or "embedded",
                    tokens=len(auth.site_tokens), client_ca=cfg.client_ca or "-",
                    admin_tokens=len(auth.admin_tokens), registry_tokens=access.registry_tokens,
                    sites="need credentials" if auth.replica_auth else "open"))
        if access.warning is not None:
            log.warning(kv(event="insecure_open", address=access.address,
                           warning=access.warning))
        activation.ready("serving the replication API")
        watchdog.start()
        await stop.wait()
        activation.stopping()
        log.info(kv(event="stopping"))
    finally:
        watchdog.stop()
        if runner is not None:
            await runner.cleanup()
        if registry is not None:
            await registry.close()
        store.close()


__all__ = ["DEFAULT_MASTER_PORT", "Master", "MasterConfig", "latest_versions", "serve",
           "site_view"]
